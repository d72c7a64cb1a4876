//! The Node and Pod side of the operator end to end: a real `flatwire-agent --controller` is
//! the controller, Nodes (with the host identity annotation set by kubectl, standing in for
//! the agents' registration), a Network with tag definitions and pod selectors, and Pods with
//! `nodeName` and labels live in a real etcd + kube-apiserver. The nodes' host members are
//! authorized with their identities pinned, the pods get bindings with their node's host and
//! tags from their labels, a relabel changes the tags, an unknown enum value gets a Warning
//! Event and the default, a deleted Pod's binding goes within 2 s, and a Pod deselected
//! while the operator is down loses its binding when a new operator starts.
//!
//! The addresses test runs a planet of real agents in network namespaces (a root, the
//! controller `ctl0`, hosts `a` and `b` whose pods attach through their gRPC `Attach` with
//! their Pod's uid, so the controller authorizes them by their node's vouch): the IPs the
//! controller assigns land in the Pods' and the Node's `flatwire.io/ips.<nwid>` annotations,
//! and after the controller's store is wiped (the same identity, an empty `controller.d`:
//! what a new leader's controller sidecar starts with) a new operator recreates the bindings
//! and the host member with those IPs; a new pod gets a fresh address, the old pod's member
//! comes back (at its next config request) with its old address, and the new pod pings it;
//! a bad annotation gets a Warning Event and everything else reconciles.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{Agent, Operator, apply, control_plane_with_crds, events, kubectl, wait, wait_for};
use flatwire_api::v1;
use flatwire_operator::controller::ControllerAddress;
use flatwire_operator::sink::{ControllerSink, HttpSink};
use flatwire_tests::bridge::TcpBridge;
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{
    AGENT_PORT, Planet, PlanetSpec, Profile, agent_binary, check_root, ping_in,
};
use flatwire_vl1::Identity;
use serde_json::{Value, json};
use tokio::task::block_in_place;

const NETWORK: &str = r#"
apiVersion: flatwire.io/v1alpha1
kind: Network
metadata:
  name: lab
spec:
  number: 7
  ipAssignmentPools:
  - {ipRangeStart: 198.19.0.10, ipRangeEnd: 198.19.0.250}
  routes:
  - {target: 198.19.0.0/24}
  v4AssignMode: [pool]
  rules: "accept;"
  namespaceSelector:
    matchLabels: {team: a}
  podSelector:
    matchExpressions:
    - {key: net, operator: In, values: [lab]}
  tags:
  - {name: role, id: 100, enum: {web: 1, db: 2}, podLabel: role, default: 1}
  - {name: tier, id: 200, podLabel: tier}
"#;

fn node_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n")
}

fn pod_yaml(ns: &str, name: &str, node: Option<&str>, labels: &str) -> String {
    let node = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {labels}\n\
         spec:\n{node}  automountServiceAccountToken: false\n  containers:\n  - {{name: c, image: pause}}\n"
    )
}

