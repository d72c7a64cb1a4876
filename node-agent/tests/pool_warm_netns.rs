//! Pool identities introduced to the root ahead of use (needs root): a root+controller agent
//! and a host agent whose identity pool holds four identities from an earlier run. The host
//! agent warms each of them (a standby node says HELLO to the root), so the root validates
//! them before any pod exists; attaching a pod then takes one of them and costs the root no
//! identity validation (its `flatwire_identity_validations_total` counter stays put), and the
//! pod reaches its gateway.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use flatwire_api::v1;
use flatwire_api::{AgentClient, ClientOptions};
use flatwire_tests::netns::{Host, Topology};
use flatwire_vl1::Address;
use flatwire_vl2::NetworkId;
use tonic::transport::Channel;

mod common;

use common::{assert_root, new_identity, start_agent, start_controller, write_network};

/// Pool identities left by an "earlier run".
const PREFILLED: usize = 4;

/// The root's identity validations so far, from its metrics endpoint (loopback in `host`).
fn validations(host: &Host) -> u64 {
    let out = host
        .run("curl", &["-s", "-m", "5", "http://127.0.0.1:9994/metrics"])
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("flatwire_identity_validations_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no identity validation counter in:\n{text}"))
}

/// A client of the agent at `socket`, once its Status is ready.
fn client(rt: &tokio::runtime::Runtime, socket: &Path) -> AgentClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = rt.block_on(async {
            let (mut c, _) = flatwire_api::connect_checked(socket, ClientOptions::default())
                .await
                .ok()?;
            let s = c.status(v1::StatusRequest {}).await.ok()?.into_inner();
            s.ready.then_some(c)
        });
        if let Some(c) = got {
            return c;
        }
        assert!(Instant::now() < deadline, "the host agent never got ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn warmed_pool_identity_attaches_without_a_validation_at_the_root() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let mut lan = topo.switch("lan").unwrap();
    let ctl_host = topo.host("ctl").unwrap();
    let host = topo.host("node").unwrap();
    let pod = topo.host("pod").unwrap();
    topo.plug(&mut lan, &ctl_host, "198.18.0.1/24").unwrap();
    topo.plug(&mut lan, &host, "198.18.0.2/24").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ctl_home, home) = (dir.path().join("ctl"), dir.path().join("node"));
    let root_id = new_identity(&ctl_home);
    let host_id = new_identity(&home);
    let planet = dir.path().join("planet");
    let endpoint: std::net::SocketAddr = "198.18.0.1:9993".parse().unwrap();
    std::fs::write(&planet, flatwire_tests::zt_planet!(root_id, endpoint)).unwrap();
    let net = NetworkId::new(root_id.address(), 0x00_0001);
    write_network(&ctl_home, net, "10.78.0", &[&host_id]);
    // The pool of an earlier run: more files than the target depth, so nothing is generated
    // (and warmed) while the test runs.
    let pool_dir = home.join("pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let mut pooled = HashSet::new();
    for _ in 0..PREFILLED {
        let id = flatwire_vl1::Identity::generate(&Default::default()).unwrap();
        std::fs::write(
            pool_dir.join(format!("{}.secret", id.address())),
            id.to_secret_string().unwrap(),
        )
        .unwrap();
        pooled.insert(id.address());
    }

    let planet_arg = planet.to_str().unwrap().to_string();
    let mut ctl = start_controller(&ctl_host, &ctl_home, &planet);
    let net_arg = net.to_string();
    let mut agent = start_agent(
        &host,
        &home,
        &home.join("agent.sock"),
        &[
            "--planet",
            &planet_arg,
            "--identity-pool",
            "2",
            "--join",
            &net_arg,
        ],
    );

    // The host identity and every pooled one are validated by the root, with no pod yet.
    let expected = 1 + PREFILLED as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = validations(&ctl_host);
    while seen < expected {
        assert!(agent.try_status().is_none(), "host agent exited");
        assert!(
            Instant::now() < deadline,
            "the root validated {seen} identities, expected {expected} (host + pool)"
        );
        std::thread::sleep(Duration::from_millis(100));
        seen = validations(&ctl_host);
    }
    assert_eq!(seen, expected, "only the host and the pool were validated");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut c = client(&rt, &home.join("agent.sock"));
    let tap = flatwire_agent::networks::tap_name(net);
    let deadline = Instant::now() + Duration::from_secs(30);
    let host_ip = loop {
        if let Some(ip) = host.ipv4_on(&tap) {
            break ip;
        }
        assert!(Instant::now() < deadline, "the host member got no address");
        std::thread::sleep(Duration::from_millis(50));
    };
    let req = common::attach_request(&pod, net, v1::Mode::Primary);
    let t = Instant::now();
    let r = rt
        .block_on(c.attach(req))
        .expect("attach succeeds")
        .into_inner()
        .result
        .expect("a result");
    let took = t.elapsed();
    eprintln!("attach took {took:?}: {r:?}");
    let member: Address = r.member_address.parse().unwrap();
    assert!(
        pooled.contains(&member),
        "the pod took a pool identity ({member} not in {pooled:?})"
    );
    assert!(
        r.addresses[0].address.starts_with("10.78.0."),
        "the pod got its address: {r:?}"
    );
    let out = pod
        .run(
            "ping",
            &["-c", "3", "-W", "1", "-i", "0.2", &host_ip.to_string()],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "the pod reaches its gateway:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Published once a second: give the root's counter time to show a late validation.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        validations(&ctl_host),
        expected,
        "attaching the warmed identity made the root validate an identity"
    );

    agent.stop();
    ctl.stop();
    topo.teardown().unwrap();
}
