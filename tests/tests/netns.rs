//! The netns harness: real namespaces, veth, bridges, NAT routers and iperf3 between them.

use std::time::{Duration, Instant};

use flatwire_tests::HarnessError;
use flatwire_tests::netns::{Host, Nat, Topology, harness_namespaces, sweep_stale};
use flatwire_tests::process::{Proc, alive};
use flatwire_tests::tools;

/// Runs an iperf3 client from `client` to `server_ip` (a server started with `-1`), retrying
/// while the server comes up; returns the client's JSON report.
fn iperf3_client(client: &Host, server_ip: &str) -> serde_json::Value {
    let iperf3 = tools::bin("iperf3").expect("iperf3 (run `cargo xtask tools`)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = client
            .command(&iperf3)
            .args(["-c", server_ip, "-t", "1", "-J"])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if out.status.success() && report.get("error").is_none() {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "iperf3 client never connected: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn iperf3_between_two_namespaces_moves_bits() {
    let mut t = Topology::new().unwrap();
    let a = t.host("a").unwrap();
    let b = t.host("b").unwrap();
    t.link(&a, "198.18.0.1/30", &b, "198.18.0.2/30").unwrap();
    let iperf3 = tools::bin("iperf3").unwrap();
    t.spawn(
        &b,
        iperf3.to_str().unwrap(),
        &["-s", "-1", "-B", "198.18.0.2"],
    )
    .unwrap();
    let report = iperf3_client(&a, "198.18.0.2");
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {report}"));
    assert!(bps > 0.0, "iperf3 reported {bps} bit/s");
}

#[test]
fn nat_routers_rewrite_sources_and_hosts_on_a_switch_reach_each_other() {
    for nat in [Nat::Masquerade, Nat::Symmetric] {
        let mut t = Topology::new().unwrap();
        let mut wan = t.switch("wan").unwrap();
        let mut lan = t.switch("lan").unwrap();
        let outside = t.host("out").unwrap();
        let router = t.host("nat").unwrap();
        let inside = t.host("in").unwrap();
        t.plug(&mut wan, &outside, "198.18.1.10/24").unwrap();
        let wan_if = t.plug(&mut wan, &router, "198.18.1.1/24").unwrap();
        let lan_if = t.plug(&mut lan, &router, "198.19.1.1/24").unwrap();
        t.plug(&mut lan, &inside, "198.19.1.10/24").unwrap();
        t.route(&inside, "default", "198.19.1.1").unwrap();
        t.nat_router(&router, &lan_if, &wan_if, nat).unwrap();

        let rules = router
            .run("iptables", &["-t", "nat", "-S", "POSTROUTING"])
            .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(rules.contains("MASQUERADE"), "{rules}");
        assert_eq!(
            rules.contains("--random-fully"),
            nat == Nat::Symmetric,
            "{rules}"
        );

        let iperf3 = tools::bin("iperf3").unwrap();
        let server = outside
            .command(&iperf3)
            .args(["-s", "-1", "-J", "-B", "198.18.1.10"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        iperf3_client(&inside, "198.18.1.10");
        let out = server.wait_with_output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["start"]["connected"][0]["remote_host"], "198.18.1.1",
            "{nat:?}: the server must see the router's WAN address"
        );
        // Nothing unsolicited gets in: the outside host has no way to the LAN.
        assert!(
            outside
                .run("ping", &["-c", "1", "-W", "1", "198.19.1.10"])
                .is_err()
        );
    }
}

#[test]
fn routes_and_addresses_off_the_test_ranges_are_refused() {
    let mut t = Topology::new().unwrap();
    let a = t.host("a").unwrap();
    let b = t.host("b").unwrap();
    t.link(&a, "198.18.2.1/24", &b, "198.18.2.2/24").unwrap();
    for gw in ["198.18.2.3", "10.0.0.1", "192.168.1.1", "not-an-ip"] {
        assert!(
            matches!(t.route(&a, "default", gw), Err(HarnessError::Refused(_))),
            "gateway {gw} must be refused"
        );
    }
    assert!(matches!(
        t.address(&a, "eth0", "10.1.2.3/8"),
        Err(HarnessError::Refused(_))
    ));
    assert!(matches!(t.host("../etc"), Err(HarnessError::Refused(_))));
    t.route(&a, "default", "198.18.2.2").unwrap();
    // The namespace's only default route points at the other test host.
    let routes = a.run("ip", &["route", "show", "default"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&routes.stdout).trim(),
        "default via 198.18.2.2 dev eth0"
    );
}

fn assert_gone(namespaces: &[String], pids: &[u32]) {
    let left = harness_namespaces();
    for ns in namespaces {
        assert!(!left.contains(ns), "namespace {ns} was left behind");
        assert!(!std::path::Path::new("/run/netns").join(ns).exists());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for ns in namespaces {
        assert!(
            !mounts.contains(ns.as_str()),
            "mount of {ns} was left behind"
        );
    }
    for pid in pids {
        assert!(!alive(*pid), "process {pid} was left behind");
    }
}

#[test]
fn teardown_leaves_no_namespace_mount_or_process_also_on_panic() {
    let build = || {
        let mut t = Topology::new().unwrap();
        let a = t.host("a").unwrap();
        let b = t.host("b").unwrap();
        t.link(&a, "198.18.3.1/30", &b, "198.18.3.2/30").unwrap();
        t.spawn(&a, "sleep", &["600"]).unwrap();
        t
    };
    let t = build();
    let (namespaces, pids) = (t.namespaces().to_vec(), t.pids());
    assert_eq!(namespaces.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));
    drop(t);
    assert_gone(&namespaces, &pids);

    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let t = build();
        tx.send((t.namespaces().to_vec(), t.pids())).unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(panicked.is_err());
    let (namespaces, pids) = rx.recv().unwrap();
    assert_gone(&namespaces, &pids);
}

#[test]
fn the_sweeper_removes_namespaces_of_dead_runs_only() {
    let mut gone = Proc::spawn("true", &mut std::process::Command::new("true")).unwrap();
    let dead_pid = gone.pid();
    gone.wait_timeout(Duration::from_secs(5)).unwrap();
    drop(gone);
    let stale = format!("fw-{dead_pid}-0-stale");
    flatwire_tests::netns::run_checked(
        std::process::Command::new("ip").args(["netns", "add", &stale]),
    )
    .unwrap();
    let mut live = Topology::new().unwrap();
    let mine = live.host("live").unwrap();

    // Tests run in parallel and every new topology sweeps, so another test may have removed
    // it first; either way it must be gone, and the live namespace must stay.
    sweep_stale().unwrap();
    let left = harness_namespaces();
    assert!(!left.contains(&stale));
    assert!(
        left.contains(&mine.ns().to_owned()),
        "a live run's namespace was swept"
    );
}

/// What a killed run leaves behind must not fail tests that start together: every new
/// topology sweeps, and each sweep finds namespaces another sweep is deleting.
#[test]
fn topologies_started_together_sweep_without_tripping_over_each_other() {
    let mut gone = Proc::spawn("true", &mut std::process::Command::new("true")).unwrap();
    let dead_pid = gone.pid();
    gone.wait_timeout(Duration::from_secs(5)).unwrap();
    drop(gone);
    let stale: Vec<String> = (0..6).map(|i| format!("fw-{dead_pid}-{i}-race")).collect();
    for ns in &stale {
        flatwire_tests::netns::run_checked(
            std::process::Command::new("ip").args(["netns", "add", ns]),
        )
        .unwrap();
    }
    // One sweep runs in another process at the same time, as a second test binary would.
    let mut outside = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for ns in {}; do ip netns del $ns 2>/dev/null; done; true",
            stale.join(" ")
        ))
        .spawn()
        .unwrap();
    let starts: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(|| Topology::new().map(drop)))
        .collect();
    for s in starts {
        s.join().unwrap().expect("a topology failed to start");
    }
    assert!(outside.wait().unwrap().success());
    let left = harness_namespaces();
    for ns in &stale {
        assert!(!left.contains(ns), "{ns} survived the sweep");
    }
}
