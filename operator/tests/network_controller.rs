//! The `Network` reconciler in-process against a real etcd + kube-apiserver (the harness's
//! control plane): network IDs, `RulesCompiled`/`Ready` conditions, revision bumps, a
//! Warning Event on a syntax error, and a controller that outlives deleted objects; then the
//! `flatwire-operator run` binary against the same API server, stopped with SIGTERM.

use std::path::Path;
use std::time::{Duration, Instant};

use flatwire_operator::controller::{self, ControllerAddress, FIELD_MANAGER};
use flatwire_operator::crd::Network;
use flatwire_tests::controlplane::ControlPlane;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use tokio::task::block_in_place;

const ADDRESS: &str = "89e92ceee5";
const TIMEOUT: Duration = Duration::from_secs(60);

/// `kubectl apply -f` of `yaml`, blocking this worker only.
fn apply(cp: &ControlPlane, yaml: &str) -> String {
    block_in_place(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), yaml).unwrap();
        cp.kubectl_run(&["apply", "-f", f.path().to_str().unwrap()])
            .unwrap_or_else(|e| panic!("kubectl apply:\n{yaml}\n{e}"))
    })
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    block_in_place(|| {
        cp.kubectl_run(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    })
}

fn network(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: flatwire.io/v1alpha1\nkind: Network\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

fn web(rules: &str) -> String {
    let rules: String = rules.lines().map(|l| format!("    {l}\n")).collect();
    network(
        "web",
        &format!(
            "  number: 66\n  capabilities:\n  - {{name: superuser, id: 1, rules: \"accept;\"}}\n  rules: |\n{rules}"
        ),
    )
}

fn cond<'a>(n: &'a Network, t: &str) -> Option<&'a Condition> {
    n.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)
}

fn cond_is(n: &Network, t: &str, status: &str) -> bool {
    cond(n, t).is_some_and(|c| c.status == status)
}