fn uid(cp: &ControlPlane, ns: &str, pod: &str) -> String {
    kubectl(
        cp,
        &[
            "get",
            "pod",
            pod,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_pods_become_host_members_and_bindings() {
    let mut agent = Agent::start().await;
    let cp = control_plane_with_crds();
    let nwid = format!("{}000007", agent.address);
    let net_path = format!("/controller/network/{nwid}");

    // Two nodes registered by their agents' host identities.
    let hosts: Vec<Identity> = (0..2)
        .map(|_| Identity::generate(&AtomicBool::new(false)).unwrap())
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let name = format!("n{}", i + 1);
        apply(&cp, &node_yaml(&name));
        kubectl(
            &cp,
            &[
                "annotate",
                "node",
                &name,
                &format!("flatwire.io/host-identity={h}"),
            ],
        );
    }
    // A node with a broken annotation is reported, not fatal.
    apply(&cp, &node_yaml("n3"));
    kubectl(
        &cp,
        &[
            "annotate",
            "node",
            "n3",
            "flatwire.io/host-identity=garbage",
        ],
    );
    apply(
        &cp,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels: {team: a}\n",
    );
    for ns in ["apps", "default"] {
        apply(
            &cp,
            &format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: {ns}\n"
            ),
        );
    }
    apply(&cp, NETWORK);
    apply(
        &cp,
        &pod_yaml(
            "apps",
            "web",
            Some("n1"),
            "{net: lab, role: db, tier: \"3\"}",
        ),
    );
    apply(
        &cp,
        &pod_yaml("apps", "odd", Some("n2"), "{net: lab, role: cache}"),
    );
    apply(&cp, &pod_yaml("apps", "pending", None, "{net: lab}"));
    apply(&cp, &pod_yaml("apps", "other", Some("n1"), "{net: x}"));
    apply(
        &cp,
        &pod_yaml("default", "outside", Some("n1"), "{net: lab}"),
    );
    let web = uid(&cp, "apps", "web");
    let odd = uid(&cp, "apps", "odd");

    let op = Operator::start(&cp, &agent).await;

    // The network requires bindings; both hosts are authorized with their identities pinned.
    let nj = wait("the network in the controller", async || {
        let (code, nj) = agent.get(&net_path);
        (code == 200).then_some(nj)
    })
    .await;
    assert_eq!(nj["vouchRequiresPod"], true, "{nj}");
    for (i, h) in hosts.iter().enumerate() {
        let path = format!("{net_path}/member/{}", h.address());
        let mj = wait("the host member", async || {
            let (code, mj) = agent.get(&path);
            (code == 200).then_some(mj)
        })
        .await;
        assert_eq!(mj["authorized"], true, "{mj}");
        assert_eq!(mj["identity"], h.to_string());
        assert_eq!(mj["name"], format!("node/n{}", i + 1));
    }

    // Bindings for the selected, scheduled pods only, with their node's host and tags.
    let bindings = wait("two bindings", async || {
        let (code, list) = agent.get(&format!("{net_path}/pod"));
        (code == 200 && list.as_object()?.len() == 2).then_some(list)
    })
    .await;
    let b = &bindings[&web];
    assert_eq!(
        (b["namespace"].clone(), b["name"].clone(), b["uid"].clone()),
        (json!("apps"), json!("web"), json!(web))
    );
    assert_eq!(b["host"], hosts[0].address().to_string());
    assert_eq!(b["tags"], json!([[100, 2], [200, 3]]));
    // The unknown enum value: the default, and a Warning Event on the Pod.
    let b = &bindings[&odd];
    assert_eq!(b["host"], hosts[1].address().to_string());
    assert_eq!(b["tags"], json!([[100, 1]]));
    let ev = wait("an InvalidTagValue Warning Event", async || {
        events(&cp).into_iter().find(|e| {
            e["regarding"]["name"] == "odd"
                && e["regarding"]["kind"] == "Pod"
                && e["reason"] == "InvalidTagValue"
                && e["type"] == "Warning"
        })
    })
    .await;
    let note = ev["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("cache") && note.contains("default 1"),
        "{note}"
    );
    wait("an InvalidHostIdentity Warning Event", async || {
        events(&cp)
            .into_iter()
            .find(|e| e["regarding"]["name"] == "n3" && e["reason"] == "InvalidHostIdentity")
    })
    .await;

    // Member counts: two host members and two bound pods, all authorized.
    let took = wait_counts(&cp, (4, 4), Duration::from_secs(10)).await;
    eprintln!("member counts shown {took:?} after the bindings");
    // NetworkMembers the controller serves count too; a deauthorized one only in members.
    for (name, address, authorized) in [("laptop", "1a2b3c4d5e", true), ("vm", "1a2b3c4d5f", false)]
    {
        apply(
            &cp,
            &format!(
                "apiVersion: flatwire.io/v1alpha1\nkind: NetworkMember\nmetadata:\n  name: {name}\n\
                 spec:\n  network: lab\n  address: \"{address}\"\n  authorized: {authorized}\n"
            ),
        );
    }
    let took = wait_counts(&cp, (6, 5), Duration::from_secs(10)).await;
    eprintln!("NetworkMembers counted {took:?} after they were applied");
    // The Network reconciler's own status writes (a spec edit bumps the revision) keep them.
    kubectl(
        &cp,
        &[
            "patch",
            "network",
            "lab",
            "--type=merge",
            "-p",
            r#"{"spec":{"mtu":2700}}"#,
        ],
    );
    wait("revision 2", async || {
        let r = kubectl(
            &cp,
            &["get", "network", "lab", "-o", "jsonpath={.status.revision}"],
        );
        (r.trim() == "2").then_some(())
    })
    .await;
    assert_eq!(shown_counts(&cp), (Some((6, 5)), "True".into()));

    // A relabel changes the binding's tags.
    kubectl(
        &cp,
        &[
            "label",
            "pod",
            "web",
            "-n",
            "apps",
            "role=web",
            "--overwrite",
        ],
    );
    let path = format!("{net_path}/pod/{web}");
    wait("the binding retagged", async || {
        let (code, b) = agent.get(&path);
        (code == 200 && b["tags"] == json!([[100, 1], [200, 3]])).then_some(())
    })
    .await;

    // Deleting the Pod deletes its binding within 2 s.
    let t0 = Instant::now();
    kubectl(&cp, &["delete", "pod", "web", "-n", "apps", "--wait=false"]);
    wait_for("the binding deleted", Duration::from_secs(2), async || {
        let (code, _) = agent.get(&path);
        (code == 404).then_some(())
    })
    .await;
    eprintln!("binding deleted {:?} after the delete", t0.elapsed());
    wait_counts(&cp, (5, 4), Duration::from_secs(3)).await;
    eprintln!("member count dropped {:?} after the delete", t0.elapsed());
    let (_, list) = agent.get(&format!("{net_path}/pod"));
    assert_eq!(
        list.as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>()),
        Some(vec![odd.clone()])
    );
    let text = wait("the deletion counted", async || {
        let t = op.metrics.encode();
        t.contains("flatwire_operator_pod_bindings_deleted_total 1")
            .then_some(t)
    })
    .await;
    op.stop().await;

    // A pod leaving the selection while the operator is down loses its binding once a new
    // operator (nothing carried over in memory) lists the controller's bindings.
    kubectl(
        &cp,
        &["label", "pod", "odd", "-n", "apps", "net=x", "--overwrite"],
    );
    let op2 = Operator::start(&cp, &agent).await;
    wait("odd's binding deleted after a restart", async || {
        let (_, list) = agent.get(&format!("{net_path}/pod"));
        list.as_object()?.is_empty().then_some(())
    })
    .await;
    // The new operator (nothing in memory) counts from scratch: the hosts and NetworkMembers.
    wait_counts(&cp, (4, 3), Duration::from_secs(10)).await;
    wait("the deletion counted by the new operator", async || {
        op2.metrics
            .encode()
            .contains("flatwire_operator_pod_bindings_deleted_total 1")
            .then_some(())
    })
    .await;
    op2.stop().await;

    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("flatwire_operator_pod_bindings_written_total") >= 3,
        "{text}"
    );
    assert_eq!(
        count("flatwire_operator_pod_binding_errors_total"),
        0,
        "{text}"
    );
    assert!(
        text.contains(r#"flatwire_operator_reconciles_total{resource="pod",result="ok"}"#),
        "{text}"
    );
    assert!(
        agent.proc.try_status().is_none(),
        "the agent exited:\n{}",
        agent.log()
    );
}

