//! The real `cnitool` with the reference `bridge` + `host-local` plugins, inside harness
//! namespaces (the bridge lives in a "node" namespace, never in the root namespace).

use flatwire_tests::netns::Topology;
use flatwire_tests::tools;

#[test]
fn cnitool_adds_checks_and_deletes_a_bridge_interface() {
    let mut t = Topology::new().unwrap();
    let node = t.host("node").unwrap();
    let pod = t.host("pod").unwrap();
    let conf = tempfile::tempdir().unwrap();
    let ipam_dir = conf.path().join("ipam");
    std::fs::write(
        conf.path().join("10-smoke.conflist"),
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "fwsmoke",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": "198.18.64.0/24" }]],
                    "dataDir": ipam_dir,
                },
            }],
        })
        .to_string(),
    )
    .unwrap();
    let cnitool = tools::bin("cnitool").expect("cnitool (run `cargo xtask tools`)");
    let plugins = tools::cni_plugin_dir().expect("CNI plugins (run `cargo xtask tools`)");
    let cni = |verb: &str| {
        let out = node
            .command(&cnitool)
            .args([verb, "fwsmoke", &pod.netns_path()])
            .env("NETCONFPATH", conf.path())
            .env("CNI_PATH", &plugins)
            .env("CNI_IFNAME", "eth0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cnitool {verb}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let result: serde_json::Value = serde_json::from_str(&cni("add")).unwrap();
    let ip = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("198.18.64."), "{result}");
    let addrs = pod
        .run("ip", &["-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&addrs.stdout).contains(&ip),
        "{ip} not on the pod's eth0"
    );
    // The node reaches the pod through the bridge.
    let pod_ip = ip.split('/').next().unwrap();
    node.run("ping", &["-c", "1", "-W", "2", pod_ip]).unwrap();

    cni("check");
    cni("del");
    let gone = pod.run("ip", &["link", "show", "eth0"]);
    assert!(gone.is_err(), "eth0 is still in the pod after DEL");
}