/// Polls `name` until `ok` holds for the stored object; panics with the last one seen.
async fn wait_for(api: &Api<Network>, name: &str, ok: impl Fn(&Network) -> bool) -> Network {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(n) = api.get(name).await {
            if ok(&n) {
                return n;
            }
            last = Some(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{name}: condition not reached in {TIMEOUT:?}; last seen: {last:#?}");
}

/// The events.k8s.io Events about Network `name` with `reason`, as (type, note).
fn events(cp: &ControlPlane, name: &str, reason: &str) -> Vec<(String, String)> {
    let out = kubectl(cp, &["get", "events.v1.events.k8s.io", "-A", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["regarding"]["kind"] == "Network"
                && e["regarding"]["name"] == name
                && e["reason"] == reason
        })
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_reconciler_against_a_real_apiserver() {
    let cp = block_in_place(ControlPlane::start).expect("control plane (run `cargo xtask tools`)");
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    kubectl(&cp, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(
        &cp,
        &[
            "wait",
            "--for=condition=established",
            "crd/networks.flatwire.io",
            "--timeout=60s",
        ],
    );

    let client = controller::client(Some(cp.kubeconfig()))
        .await
        .expect("client from the harness kubeconfig");
    let address: ControllerAddress = ADDRESS.parse().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = std::sync::Arc::new(flatwire_operator::metrics::Metrics::new());
    let ctl = tokio::spawn(controller::run_controllers(
        client.clone(),
        address,
        None,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let api: Api<Network> = Api::all(client);

    // Valid rules: compiled, ready, an ID under the controller address, revision 1.
    apply(
        &cp,
        &web("drop not ethertype ipv4 and not ethertype arp;\naccept;"),
    );
    let n = wait_for(&api, "web", |n| {
        cond_is(n, "RulesCompiled", "True") && cond_is(n, "Ready", "True")
    })
    .await;
    let st = n.status.as_ref().unwrap();
    assert_eq!(st.network_id.as_deref(), Some("89e92ceee5000042"));
    assert_eq!(st.revision, Some(1));
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(cond(&n, "RulesCompiled").unwrap().reason, "Compiled");
    // The status is server-side applied by the operator's field manager.
    let managers: Vec<_> = n
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| (m.manager.clone(), m.operation.clone()))
        .collect();
    assert!(
        managers.contains(&(Some(FIELD_MANAGER.into()), Some("Apply".into()))),
        "{managers:?}"
    );
    let table = kubectl(&cp, &["get", "networks", "web", "--no-headers"]);
    assert!(
        table.contains("89e92ceee5000042") && table.contains("True"),
        "{table}"
    );

    // A syntax error: RulesCompiled=False with line and column, Ready=False, a Warning Event.
    apply(&cp, &web("accept;\ndrop bogus;"));
    let n = wait_for(&api, "web", |n| {
        n.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await;
    let rc = cond(&n, "RulesCompiled").unwrap();
    assert_eq!(
        (rc.status.as_str(), rc.reason.as_str()),
        ("False", "SyntaxError")
    );
    assert!(rc.message.starts_with("line 2 column "), "{}", rc.message);
    let ready = cond(&n, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RulesNotCompiled")
    );
    assert_eq!(n.status.as_ref().unwrap().revision, Some(2));
    let evs = events(&cp, "web", "SyntaxError");
    assert!(
        evs.iter()
            .any(|(t, note)| t == "Warning" && note == &rc.message),
        "{evs:?}"
    );

    // Fixed: compiled again, ready again, revision bumped once more.
    apply(&cp, &web("accept;"));
    let n = wait_for(&api, "web", |n| {
        n.status.as_ref().and_then(|s| s.observed_generation) == Some(3)
    })
    .await;
    assert!(cond_is(&n, "RulesCompiled", "True") && cond_is(&n, "Ready", "True"));
    assert_eq!(n.status.as_ref().unwrap().revision, Some(3));
    assert_eq!(
        evs.len(),
        events(&cp, "web", "SyntaxError").len(),
        "no new Event"
    );
    // Idempotent: reconciling its own status write changes nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = api.get("web").await.unwrap();
    assert_eq!(again.metadata.resource_version, n.metadata.resource_version);

    // An odd object (an ID under another controller, a broken capability) is reported in
    // status, and the controller keeps going.
    apply(
        &cp,
        &network(
            "odd",
            "  id: \"1111111111000001\"\n  capabilities:\n  - {name: su, id: 7, rules: \"drop bogus;\"}\n",
        ),
    );
    let n = wait_for(&api, "odd", |n| cond_is(n, "Ready", "False")).await;
    let ready = cond(&n, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidNetworkId");
    assert!(ready.message.contains(ADDRESS), "{}", ready.message);
    assert_eq!(n.status.as_ref().unwrap().network_id, None);
    let rc = cond(&n, "RulesCompiled").unwrap();
    assert!(
        rc.message.starts_with("capability su: line 1 column "),
        "{}",
        rc.message
    );

    // Overlapping pools (each valid on its own, so the API server takes them): Ready=False
    // naming both pools, a Warning Event, and the rules still compile.
    apply(
        &cp,
        &network(
            "pools",
            "  number: 9\n  ipAssignmentPools:\n  - {ipRangeStart: 198.19.0.1, ipRangeEnd: 198.19.0.100}\n  \
             - {ipRangeStart: 198.19.0.50, ipRangeEnd: 198.19.0.200}\n",
        ),
    );
    let n = wait_for(&api, "pools", |n| cond_is(n, "Ready", "False")).await;
    let ready = cond(&n, "Ready").unwrap();
    assert_eq!(ready.reason, "OverlappingPools");
    assert!(
        ready
            .message
            .contains("[0] (198.19.0.1-198.19.0.100) and [1]"),
        "{}",
        ready.message
    );
    assert!(cond_is(&n, "RulesCompiled", "True"));
    let evs = events(&cp, "pools", "OverlappingPools");
    assert!(
        evs.iter()
            .any(|(t, note)| t == "Warning" && note == &ready.message),
        "{evs:?}"
    );

    // A rules source the API server takes (under its size limit) that compiles to more
    // rules than a network config carries: RulesCompiled=False saying so.
    let many = format!("  rules: \"{}\"\n", "accept ethertype 2048; ".repeat(550));
    apply(&cp, &network("many", &many));
    let n = wait_for(&api, "many", |n| cond_is(n, "RulesCompiled", "False")).await;
    let rc = cond(&n, "RulesCompiled").unwrap();
    assert_eq!(
        rc.message,
        "the rules compile to 1100 rules; a network config carries at most 1024"
    );
    assert!(cond_is(&n, "Ready", "False"));

    // Deleting a Network does not disturb the controller: a new one is reconciled after,
    // with an ID picked under the controller address.
    kubectl(
        &cp,
        &[
            "delete",
            "network",
            "web",
            "odd",
            "pools",
            "many",
            "--wait=true",
            "--timeout=30s",
        ],
    );
    apply(&cp, &network("later", "  rules: \"accept;\"\n"));
    let n = wait_for(&api, "later", |n| cond_is(n, "Ready", "True")).await;
    let id = n.status.as_ref().unwrap().network_id.clone().unwrap();
    assert!(
        id.starts_with(ADDRESS) && id != format!("{ADDRESS}000000"),
        "{id}"
    );
    assert!(!ctl.is_finished(), "the controller is still running");
    // The gauges follow the caches at the next reconcile, which may trail the deletion.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics.encode();
        if text.contains(r#"flatwire_operator_reconciles_total{resource="network",result="ok"}"#)
            && text.contains("flatwire_operator_networks 1")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Graceful shutdown ends the controller.
    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, ctl)
        .await
        .expect("controller stops after shutdown")
        .unwrap();

    // The binary does the same, and stops cleanly on SIGTERM.
    let mut bin = std::process::Command::new(env!("CARGO_BIN_EXE_flatwire-operator"))
        .args(["run", "--controller-address", ADDRESS, "--kubeconfig"])
        .arg(cp.kubeconfig())
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("flatwire-operator run");
    apply(&cp, &network("bin", "  number: 7\n"));
    let n = wait_for(&api, "bin", |n| cond_is(n, "Ready", "True")).await;
    assert_eq!(
        n.status.unwrap().network_id.as_deref(),
        Some("89e92ceee5000007")
    );
    let pid = bin.id().to_string();
    block_in_place(|| {
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = bin.try_wait().unwrap() {
                assert!(st.success(), "flatwire-operator exited with {st}");
                break;
            }
            if Instant::now() > deadline {
                let _ = bin.kill();
                panic!("flatwire-operator did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}