/// The Network `lab`'s member counts as `kubectl get networks` shows them: the MEMBERS
/// column and `status.authorizedMembers` (`None` while either is unset), and its READY column.
fn shown_counts(cp: &ControlPlane) -> (Option<(u32, u32)>, String) {
    let row = kubectl(cp, &["get", "networks", "lab", "--no-headers"]);
    let cols: Vec<&str> = row.split_whitespace().collect();
    let authorized = kubectl(
        cp,
        &[
            "get",
            "network",
            "lab",
            "-o",
            "jsonpath={.status.authorizedMembers}",
        ],
    );
    let members = cols.get(2).and_then(|m| m.parse().ok());
    let counts = members.zip(authorized.trim().parse().ok());
    (counts, cols.get(3).unwrap_or(&"").to_string())
}

/// Waits (up to `limit`) until the Network `lab` shows `want` (members, authorized) and is
/// Ready; returns how long that took.
async fn wait_counts(cp: &ControlPlane, want: (u32, u32), limit: Duration) -> Duration {
    let t0 = Instant::now();
    let what = format!("kubectl get networks showing {want:?} members (members, authorized)");
    wait_for(&what, limit, async || {
        let (counts, ready) = shown_counts(cp);
        (counts == Some(want) && ready == "True").then_some(())
    })
    .await;
    t0.elapsed()
}

