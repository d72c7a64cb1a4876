//! The `NetworkMember` reconciler end to end: a real `flatwire-agent --controller` on
//! loopback (with a planet of our own whose only root is that agent) is the controller
//! store, reached through its HTTP API by the operator's `HttpSink`; Networks and
//! NetworkMembers are applied with kubectl to a real etcd + kube-apiserver. The member
//! JSON appears in the agent's controller, changes follow the spec, a member with an unknown
//! tag gets `Ready=False` and a Warning Event without reaching the controller, and deleting
//! the NetworkMember removes it from the controller before the object goes (finalizer). A
//! member the controller lacks (a fresh controller after a failover) is created again with
//! the IPs its status recorded; a bad recorded value gets a Warning Event and is ignored.

mod common;

use common::{Agent, Operator, apply, control_plane_with_crds, events, kubectl, wait};
use flatwire_operator::crd::NetworkMember;
use kube::Api;
use tokio::task::block_in_place;

const MEMBER: &str = "0123456789";

fn cond(m: &NetworkMember, t: &str) -> Option<(String, String, String)> {
    let c = m
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn member_yaml(name: &str, address: &str, authorized: bool, extra: &str) -> String {
    format!(
        "apiVersion: flatwire.io/v1alpha1\nkind: NetworkMember\nmetadata:\n  name: {name}\n\
         spec:\n  network: lab\n  address: \"{address}\"\n  authorized: {authorized}\n{extra}"
    )
}

const NETWORK: &str = r#"
apiVersion: flatwire.io/v1alpha1
kind: Network
metadata:
  name: lab
spec:
  number: 5
  name: lab
  ipAssignmentPools:
  - {ipRangeStart: 198.19.0.10, ipRangeEnd: 198.19.0.250}
  routes:
  - {target: 198.19.0.0/24}
  v4AssignMode: [pool]
  tags:
  - {name: department, id: 1000, enum: {eng: 100, ops: 200}}
  capabilities:
  - {name: superuser, id: 7, rules: "accept;"}
  rules: |
    drop not ethertype ipv4 and not ethertype arp;
    accept;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_members_reach_a_real_agent_controller() {
    let mut agent = Agent::start().await;
    let cp = control_plane_with_crds();
    let op = Operator::start(&cp, &agent).await;
    let (client, metrics) = (op.client.clone(), op.metrics.clone());
    let members: Api<NetworkMember> = Api::all(client.clone());
    let nwid = format!("{}000005", agent.address);
    let member_path = format!("/controller/network/{nwid}/member/{MEMBER}");

    // An authorized member with a tag, a capability and a static IP.
    apply(&cp, NETWORK);
    apply(
        &cp,
        &member_yaml(
            "laptop",
            MEMBER,
            true,
            "  tags: {department: ops}\n  capabilities: [superuser]\n  \
             ipAssignments: [198.19.0.9]\n  name: Ada's laptop\n",
        ),
    );
    let m = wait("laptop Ready", async || {
        let m = members.get("laptop").await.ok()?;
        (cond(&m, "Ready")?.0 == "True").then_some(m)
    })
    .await;
    assert_eq!(cond(&m, "Authorized").unwrap().1, "Authorized");
    assert_eq!(m.status.as_ref().unwrap().assigned_ips, vec!["198.19.0.9"]);
    assert!(
        m.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "flatwire.io/deauthorize"),
        "{:?}",
        m.metadata.finalizers
    );
    let (code, mj) = agent.get(&member_path);
    assert_eq!(code, 200, "{mj}");
    assert_eq!(mj["authorized"], true);
    assert_eq!(mj["tags"], serde_json::json!([[1000, 200]]));
    assert_eq!(mj["capabilities"], serde_json::json!([7]));
    assert_eq!(mj["ipAssignments"], serde_json::json!(["198.19.0.9"]));
    assert_eq!(mj["name"], "Ada's laptop");
    assert_eq!(mj["activeBridge"], false);
    let (code, nj) = agent.get(&format!("/controller/network/{nwid}"));
    assert_eq!(code, 200, "{nj}");
    assert_eq!(nj["name"], "lab");
    assert_eq!(nj["ipAssignmentPools"][0]["ipRangeStart"], "198.19.0.10");
    assert_eq!(nj["v4AssignMode"]["zt"], true);
    assert_eq!(nj["capabilities"][0]["id"], 7);

    // A spec change reaches the controller: deauthorized, tag changed.
    apply(
        &cp,
        &member_yaml("laptop", MEMBER, false, "  tags: {department: eng}\n"),
    );
    let mj = wait("laptop deauthorized in the controller", async || {
        let (code, mj) = agent.get(&member_path);
        (code == 200 && mj["authorized"] == false).then_some(mj)
    })
    .await;
    assert_eq!(mj["tags"], serde_json::json!([[1000, 100]]));
    let m = wait("laptop NotAuthorized", async || {
        let m = members.get("laptop").await.ok()?;
        (cond(&m, "Authorized")?.1 == "NotAuthorized").then_some(m)
    })
    .await;
    assert_eq!(cond(&m, "Ready").unwrap().0, "True");

    // An invalid member: Ready=False with the reason, a Warning Event, nothing written.
    apply(
        &cp,
        &member_yaml("odd", "0123456788", true, "  tags: {team: a}\n"),
    );
    let m = wait("odd reported", async || {
        let m = members.get("odd").await.ok()?;
        cond(&m, "Ready").filter(|c| c.0 == "False").map(|_| m)
    })
    .await;
    let (_, reason, msg) = cond(&m, "Ready").unwrap();
    assert_eq!(reason, "UnknownTag");
    assert!(msg.contains("\"team\""), "{msg}");
    assert!(
        events(&cp).iter().any(|e| {
            e["regarding"]["name"] == "odd" && e["reason"] == "UnknownTag" && e["type"] == "Warning"
        }),
        "no UnknownTag Warning Event"
    );
    let (code, _) = agent.get(&format!("/controller/network/{nwid}/member/0123456788"));
    assert_eq!(code, 404, "an invalid member is not written");
    let text = wait("member count in the metrics", async || {
        let t = metrics.encode();
        t.contains("flatwire_operator_network_members 2")
            .then_some(t)
    })
    .await;
    assert!(text.contains("flatwire_operator_networks 1"), "{text}");

    // Deleting the NetworkMember removes it from the controller first.
    kubectl(
        &cp,
        &[
            "delete",
            "networkmember",
            "laptop",
            "--wait=true",
            "--timeout=60s",
        ],
    );
    let (code, body) = agent.get(&member_path);
    assert_eq!(code, 404, "still in the controller: {body}");
    assert!(members.get_opt("laptop").await.unwrap().is_none());
    let (code, list) = agent.get(&format!("/controller/network/{nwid}/member"));
    assert_eq!(code, 200);
    assert!(list.get(MEMBER).is_none(), "{list}");

    let text = metrics.encode();
    assert!(
        text.contains(
            r#"flatwire_operator_reconciles_total{resource="networkmember",result="ok"}"#
        ),
        "{text}"
    );

    assert!(agent.proc.try_status().is_none(), "the agent kept running");

    // The controller goes away: a new member gets Ready=False ControllerError and an Event,
    // and the failed reconciles are counted.
    block_in_place(|| agent.proc.stop());
    apply(&cp, &member_yaml("late", "0123456787", true, ""));
    let m = wait("late reported", async || {
        let m = members.get("late").await.ok()?;
        cond(&m, "Ready").filter(|c| c.0 == "False").map(|_| m)
    })
    .await;
    let (_, reason, msg) = cond(&m, "Ready").unwrap();
    assert_eq!(reason, "ControllerError");
    assert!(msg.contains(&agent.api.to_string()), "{msg}");
    wait("a failed reconcile in the metrics", async || {
        metrics
            .encode()
            .contains(
                r#"flatwire_operator_reconciles_total{resource="networkmember",result="error"}"#,
            )
            .then_some(())
    })
    .await;

    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_the_controller_lacks_gets_its_recorded_ips_back() {
    let mut agent = Agent::start().await;
    let cp = control_plane_with_crds();
    let nwid = format!("{}000005", agent.address);
    let nwid_u64 = u64::from_str_radix(&nwid, 16).unwrap();
    let vm = "0a0b0c0d0e";
    let vm_path = format!("/controller/network/{nwid}/member/{vm}");
    apply(&cp, NETWORK);
    apply(&cp, &member_yaml("vm", vm, true, ""));
    apply(&cp, &member_yaml("bad", "0a0b0c0d0f", true, ""));
    let op = Operator::start(&cp, &agent).await;
    wait("vm in the controller", async || {
        (agent.get(&vm_path).0 == 200).then_some(())
    })
    .await;
    op.stop().await;

    // What the status recorded (the pool address the member had), and a controller that
    // lost the member (as a fresh one after a failover does).
    let status = |ips: &str| format!(r#"{{"status": {{"assignedIPs": {ips}}}}}"#);
    for (name, ips) in [("vm", r#"["198.19.0.99"]"#), ("bad", r#"["nope"]"#)] {
        kubectl(
            &cp,
            &[
                "patch",
                "networkmember",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status(ips),
            ],
        );
    }
    for address in [vm, "0a0b0c0d0f"] {
        agent
            .sink()
            .delete_member(nwid_u64, address)
            .await
            .expect("delete the member in the controller");
    }
    assert_eq!(agent.get(&vm_path).0, 404);

    let op = Operator::start(&cp, &agent).await;
    let mj = wait("vm back in the controller", async || {
        let (code, mj) = agent.get(&vm_path);
        (code == 200).then_some(mj)
    })
    .await;
    assert_eq!(
        mj["ipAssignments"],
        serde_json::json!(["198.19.0.99"]),
        "{mj}"
    );
    assert_eq!(mj["authorized"], true, "{mj}");
    // A bad recorded value is reported and ignored; the member is served all the same.
    let ev = wait("an InvalidAssignedIPs Warning Event", async || {
        events(&cp).into_iter().find(|e| {
            e["regarding"]["name"] == "bad"
                && e["reason"] == "InvalidAssignedIPs"
                && e["type"] == "Warning"
        })
    })
    .await;
    assert!(
        ev["note"].as_str().unwrap_or_default().contains("\"nope\""),
        "{ev}"
    );
    let (code, mj) = agent.get(&format!("/controller/network/{nwid}/member/0a0b0c0d0f"));
    assert_eq!(
        (code, mj["authorized"].clone()),
        (200, serde_json::json!(true)),
        "{mj}"
    );
    let members: Api<NetworkMember> = Api::all(op.client.clone());
    wait("bad Ready", async || {
        let m = members.get("bad").await.ok()?;
        (cond(&m, "Ready")?.0 == "True").then_some(())
    })
    .await;
    op.stop().await;
}
