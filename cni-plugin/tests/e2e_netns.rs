//! The plugin end to end (needs root): a controller agent (also the planet's root) and a host
//! agent in harness namespaces; the real `cnitool` runs the installed conflist (flatwire
//! chained with the reference portmap and tuning plugins) for two pod namespaces,
//! the pods ping each other over the flat network, CHECK passes and catches a removed address,
//! GC removes a leaked attachment and keeps the valid ones, portmap forwards a host port to a
//! pod (iperf3 through the DNAT), flatwire chained after loopback appends to its result, DEL
//! removes everything, twice, and the agent's refusals (unknown network, exhausted pool) come
//! back as actionable CNI errors.

use std::time::{Duration, Instant};

use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::process::Proc;
use flatwire_vl2::NetworkId;

mod common;

use common::{
    CniEnv, Run, assert_root, attachments, netconf, new_identity, plugin, result_ip, start_agent,
    wait_socket, write_planet,
};

fn ok(run: Run, what: &str) -> Run {
    assert!(run.ok, "{what}: {run:?}");
    run
}

fn ping(from: &Host, to: &str) -> bool {
    from.run("ping", &["-c", "2", "-i", "0.2", "-W", "2", to])
        .is_ok()
}

/// Waits until `from` pings `to` (the first packets may wait for WHOIS and ARP).
fn wait_ping(from: &Host, to: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !ping(from, to) {
        assert!(
            Instant::now() < deadline,
            "{} cannot ping {to} within {limit:?}",
            from.name()
        );
    }
}