/// Annotation `key` of the object `what` (kubectl get arguments), if set.
fn annotation(cp: &ControlPlane, what: &[&str], key: &str) -> Option<String> {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    let v: Value = serde_json::from_str(&kubectl(cp, &args)).unwrap();
    v["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned)
}

/// Starts pod `name` of namespace `apps` (uid `uid`) in the new namespace `<host>-<name>`
/// through host agent `host`'s gRPC `Attach`, as the CNI plugin would: the namespace and the
/// pod's IPv4 address.
async fn attach(
    planet: &mut Planet,
    host: &str,
    nwid: &str,
    name: &str,
    uid: &str,
) -> (Host, IpAddr) {
    let ns: Host = block_in_place(|| planet.topology().host(&format!("{host}-{name}")))
        .expect("pod namespace");
    let req = v1::AttachRequest {
        key: Some(v1::AttachmentKey {
            network_name: "fw-pod-controller".into(),
            container_id: ns.ns().to_owned(),
            ifname: "eth0".into(),
        }),
        netns_path: ns.netns_path(),
        network_id: nwid.to_owned(),
        mode: v1::Mode::Secondary.into(),
        pod: Some(v1::PodRef {
            namespace: "apps".into(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        }),
        ..Default::default()
    };
    let socket = planet.agent(host).socket();
    let mut client = flatwire_api::connect(&socket, flatwire_api::ClientOptions::default())
        .await
        .expect("the host agent's socket");
    let result = client
        .attach(req)
        .await
        .unwrap_or_else(|e| panic!("Attach of {name}: {e}"))
        .into_inner()
        .result
        .expect("Attach result");
    let ip = result
        .addresses
        .iter()
        .filter_map(|a| a.address.split('/').next()?.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
        .unwrap_or_else(|| panic!("{name} got no IPv4 address: {result:?}"));
    (ns, ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_ips_bring_members_back_after_the_controller_loses_its_store() {
    check_root().expect("root (the planet runs in network namespaces)");
    let bin = block_in_place(|| agent_binary(Profile::Debug)).expect("flatwire-agent build");
    let mut planet =
        block_in_place(|| Planet::start(&PlanetSpec::new(bin).host("a", None).host("b", None)))
            .expect("planet");
    let cp = control_plane_with_crds();
    let (ctl_address, token) = {
        let ctl = planet.agent("ctl0");
        (
            ctl.address().to_owned(),
            ctl.home().join("authtoken.secret"),
        )
    };
    // The operator reaches ctl0's API through a bridge into its namespace.
    let ctl_api: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let local: SocketAddr = format!("127.0.0.1:{AGENT_PORT}").parse().unwrap();
    let bridge = TcpBridge::start(None, ctl_api, Some(planet.agent("ctl0").host()), local)
        .expect("controller API bridge");
    let address: ControllerAddress = ctl_address.parse().unwrap();
    let sink = || -> Arc<dyn ControllerSink> {
        let token = std::fs::read_to_string(&token).expect("ctl0's API token");
        Arc::new(HttpSink::new(&format!("http://{ctl_api}"), &token).unwrap())
    };
    let ctl_get = |planet: &Planet, path: &str| -> (u16, Value) {
        block_in_place(|| planet.agent("ctl0").api("GET", path, None))
    };
    let nwid = format!("{ctl_address}000007");
    let net_path = format!("/controller/network/{nwid}");
    let key = format!("flatwire.io/ips.{nwid}");

    // Nodes a and b registered with their agents' host identities; pods of namespace apps
    // join.
    for n in ["a", "b"] {
        let id = std::fs::read_to_string(planet.agent(n).home().join("identity.public"))
            .expect("the host's identity");
        apply(&cp, &node_yaml(n));
        kubectl(
            &cp,
            &[
                "annotate",
                "node",
                n,
                &format!("flatwire.io/host-identity={}", id.trim()),
            ],
        );
    }
    let host_address = planet.agent("a").address().to_owned();
    apply(
        &cp,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels: {team: a}\n",
    );
    apply(
        &cp,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: apps\n",
    );
    apply(&cp, NETWORK);
    apply(&cp, &pod_yaml("apps", "p1", Some("a"), "{net: lab}"));
    let p1 = uid(&cp, "apps", "p1");
    let op = Operator::start_with(&cp, address, sink()).await;

    // p1 starts on a: authorized by a's vouch, an IP from the pool.
    let p1_path = format!("{net_path}/pod/{p1}");
    wait("p1's binding", async || {
        (ctl_get(&planet, &p1_path).0 == 200).then_some(())
    })
    .await;
    let (_, p1_ip) = attach(&mut planet, "a", &nwid, "p1", &p1).await;
    eprintln!("p1 attached with {p1_ip}");
    let binding = wait("p1's binding to show its IP", async || {
        let (code, b) = ctl_get(&planet, &p1_path);
        (code == 200 && b["ipAssignments"] == json!([p1_ip.to_string()])).then_some(b)
    })
    .await;
    assert_eq!(
        binding["members"].as_array().map(Vec::len),
        Some(1),
        "{binding}"
    );
    // The controller's IPs are saved on the Pod and on the Node.
    let t0 = Instant::now();
    wait("p1's IPs annotation", async || {
        (annotation(&cp, &["pod", "p1", "-n", "apps"], &key) == Some(p1_ip.to_string()))
            .then_some(())
    })
    .await;
    eprintln!(
        "p1's annotation {:?} after its binding showed the IP",
        t0.elapsed()
    );
    // Host a joins the network itself (as a primary-mode node does for its gateway).
    block_in_place(|| {
        planet
            .agent("a")
            .api_ok("POST", &format!("/network/{nwid}"), Some(&json!({})))
    })
    .expect("host a joins the network");
    let host_path = format!("{net_path}/member/{host_address}");
    let host_ips = wait("host a's member to get its IP", async || {
        let (code, m) = ctl_get(&planet, &host_path);
        let ips = m["ipAssignments"].as_array()?.clone();
        (code == 200 && !ips.is_empty()).then_some(ips)
    })
    .await;
    let host_saved: Vec<&str> = host_ips.iter().filter_map(Value::as_str).collect();
    wait("node a's IPs annotation", async || {
        (annotation(&cp, &["node", "a"], &key) == Some(host_saved.join(","))).then_some(())
    })
    .await;

    // A bad annotation is reported and ignored: p3 is bound all the same.
    apply(&cp, &pod_yaml("apps", "p3", Some("a"), "{net: lab}"));
    kubectl(
        &cp,
        &[
            "annotate",
            "pod",
            "p3",
            "-n",
            "apps",
            &format!("{key}=198.19.0.77,not-an-ip"),
        ],
    );
    let p3 = uid(&cp, "apps", "p3");
    let ev = wait("an InvalidIPAnnotation Warning Event", async || {
        events(&cp).into_iter().find(|e| {
            e["regarding"]["name"] == "p3"
                && e["reason"] == "InvalidIPAnnotation"
                && e["type"] == "Warning"
        })
    })
    .await;
    let note = ev["note"].as_str().unwrap_or_default();
    assert!(note.contains("not-an-ip") && note.contains(&key), "{note}");
    let p3_path = format!("{net_path}/pod/{p3}");
    wait("p3's binding", async || {
        (ctl_get(&planet, &p3_path).0 == 200).then_some(())
    })
    .await;
    // p0 on b reaches p1 (its binding's IPs are saved too).
    apply(&cp, &pod_yaml("apps", "p0", Some("b"), "{net: lab}"));
    let p0 = uid(&cp, "apps", "p0");
    let p0_path = format!("{net_path}/pod/{p0}");
    wait("p0's binding", async || {
        (ctl_get(&planet, &p0_path).0 == 200).then_some(())
    })
    .await;
    let (p0_ns, p0_ip) = attach(&mut planet, "b", &nwid, "p0", &p0).await;
    wait("p0's IPs annotation", async || {
        (annotation(&cp, &["pod", "p0", "-n", "apps"], &key) == Some(p0_ip.to_string()))
            .then_some(())
    })
    .await;
    wait_for("p0 to ping p1", Duration::from_secs(60), async || {
        block_in_place(|| ping_in(&p0_ns, p1_ip, 1).ok).then_some(())
    })
    .await;
    op.stop().await;

    // The controller loses its store: same identity, empty controller.d.
    block_in_place(|| {
        planet.stop_agent("ctl0");
        let store = planet.agent("ctl0").home().join("controller.d");
        std::fs::remove_dir_all(&store).expect("remove the controller's store");
        planet.start_agent("ctl0").expect("restart ctl0");
    });
    assert_eq!(ctl_get(&planet, &net_path).0, 404, "the store is not empty");

    // A new operator (nothing in memory) restores the bindings and the host member with
    // the saved IPs.
    let op2 = Operator::start_with(&cp, address, sink()).await;
    let t0 = Instant::now();
    let binding = wait("p1's binding restored with its IP", async || {
        let (code, b) = ctl_get(&planet, &p1_path);
        (code == 200).then_some(b)
    })
    .await;
    assert_eq!(
        binding["ipAssignments"],
        json!([p1_ip.to_string()]),
        "{binding}"
    );
    wait("p0's binding restored with its IP", async || {
        let (_, b) = ctl_get(&planet, &p0_path);
        (b["ipAssignments"] == json!([p0_ip.to_string()])).then_some(())
    })
    .await;
    let member = wait("host a's member restored", async || {
        let (code, m) = ctl_get(&planet, &host_path);
        (code == 200).then_some(m)
    })
    .await;
    eprintln!(
        "binding and host member restored {:?} after the operator started",
        t0.elapsed()
    );
    assert_eq!(member["ipAssignments"], json!(host_ips), "{member}");
    assert_eq!(member["authorized"], true, "{member}");
    wait("p3's binding restored", async || {
        (ctl_get(&planet, &p3_path).0 == 200).then_some(())
    })
    .await;

    // A pod started (on b) after the restore gets a fresh address, saved too.
    apply(&cp, &pod_yaml("apps", "p2", Some("b"), "{net: lab}"));
    let p2 = uid(&cp, "apps", "p2");
    let p2_path = format!("{net_path}/pod/{p2}");
    wait("p2's binding", async || {
        (ctl_get(&planet, &p2_path).0 == 200).then_some(())
    })
    .await;
    let (p2_ns, p2_ip) = attach(&mut planet, "b", &nwid, "p2", &p2).await;
    eprintln!("p2 attached with {p2_ip}");
    assert!(
        ![p0_ip, p1_ip].contains(&p2_ip),
        "p2 got a saved address: {p2_ip}"
    );
    assert!(
        !host_saved.contains(&p2_ip.to_string().as_str()),
        "p2 got host a's saved address {p2_ip}"
    );
    wait("p2's IPs annotation", async || {
        (annotation(&cp, &["pod", "p2", "-n", "apps"], &key) == Some(p2_ip.to_string()))
            .then_some(())
    })
    .await;
    assert_eq!(
        annotation(&cp, &["pod", "p1", "-n", "apps"], &key),
        Some(p1_ip.to_string()),
        "p1's annotation changed"
    );

    // p1's member asks for its config again (it does every minute) and, vouched for by a,
    // gets its old address back; p2 on b reaches it.
    let member = wait_for(
        "p1's member back with its IP",
        Duration::from_secs(150),
        async || {
            let (_, b) = ctl_get(&planet, &p1_path);
            let m = b["members"].as_array()?.first()?.as_str()?.to_owned();
            let (code, mj) = ctl_get(&planet, &format!("{net_path}/member/{m}"));
            (code == 200 && mj["authorized"] == true).then_some(mj)
        },
    )
    .await;
    eprintln!(
        "p1's member back {:?} after the operator started: {}",
        t0.elapsed(),
        member["ipAssignments"]
    );
    assert_eq!(
        member["ipAssignments"],
        json!([p1_ip.to_string()]),
        "{member}"
    );
    assert_eq!(member["lastAuthorizedCredentialType"], "vouch", "{member}");
    for (who, ns) in [("p0", &p0_ns), ("p2", &p2_ns)] {
        wait_for(
            &format!("{who} to ping p1 after the restore"),
            Duration::from_secs(60),
            async || block_in_place(|| ping_in(ns, p1_ip, 1).ok).then_some(()),
        )
        .await;
    }
    let text = op2.metrics.encode();
    assert!(
        text.contains("flatwire_operator_pod_binding_errors_total 0"),
        "{text}"
    );
    op2.stop().await;
    drop(bridge);
}
