//! Pod bandwidth limits ([`flatwire_agent::shaping`]) on a real link between two harness
//! namespaces, measured with the real `iperf3` in both directions (needs root).

use flatwire_agent::shaping::{self, Bandwidth, ShapingError};
use flatwire_tests::netns::{Host, Topology};

const MBIT: u64 = 1_000_000;
const PORT: u16 = 5301;

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

    let egress = pod
        .iperf3_mbit(&peer, "198.18.7.2", PORT, 3, false)
        .unwrap();
    let ingress = pod.iperf3_mbit(&peer, "198.18.7.2", PORT, 3, true).unwrap();
    eprintln!("shaped: egress {egress:.1} Mbit/s (limit 20), ingress {ingress:.1} (limit 10)");
    assert!((10.0..=23.0).contains(&egress), "egress {egress} Mbit/s");
    assert!((5.0..=11.5).contains(&ingress), "ingress {ingress} Mbit/s");

    shaping::remove(&ns, &pod_if).unwrap();
    shaping::remove(&ns, &pod_if).unwrap();
    shaping::check(&ns, &pod_if, Bandwidth::default()).unwrap();
    assert!(!qdiscs(&pod, &pod_if).contains("tbf"));
    let links = pod.run("ip", &["-o", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("fwb"),
        "the ifb device stayed"
    );
    let free = pod.iperf3_mbit(&peer, "198.18.7.2", PORT, 3, true).unwrap();
    eprintln!("unshaped: ingress {free:.1} Mbit/s");
    assert!(free > 100.0, "ingress still limited: {free} Mbit/s");
    // A namespace whose interface is gone is fine to clean.
    shaping::remove(&ns, "nope0").unwrap();
}