#[test]
fn cnitool_attaches_two_pods_that_ping_with_check_gc_portmap_and_del() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let mut lan = topo.switch("lan").unwrap();
    let ctl = topo.host("ctl").unwrap();
    let node = topo.host("node").unwrap();
    let pods: Vec<Host> = ["pod1", "pod2", "pod3"]
        .iter()
        .map(|n| topo.host(n).unwrap())
        .collect();
    topo.plug(&mut lan, &ctl, "198.18.0.1/24").unwrap();
    topo.plug(&mut lan, &node, "198.18.0.2/24").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| dir.path().join(n);

    // The planet (ctl is its root) and the network on ctl's controller: private, an overlay
    // pool in 198.19.77.0/24 plus RFC 4193 IPv6, the host member authorized. Pods are
    // authorized by the host's vouch.
    let root_id = new_identity(&home("ctl"));
    let host_id = new_identity(&home("node"));
    let planet = dir.path().join("planet");
    write_planet(&planet, &root_id, "198.18.0.1:9993");
    let planet = planet.to_str().unwrap();
    let nwid = NetworkId::new(root_id.address(), 0x00_0042).to_string();
    let net_dir = home("ctl").join("controller.d/network");
    std::fs::create_dir_all(net_dir.join(&nwid).join("member")).unwrap();
    std::fs::write(
        net_dir.join(format!("{nwid}.json")),
        serde_json::json!({
            "id": nwid, "nwid": nwid, "name": "pods", "private": true, "mtu": 2800,
            "ipAssignmentPools": [{"ipRangeStart": "198.19.77.10", "ipRangeEnd": "198.19.77.99"}],
            "routes": [{"target": "198.19.77.0/24", "via": null}],
            "v4AssignMode": {"zt": true},
            "v6AssignMode": {"rfc4193": true}
        })
        .to_string(),
    )
    .unwrap();
    // Two more networks: "tiny" (its pool yields two addresses, one for the host: like
    // ZeroTier's controller, a range's last address is only used when it is also its first) and
    // "closed" (the host is not a member, so it cannot vouch for pods there).
    let tiny = NetworkId::new(root_id.address(), 0x00_0043).to_string();
    let closed = NetworkId::new(root_id.address(), 0x00_0044).to_string();
    for (net, pool) in [(&tiny, "198.19.78"), (&closed, "198.19.79")] {
        std::fs::create_dir_all(net_dir.join(net).join("member")).unwrap();
        std::fs::write(
            net_dir.join(format!("{net}.json")),
            serde_json::json!({
                "id": net, "nwid": net, "name": "small", "private": true,
                "ipAssignmentPools": [{"ipRangeStart": format!("{pool}.10"),
                    "ipRangeEnd": format!("{pool}.12")}],
                "routes": [{"target": format!("{pool}.0/24"), "via": null}],
                "v4AssignMode": {"zt": true}
            })
            .to_string(),
        )
        .unwrap();
    }
    let host_addr = host_id.address().to_string();
    for net in [&nwid, &tiny] {
        std::fs::write(
            net_dir
                .join(net)
                .join("member")
                .join(format!("{host_addr}.json")),
            serde_json::json!({"id": host_addr, "address": host_addr, "nwid": net,
                "authorized": true})
            .to_string(),
        )
        .unwrap();
    }

    let ctl_sock = home("ctl").join("agent.sock");
    let mut controller = start_agent(
        &ctl,
        &home("ctl"),
        &ctl_sock,
        &["--planet", planet, "--root", "--controller"],
    );
    wait_socket(&mut controller, &ctl_sock, Duration::from_secs(10));
    let socket = home("node").join("agent.sock");
    let mut agent: Proc = start_agent(
        &node,
        &home("node"),
        &socket,
        &["--planet", planet, "--join", &nwid, "--join", &tiny],
    );
    wait_socket(&mut agent, &socket, Duration::from_secs(10));

    let cni = CniEnv::install(&nwid, &socket);
    // Ready (STATUS through the whole chain) once the root answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cni.cnitool(&node, "status", pods[0].netns_path(), &[]).ok {
        assert!(Instant::now() < deadline, "the agent never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }

    // ADD two pods; pod1 with a port mapping for portmap (host 8080 -> pod 5201) and bandwidth
    // limits (shaped by the agent in pod1's namespace: 10 Mbit/s out, 20 Mbit/s in).
    let cap = r#"{"portMappings":[{"hostPort":8080,"containerPort":5201,"protocol":"tcp"}],
        "bandwidth":{"ingressRate":20000000,"ingressBurst":1000000,
                     "egressRate":10000000,"egressBurst":1000000}}"#;
    let started = Instant::now();
    let add1 = ok(
        cni.cnitool(
            &node,
            "add",
            pods[0].netns_path(),
            &[
                ("CAP_ARGS", cap),
                // As kubelet passes them: the reference plugins refuse unknown keys without IgnoreUnknown.
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_UID=u1",
                ),
            ],
        ),
        "cnitool add pod1",
    );
    eprintln!("cnitool add pod1 took {:?}", started.elapsed());
    let add2 = ok(
        cni.cnitool(&node, "add", pods[1].netns_path(), &[]),
        "cnitool add pod2",
    );
    let r1 = add1.json.expect("ADD prints a result");
    let r2 = add2.json.expect("ADD prints a result");
    assert_eq!(r1["cniVersion"], "1.1.0");
    let iface = &r1["interfaces"][0];
    assert_eq!(iface["name"], "eth0", "{r1}");
    assert_eq!(iface["sandbox"], pods[0].netns_path().as_str(), "{r1}");
    assert_eq!(iface["mtu"], 2800, "{r1}");
    let mac = iface["mac"].as_str().unwrap().to_owned();
    let ip1 = result_ip(&r1, true);
    let ip2 = result_ip(&r2, true);
    assert!(ip1.starts_with("198.19.77."), "{r1}");
    assert_ne!(ip1, ip2);
    let ip1_v6 = result_ip(&r1, false);
    assert!(ip1_v6.starts_with("fd"), "{r1}");
    for ip in r1["ips"].as_array().unwrap() {
        assert_eq!(ip["interface"], 0, "{r1}");
        assert!(
            ip["gateway"].is_string(),
            "primary mode has a gateway: {r1}"
        );
    }
    assert!(
        r1["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0"),
        "{r1}"
    );
    // The live interface matches the result.
    let link = pods[0]
        .run("ip", &["-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert!(link.contains(&format!("{ip1}/")), "{link}");
    let link = pods[0]
        .run("ip", &["-o", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains(&mac));
    // The same ADD again is idempotent at the agent: the same addresses.
    let again = ok(
        cni.cnitool(&node, "add", pods[1].netns_path(), &[]),
        "repeated add",
    );
    assert_eq!(result_ip(&again.json.unwrap(), true), ip2);

    // The pods reach each other over the flat network (v4 and v6).
    wait_ping(&pods[0], &ip2, Duration::from_secs(10));
    wait_ping(&pods[1], &ip1, Duration::from_secs(10));
    wait_ping(&pods[1], &ip1_v6, Duration::from_secs(10));

    // pod1's limits hold over the flat network, in both directions.
    let out = pods[0].iperf3_mbit(&pods[1], &ip2, 5302, 3, false).unwrap();
    let into = pods[0].iperf3_mbit(&pods[1], &ip2, 5302, 3, true).unwrap();
    eprintln!("pod1 shaped: {out:.1} Mbit/s out (limit 10), {into:.1} Mbit/s in (limit 20)");
    assert!((4.0..=11.5).contains(&out), "pod1 sent {out} Mbit/s");
    assert!((8.0..=23.0).contains(&into), "pod1 received {into} Mbit/s");

    // CHECK passes; then catches a removed address.
    ok(
        cni.cnitool(&node, "check", pods[0].netns_path(), &[("CAP_ARGS", cap)]),
        "cnitool check pod1",
    );
    ok(
        cni.cnitool(&node, "check", pods[1].netns_path(), &[]),
        "cnitool check pod2",
    );
    let slower = cap.replace("20000000", "5000000");
    let bad = cni.cnitool(
        &node,
        "check",
        pods[0].netns_path(),
        &[("CAP_ARGS", &slower)],
    );
    assert!(!bad.ok, "CHECK missed other bandwidth limits: {bad:?}");
    assert!(bad.stderr.contains("ingress rate"), "{bad:?}");
    pods[1]
        .run("ip", &["addr", "del", &format!("{ip2}/24"), "dev", "eth0"])
        .unwrap();
    let bad = cni.cnitool(&node, "check", pods[1].netns_path(), &[]);
    assert!(!bad.ok, "CHECK missed a removed address: {bad:?}");
    assert!(bad.stderr.contains("missing"), "{bad:?}");
    pods[1]
        .run("ip", &["addr", "add", &format!("{ip2}/24"), "dev", "eth0"])
        .unwrap();

    // portmap: a TCP connection from ctl to the node's port 8080 reaches pod1's iperf3.
    node.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let nat = node.run("iptables", &["-t", "nat", "-S"]).unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
    assert!(
        nat.contains(&format!("--to-destination {ip1}:5201")),
        "no DNAT to pod1 in the node's nat table:\n{nat}"
    );
    topo.spawn(&pods[0], "iperf3", &["-s", "-1", "-p", "5201"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ctl.run(
            "iperf3",
            &[
                "-c",
                "198.18.0.2",
                "-p",
                "8080",
                "-t",
                "1",
                "--connect-timeout",
                "2000",
            ],
        );
        match out {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                assert!(text.contains("receiver"), "{text}");
                eprintln!(
                    "iperf3 through portmap: {}",
                    text.lines().rev().nth(2).unwrap_or("")
                );
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "iperf3 ctl -> node:8080 -> pod1:5201 failed: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // GC: a leaked attachment (added directly, unknown to the runtime) goes, the valid stay.
    let leak_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "leaked0"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", &pods[2].netns_path()),
    ];
    let conf = netconf(
        "1.1.0",
        &socket,
        serde_json::json!({"name": "flatwire", "network": nwid}),
    );
    ok(plugin(&leak_env, &conf), "direct ADD of the leak");
    let before = attachments(&socket);
    assert_eq!(before.len(), 3, "{before:?}");
    let valid: Vec<serde_json::Value> = before
        .iter()
        .filter_map(|a| a.key.as_ref())
        .filter(|k| k.container_id != "leaked0")
        .map(|k| serde_json::json!({"containerID": k.container_id, "ifname": k.ifname}))
        .collect();
    let gc_conf = netconf(
        "1.1.0",
        &socket,
        serde_json::json!({"name": "flatwire", "network": nwid,
            "cni.dev/valid-attachments": valid}),
    );
    ok(plugin(&[("CNI_COMMAND", "GC")], &gc_conf), "GC");
    let after = attachments(&socket);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after
            .iter()
            .all(|a| a.key.as_ref().unwrap().container_id != "leaked0")
    );
    assert!(
        pods[2].run("ip", &["link", "show", "eth0"]).is_err(),
        "the leaked pod still has eth0 after GC"
    );
    wait_ping(&pods[0], &ip2, Duration::from_secs(5));

    // flatwire after another plugin: its result is appended to the prevResult (loopback's).
    std::fs::write(
        cni.conf_dir().join("20-flatwire-lo.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "flatwire-lo",
            "plugins": [
                {"type": "loopback"},
                {"type": "flatwire-cni", "network": nwid, "agentSocket": socket},
            ],
        })
        .to_string(),
    )
    .unwrap();
    let chained =
        |verb: &str| cni.cnitool_on("flatwire-lo", &node, verb, pods[2].netns_path(), &[]);
    let r3 = ok(chained("add"), "chained add").json.unwrap();
    assert_eq!(r3["cniVersion"], "1.0.0", "{r3}");
    assert_eq!(r3["interfaces"][0]["name"], "lo", "{r3}");
    assert_eq!(r3["interfaces"][1]["name"], "eth0", "{r3}");
    let ip3 = result_ip(&r3, true);
    for ip in r3["ips"].as_array().unwrap() {
        let address = ip["address"].as_str().unwrap();
        let index = if address.starts_with("127.") || address == "::1/128" {
            0
        } else {
            1
        };
        assert_eq!(ip["interface"], index, "{r3}");
    }
    wait_ping(&pods[2], &ip1, Duration::from_secs(10));
    ok(chained("check"), "chained check");
    ok(chained("del"), "chained del");
    assert!(pods[2].run("ip", &["link", "show", "eth0"]).is_err());
    assert!(!ping(&pods[0], &ip3), "{ip3} still answers after DEL");

    // DEL (whole chain, reverse order), twice; the interface and the DNAT go.
    for _ in 0..2 {
        ok(
            cni.cnitool(&node, "del", pods[0].netns_path(), &[("CAP_ARGS", cap)]),
            "cnitool del pod1",
        );
    }
    assert!(pods[0].run("ip", &["link", "show", "eth0"]).is_err());
    let links = pods[0].run("ip", &["-o", "link", "show"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&links.stdout).lines().count(),
        1,
        "DEL left pod1's shaping device"
    );
    let nat = node.run("iptables", &["-t", "nat", "-S"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains(&format!("{ip1}:5201")),
        "the DNAT to pod1 outlived DEL"
    );
    ok(
        cni.cnitool(&node, "del", pods[1].netns_path(), &[]),
        "cnitool del pod2",
    );
    assert!(attachments(&socket).is_empty());
    // With the last primary pod gone, so is the agent's NAT chain.
    let chain = flatwire_agent::attach::NAT_CHAIN;
    let nat = node.run("iptables", &["-t", "nat", "-S"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains(chain),
        "{chain} outlived the last pod"
    );

    // The agent's refusals arrive as actionable CNI errors: an unknown network (NOT_FOUND ->
    // 102), a network that does not accept the host's vouch (PERMISSION_DENIED -> 101) and an
    // exhausted pool (RESOURCE_EXHAUSTED -> 100).
    let netns3 = pods[2].netns_path();
    let direct_add = |container: &str, ifname: &str, network: &str| {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", container),
            ("CNI_IFNAME", ifname),
            ("CNI_NETNS", netns3.as_str()),
        ];
        let conf = netconf(
            "1.1.0",
            &socket,
            serde_json::json!({"name": "flatwire-errors", "network": network}),
        );
        plugin(&env, &conf)
    };
    let unknown = NetworkId::new(root_id.address(), 0x00_0099).to_string();
    let err = common::assert_cni_error(&direct_add("nonet0", "net1", &unknown), 102);
    assert!(err["details"].as_str().unwrap().contains(&unknown), "{err}");
    let err = common::assert_cni_error(&direct_add("closed0", "net1", &closed), 101);
    assert!(
        err["details"].as_str().unwrap().contains("authorized"),
        "{err}"
    );
    ok(
        direct_add("tiny0", "net1", &tiny),
        "ADD takes the last address",
    );
    // Bandwidth limits that cannot work are refused before anything is set up.
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "shaped0"),
        ("CNI_IFNAME", "net3"),
        ("CNI_NETNS", netns3.as_str()),
    ];
    for (bw, word) in [
        (serde_json::json!({"egressRate": 1000000}), "egressBurst"),
        (serde_json::json!({"ingressRate": -1}), "ingressRate"),
        (
            serde_json::json!({"egressRate": 1000000, "egressBurst": 800}),
            "one frame",
        ),
    ] {
        let conf = netconf(
            "1.1.0",
            &socket,
            serde_json::json!({"name": "flatwire-errors", "network": nwid,
                "runtimeConfig": {"bandwidth": bw}}),
        );
        let err = common::assert_cni_error(&plugin(&env, &conf), 7);
        assert!(err.to_string().contains(word), "{bw}: {err}");
        assert!(
            pods[2].run("ip", &["link", "show", "net3"]).is_err(),
            "a refused ADD ({bw}) left its interface behind"
        );
    }
    let err = common::assert_cni_error(&direct_add("tiny1", "net2", &tiny), 100);
    assert!(
        err["msg"].as_str().unwrap().contains("IP pool exhausted"),
        "{err}"
    );
    assert!(
        pods[2].run("ip", &["link", "show", "net2"]).is_err(),
        "a failed ADD left its interface behind"
    );
    // Nor a TAP on the node, nor a NAT rule for the refused attachments (only tiny0's).
    let links = node.run("ip", &["-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert!(
        !links.lines().any(|l| l.contains(": fp")),
        "a failed ADD left a TAP on the node:\n{links}"
    );
    let nat = node.run("iptables", &["-t", "nat", "-S", chain]).unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
    assert!(
        nat.lines()
            .filter(|l| l.starts_with("-A"))
            .all(|l| l.contains(&tiny)),
        "NAT rules of refused attachments:\n{nat}"
    );
    assert!(agent.try_status().is_none(), "the host agent exited");
    agent.stop();
    controller.stop();
}
