//! Pod bindings end to end (needs root): a root+controller agent administered through its
//! HTTP API (as the operator does) and a host agent in network namespaces made by the harness.
//! On a `vouchRequiresPod` network the host member is pre-authorized with its identity pinned
//! by POST, a pod attached over gRPC (its member presenting the host's signed vouch) is refused
//! without a binding and with a binding naming another host, and gets in with the binding's
//! tags once it exists; a tag change reaches the member, and deleting the binding deletes the
//! member and revokes it: the host stops answering the pod.

use std::time::{Duration, Instant};

use flatwire_api::v1;
use flatwire_api::{AgentClient, ClientOptions};
use flatwire_tests::netns::{Host, Topology};
use flatwire_vl2::NetworkId;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

mod common;

use common::{assert_root, new_identity, start_agent, start_controller};

/// `method path` with `body` on the controller agent's API (inside `ctl`): (status, JSON).
fn api(ctl: &Host, home: &std::path::Path, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let token = std::fs::read_to_string(home.join("authtoken.secret")).unwrap_or_default();
    let out = ctl
        .run(
            "curl",
            &[
                "-s",
                "-m",
                "5",
                "-w",
                "\n%{http_code}",
                "-X",
                method,
                "-H",
                &format!("X-ZT1-Auth: {}", token.trim()),
                "-d",
                &body.to_string(),
                &format!("http://127.0.0.1:9993{path}"),
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let (b, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(b).unwrap_or(Value::Null),
    )
}

fn ping1(host: &Host, to: &str) -> bool {
    host.run("ping", &["-c", "1", "-W", "1", to])
        .is_ok_and(|o| o.status.success())
}

#[test]
fn vouched_pods_need_a_binding_get_its_tags_and_go_with_it() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let mut lan = topo.switch("lan").unwrap();
    let ctl = topo.host("ctl").unwrap();
    let node = topo.host("node").unwrap();
    topo.plug(&mut lan, &ctl, "198.18.0.1/24").unwrap();
    topo.plug(&mut lan, &node, "198.18.0.2/24").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctl_home = dir.path().join("ctl");
    let node_home = dir.path().join("node");
    let root_id = new_identity(&ctl_home);
    let host_id = new_identity(&node_home);
    let planet = dir.path().join("planet");
    let endpoint: std::net::SocketAddr = "198.18.0.1:9993".parse().unwrap();
    std::fs::write(&planet, flatwire_tests::zt_planet!(root_id, endpoint)).unwrap();
    let planet_arg = planet.to_str().unwrap().to_owned();
    let nwid = NetworkId::new(root_id.address(), 0x00_0001);
    let net = format!("/controller/network/{nwid}");

    let mut ctl_agent = start_controller(&ctl, &ctl_home, &planet);
    let deadline = Instant::now() + Duration::from_secs(20);
    while api(&ctl, &ctl_home, "GET", "/controller", &Value::Null).0 != 200 {
        assert!(ctl_agent.try_status().is_none(), "controller agent exited");
        assert!(
            Instant::now() < deadline,
            "the controller API never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The operator's writes: the network, and the host pre-authorized with its identity.
    let (code, n) = api(
        &ctl,
        &ctl_home,
        "POST",
        &net,
        &json!({
            "name": "pods", "private": true, "vouchRequiresPod": true,
            "ipAssignmentPools": [{"ipRangeStart": "10.78.0.10", "ipRangeEnd": "10.78.0.250"}],
            "routes": [{"target": "10.78.0.0/24", "via": null}],
            "v4AssignMode": {"zt": true},
            "tags": [{"id": 100, "default": 1}],
        }),
    );
    assert_eq!(
        (code, n["vouchRequiresPod"].clone()),
        (200, json!(true)),
        "{n}"
    );
    let host = host_id.address().to_string();
    let host_member = format!("{net}/member/{host}");
    let (code, m) = api(
        &ctl,
        &ctl_home,
        "POST",
        &host_member,
        &json!({"authorized": true, "identity": host_id.to_public().to_string(), "name": "node/n1"}),
    );
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["identity"], host_id.to_public().to_string());
    // Another identity for it is refused with 409.
    let other = flatwire_vl1::Identity::generate(&Default::default()).unwrap();
    let forged = other
        .to_string()
        .replacen(&other.address().to_string(), &host, 1);
    let (code, e) = api(
        &ctl,
        &ctl_home,
        "POST",
        &host_member,
        &json!({"identity": forged}),
    );
    assert_eq!(code, 409, "{e}");
    assert!(
        e["error"].as_str().unwrap_or_default().contains("pinned"),
        "{e}"
    );

    // The host joins (its own request matches the pinned identity) and gets an address.
    let mut node_agent = start_agent(
        &node,
        &node_home,
        &node_home.join("agent.sock"),
        &[
            "--planet",
            &planet_arg,
            "--identity-pool",
            "2",
            "--join",
            &nwid.to_string(),
        ],
    );
    let tap = flatwire_agent::networks::tap_name(nwid);
    let deadline = Instant::now() + Duration::from_secs(30);
    let host_ip = loop {
        assert!(node_agent.try_status().is_none(), "host agent exited");
        if let Some(ip) = node.ipv4_on(&tap) {
            break ip.to_string();
        }
        assert!(Instant::now() < deadline, "the host member got no address");
        std::thread::sleep(Duration::from_millis(50));
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut client: AgentClient<Channel> = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = rt.block_on(async {
                let (mut c, _) = flatwire_api::connect_checked(
                    node_home.join("agent.sock"),
                    ClientOptions::default(),
                )
                .await
                .ok()?;
                let s = c.status(v1::StatusRequest {}).await.ok()?.into_inner();
                s.ready.then_some(c)
            });
            if let Some(c) = got {
                break c;
            }
            assert!(Instant::now() < deadline, "the host agent never got ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut attach = |pod: &Host| {
        rt.block_on(client.attach(common::attach_request(pod, nwid, v1::Mode::Secondary)))
    };
    let p1 = topo.host("p1").unwrap();
    let p2 = topo.host("p2").unwrap();

    // No binding: refused.
    let e = attach(&p1).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A binding on another host: refused.
    let wrong =
        json!({"namespace": "default", "name": "p2", "host": root_id.address().to_string()});
    assert_eq!(
        api(
            &ctl,
            &ctl_home,
            "POST",
            &format!("{net}/pod/uid-p2"),
            &wrong
        )
        .0,
        200
    );
    let e = attach(&p2).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The binding: p1 gets in with its tags.
    let binding = format!("{net}/pod/uid-p1");
    let body = json!({"namespace": "default", "name": "p1", "host": host, "tags": [[100, 2]]});
    let (code, b) = api(&ctl, &ctl_home, "POST", &binding, &body);
    assert_eq!(code, 200, "{b}");
    let t = Instant::now();
    let r = attach(&p1)
        .expect("attach with a binding")
        .into_inner()
        .result
        .unwrap();
    eprintln!("attach with a binding took {:?}", t.elapsed());
    let member = format!("{net}/member/{}", r.member_address);
    let (code, m) = api(&ctl, &ctl_home, "GET", &member, &Value::Null);
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["authorized"], true, "{m}");
    assert_eq!(m["lastAuthorizedCredentialType"], "vouch", "{m}");
    assert_eq!(m["tags"], json!([[100, 2]]), "{m}");
    let (_, b) = api(&ctl, &ctl_home, "GET", &binding, &Value::Null);
    assert_eq!(b["members"], json!([r.member_address]), "{b}");
    let (_, list) = api(&ctl, &ctl_home, "GET", &format!("{net}/pod"), &Value::Null);
    assert_eq!(list.as_object().map(|m| m.len()), Some(2), "{list}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ping1(&p1, &host_ip) {
        assert!(
            Instant::now() < deadline,
            "p1 never reached the host member"
        );
    }

    // A tag change reaches the member.
    let body = json!({"namespace": "default", "name": "p1", "host": host, "tags": [[100, 3]]});
    assert_eq!(api(&ctl, &ctl_home, "POST", &binding, &body).0, 200);
    let (_, m) = api(&ctl, &ctl_home, "GET", &member, &Value::Null);
    assert_eq!(m["tags"], json!([[100, 3]]), "{m}");

    // Deleting the binding deletes the member and revokes it: the host stops answering p1.
    let (code, _) = api(&ctl, &ctl_home, "DELETE", &binding, &Value::Null);
    assert_eq!(code, 200);
    let t = Instant::now();
    assert_eq!(api(&ctl, &ctl_home, "GET", &member, &Value::Null).0, 404);
    assert_eq!(api(&ctl, &ctl_home, "GET", &binding, &Value::Null).0, 404);
    assert_eq!(
        api(&ctl, &ctl_home, "DELETE", &binding, &Value::Null).0,
        404
    );
    while ping1(&p1, &host_ip) {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "p1 still reaches the host member after its binding went"
        );
    }
    eprintln!("p1 cut off {:?} after the binding was deleted", t.elapsed());
    // The host member itself is untouched.
    let (_, h) = api(&ctl, &ctl_home, "GET", &host_member, &Value::Null);
    assert_eq!(h["authorized"], true, "{h}");

    node_agent.stop();
    ctl_agent.stop();
    topo.teardown().unwrap();
}
