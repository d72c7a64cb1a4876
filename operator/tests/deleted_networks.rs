//! Networks whose `Network` went while no operator ran: a real `flatwire-agent --controller`
//! holds two networks (each with a host member, a pod binding, and one a NetworkMember's
//! member) written by the operator's controllers against a real etcd + kube-apiserver. With
//! the operator stopped one Network is deleted; an operator serving another controller address
//! leaves every network alone; the next operator of this address deletes the orphaned network
//! (bindings, members, network) within a few seconds and keeps the other one, which it then
//! deletes too, within a pass, when its Network is deleted while it runs.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{Agent, Operator, apply, control_plane_with_crds, kubectl, wait, wait_for};
use flatwire_operator::controller::ControllerAddress;
use flatwire_vl1::Identity;
use serde_json::Value;

/// How long a new operator may take to delete an orphaned network.
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

fn network(name: &str, number: u32) -> String {
    format!(
        "apiVersion: flatwire.io/v1alpha1\nkind: Network\nmetadata:\n  name: {name}\nspec:\n  \
         number: {number}\n  rules: \"accept;\"\n  podSelector: {{}}\n"
    )
}

/// A metric's value in the OpenMetrics `text` (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_deleted_while_no_operator_ran_leave_the_controller() {
    let mut agent = Agent::start().await;
    let cp = control_plane_with_crds();
    let net = |n: u32| format!("/controller/network/{}{n:06x}", agent.address);
    let (gone, kept) = (net(8), net(9));

    let host = Identity::generate(&AtomicBool::new(false)).unwrap();
    apply(&cp, "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n");
    kubectl(
        &cp,
        &[
            "annotate",
            "node",
            "n1",
            &format!("flatwire.io/host-identity={host}"),
        ],
    );
    apply(
        &cp,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: default\n",
    );
    apply(
        &cp,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p1\n  namespace: default\n  labels: {app: x}\n\
         spec:\n  nodeName: n1\n  automountServiceAccountToken: false\n  containers:\n  - {name: c, image: pause}\n",
    );
    let uid = kubectl(
        &cp,
        &[
            "get",
            "pod",
            "p1",
            "-n",
            "default",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
    .trim()
    .to_owned();
    apply(&cp, &network("gone", 8));
    apply(&cp, &network("kept", 9));
    let laptop = Identity::generate(&AtomicBool::new(false)).unwrap();
    apply(
        &cp,
        &format!(
            "apiVersion: flatwire.io/v1alpha1\nkind: NetworkMember\nmetadata:\n  name: laptop\n\
             spec:\n  network: gone\n  address: \"{}\"\n  authorized: true\n",
            laptop.address()
        ),
    );

    // The operator writes both networks with their host member and binding, and the laptop.
    let op = Operator::start(&cp, &agent).await;
    let host_path = |n: &str| format!("{n}/member/{}", host.address());
    let laptop_path = format!("{gone}/member/{}", laptop.address());
    for path in [
        host_path(&gone),
        host_path(&kept),
        format!("{gone}/pod/{uid}"),
        format!("{kept}/pod/{uid}"),
        laptop_path.clone(),
    ] {
        wait(&format!("{path} in the controller"), async || {
            (agent.get(&path).0 == 200).then_some(())
        })
        .await;
    }
    op.stop().await;

    // Deleted while no operator runs: everything stays in the controller.
    kubectl(&cp, &["delete", "network", "gone", "--wait=true"]);
    assert_eq!(agent.get(&gone).0, 200, "nothing ran, yet {gone} went");

    // An operator of another controller address owns none of these networks, mapped or not.
    let other: ControllerAddress = if agent.address.starts_with("aa") {
        "bb00000001"
    } else {
        "aa00000001"
    }
    .parse()
    .unwrap();
    let foreign = Operator::start_with(&cp, other, agent.sink()).await;
    wait("the foreign operator's first pass", async || {
        let t = foreign.metrics.encode();
        t.contains(r#"flatwire_operator_reconciles_total{resource="pod""#)
            .then_some(())
    })
    .await;
    let text = foreign.metrics.encode();
    foreign.stop().await;
    assert_eq!(
        metric(&text, "flatwire_operator_controller_networks_deleted_total"),
        0,
        "{text}"
    );
    for path in [&gone, &kept] {
        assert_eq!(agent.get(path).0, 200, "{path} deleted by another address");
    }

    // The next operator of this address deletes the orphaned network and nothing else.
    let started = Instant::now();
    let op = Operator::start(&cp, &agent).await;
    wait_for("the orphaned network deleted", CLEANUP_LIMIT, async || {
        (agent.get(&gone).0 == 404).then_some(())
    })
    .await;
    eprintln!(
        "orphaned network deleted {:?} after the operator started",
        started.elapsed()
    );
    for path in [
        laptop_path.clone(),
        host_path(&gone),
        format!("{gone}/pod/{uid}"),
    ] {
        assert_eq!(agent.get(&path).0, 404, "{path} left behind");
    }
    for path in [kept.clone(), host_path(&kept), format!("{kept}/pod/{uid}")] {
        let (code, v) = agent.get(&path);
        assert_eq!(code, 200, "{path} went with the orphan: {v}");
    }
    let (_, list) = agent.get("/controller/network");
    assert_eq!(
        list,
        Value::from(vec![kept.rsplit('/').next().unwrap()]),
        "the controller's networks"
    );

    // Deleted while the operator runs: the same path, within a pass.
    let t0 = Instant::now();
    kubectl(&cp, &["delete", "network", "kept", "--wait=false"]);
    wait_for(
        "the deleted Network's network gone",
        CLEANUP_LIMIT,
        async || (agent.get(&kept).0 == 404).then_some(()),
    )
    .await;
    eprintln!("network deleted {:?} after its Network", t0.elapsed());
    // The count follows the controller's answer.
    let text = wait("both deletions counted", async || {
        let t = op.metrics.encode();
        (metric(&t, "flatwire_operator_controller_networks_deleted_total") == 2).then_some(t)
    })
    .await;
    op.stop().await;
    assert_eq!(
        metric(&text, "flatwire_operator_pod_binding_errors_total"),
        0,
        "{text}"
    );
    let (_, list) = agent.get("/controller/network");
    assert_eq!(list, Value::Array(vec![]), "the controller's networks");
    assert!(
        agent.proc.try_status().is_none(),
        "the agent exited:\n{}",
        agent.log()
    );
}
