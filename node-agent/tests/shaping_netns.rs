//! Pod bandwidth limits ([`flatwire_agent::shaping`]) on a real link between two harness
//! namespaces, measured with the real `iperf3` in both directions (needs root).

use std::process::Stdio;
use std::time::{Duration, Instant};

use flatwire_agent::shaping::{self, Bandwidth, ShapingError};
use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::process::Proc;

const MBIT: u64 = 1_000_000;
const PORT: &str = "5301";

/// Mbit/s of a 3 s `iperf3` run from `client` to `server` at `to` (`reverse`: the server
/// sends).
fn iperf_mbit(server: &Host, client: &Host, to: &str, reverse: bool) -> f64 {
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "-p", PORT])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut srv = Proc::spawn("iperf3 server", &mut cmd).expect("iperf3 is needed");
    let start = Instant::now();
    loop {
        let out = server
            .run("ss", &["-Hltn", &format!("sport = :{PORT}")])
            .unwrap();
        if !out.stdout.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "iperf3 never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut args = vec!["-c", to, "-p", PORT, "-J", "-t", "3"];
    if reverse {
        args.push("-R");
    }
    let out = client.run("iperf3", &args).unwrap();
    srv.stop();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no throughput in {report}"))
        / MBIT as f64
}

fn qdiscs(host: &Host, dev: &str) -> String {
    let out = host.run("tc", &["qdisc", "show", "dev", dev]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn limits_shape_both_directions_check_and_go_away() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces, tc)"
    );
    let mut topo = Topology::new().unwrap();
    let pod = topo.host("pod").unwrap();
    let peer = topo.host("peer").unwrap();
    let (pod_if, _) = topo
        .link(&pod, "198.18.7.1/24", &peer, "198.18.7.2/24")
        .unwrap();
    let ns = std::path::PathBuf::from(pod.netns_path());
    let limits = Bandwidth {
        ingress_rate: 10 * MBIT,
        ingress_burst: 160_000,
        egress_rate: 20 * MBIT,
        egress_burst: 160_000,
    };

    // Nonsense is refused before anything changes.
    let bad = Bandwidth {
        egress_rate: MBIT,
        ..Bandwidth::default()
    };
    let e = shaping::apply(&ns, &pod_if, bad, 1500).unwrap_err();
    assert!(matches!(e, ShapingError::Invalid(_)), "{e}");
    assert!(!qdiscs(&pod, &pod_if).contains("tbf"));
    let e = shaping::apply(&ns, "nope0", limits, 1500).unwrap_err();
    assert!(matches!(e, ShapingError::NoInterface(_)), "{e}");

    shaping::apply(&ns, &pod_if, limits, 1500).unwrap();
    // Applying again replaces, it does not stack or fail.
    shaping::apply(&ns, &pod_if, limits, 1500).unwrap();
    shaping::check(&ns, &pod_if, limits).unwrap();
    let other = Bandwidth {
        ingress_rate: 5 * MBIT,
        ..limits
    };
    let e = shaping::check(&ns, &pod_if, other).unwrap_err();
    assert!(
        e.to_string()
            .contains("ingress rate of eth0 is 10000000 bit/s"),
        "{e}"
    );

    let egress = iperf_mbit(&peer, &pod, "198.18.7.2", false);
    let ingress = iperf_mbit(&peer, &pod, "198.18.7.2", true);
    eprintln!("shaped: egress {egress:.1} Mbit/s (limit 20), ingress {ingress:.1} (limit 10)");
    assert!((10.0..=23.0).contains(&egress), "egress {egress} Mbit/s");
    assert!((5.0..=11.5).contains(&ingress), "ingress {ingress} Mbit/s");

    shaping::remove(&ns, &pod_if).unwrap();
    shaping::remove(&ns, &pod_if).unwrap();
    shaping::check(&ns, &pod_if, Bandwidth::default()).unwrap();
    assert!(!qdiscs(&pod, &pod_if).contains("tbf"));
    let links = pod.run("ip", &["-o", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("fwifb"),
        "the ifb device stayed"
    );
    let free = iperf_mbit(&peer, &pod, "198.18.7.2", true);
    eprintln!("unshaped: ingress {free:.1} Mbit/s");
    assert!(free > 100.0, "ingress still limited: {free} Mbit/s");
    // A namespace whose interface is gone is fine to clean.
    shaping::remove(&ns, "nope0").unwrap();
}
