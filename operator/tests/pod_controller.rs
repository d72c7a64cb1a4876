//! The Node and Pod side of the operator end to end: a real `flatwire-agent --controller` is
//! the controller, Nodes (with the host identity annotation set by kubectl, standing in for
//! the agents' registration), a Network with tag definitions and pod selectors, and Pods with
//! `nodeName` and labels live in a real etcd + kube-apiserver. The nodes' host members are
//! authorized with their identities pinned, the pods get bindings with their node's host and
//! tags from their labels, a relabel changes the tags, an unknown enum value gets a Warning
//! Event and the default, a deleted Pod's binding goes within 2 s, and a Pod deselected
//! while the operator is down loses its binding when a new operator starts.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{Agent, Operator, apply, control_plane_with_crds, events, kubectl, wait, wait_for};
use flatwire_vl1::Identity;
use serde_json::json;

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

fn uid(cp: &flatwire_tests::controlplane::ControlPlane, ns: &str, pod: &str) -> String {
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
