//! The leader's pod label against a real etcd + kube-apiserver (Pod objects stand for the
//! operator replicas; there is no kubelet): the Lease winner labels its pod
//! `flatwire.io/role=leader` (what the controller Service selects), a new leader takes the
//! label off a crashed leader's pod, a clean release removes it, and a candidate that is not
//! in a pod (no pod named like its holder) still leads without labeling anything.

use std::time::{Duration, Instant};

use flatwire_operator::controller;
use flatwire_operator::leader::{Elector, LEADER_LABEL, LEADER_VALUE, LeaseConfig};
use flatwire_tests::controlplane::ControlPlane;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::task::block_in_place;

const NS: &str = "flatwire-system";

fn cfg(holder: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: NS.into(),
        name: "flatwire-operator".into(),
        holder: holder.into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(300),
    }
}

async fn create_pod(pods: &Api<Pod>, name: &str) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "containers": [{ "name": "operator", "image": "flatwire-operator:test" }] }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

/// The names of the pods carrying the leader label, sorted.
async fn labeled(pods: &Api<Pod>) -> Vec<String> {
    let sel = format!("{LEADER_LABEL}={LEADER_VALUE}");
    let mut names: Vec<String> = pods
        .list(&ListParams::default().labels(&sel))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    names
}

async fn wait_labeled(pods: &Api<Pod>, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = labeled(pods).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "labeled {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_labels_its_pod_and_only_its_pod() {
    let cp = block_in_place(ControlPlane::start).expect("control plane (run `cargo xtask tools`)");
    block_in_place(|| {
        cp.kubectl_run(&["create", "namespace", NS])?;
        // No controller-manager creates it, and pod admission wants it.
        cp.kubectl_run(&["create", "serviceaccount", "default", "-n", NS])
    })
    .unwrap();
    let client: Client = controller::client(Some(cp.kubeconfig())).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for name in ["op-a", "op-b"] {
        create_pod(&pods, name).await;
    }

    // A crashed former leader left its label on op-a.
    let stale = serde_json::json!({ "metadata": { "labels": { LEADER_LABEL: LEADER_VALUE } } });
    pods.patch("op-a", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap();
    assert_eq!(labeled(&pods).await, ["op-a"]);

    // op-b wins the (free) Lease: its pod is labeled, op-a's label goes.
    let b = Elector::new(client.clone(), cfg("op-b"));
    tokio::time::timeout(Duration::from_secs(30), b.acquire())
        .await
        .expect("op-b leads");
    wait_labeled(&pods, &["op-b"]).await;

    // op-a restarts as a candidate: it does not lead and is not labeled.
    let a = Elector::new(client.clone(), cfg("op-a"));
    let a_task = tokio::spawn(async move {
        a.acquire().await;
        a
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!a_task.is_finished(), "op-a took a held Lease");
    assert_eq!(labeled(&pods).await, ["op-b"]);

    // op-b gives the Lease up: its label goes, op-a leads and is labeled.
    b.release().await.unwrap();
    let a = tokio::time::timeout(Duration::from_secs(30), a_task)
        .await
        .expect("op-a leads after the release")
        .unwrap();
    wait_labeled(&pods, &["op-a"]).await;

    // op-a loses the Lease to a forced holder: hold() returns and the label goes.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), NS);
    let take = serde_json::json!({ "spec": { "holderIdentity": "someone-else" } });
    let hold = tokio::spawn(async move { a.hold().await });
    leases
        .patch(
            "flatwire-operator",
            &PatchParams::default(),
            &Patch::Merge(&take),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), hold)
        .await
        .expect("op-a notices it lost the Lease")
        .unwrap();
    wait_labeled(&pods, &[]).await;

    // A candidate outside a pod leads all the same.
    leases
        .patch(
            "flatwire-operator",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "spec": { "holderIdentity": null } })),
        )
        .await
        .unwrap();
    let c = Elector::new(client.clone(), cfg("not-a-pod-1234"));
    tokio::time::timeout(Duration::from_secs(30), c.acquire())
        .await
        .expect("a candidate without a pod leads");
    assert_eq!(labeled(&pods).await, Vec::<String>::new());
    c.release().await.unwrap();
}
