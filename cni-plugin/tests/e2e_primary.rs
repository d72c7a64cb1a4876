//! Primary mode end to end (needs root): a planet of our own (root, controller and host agents
//! in harness namespaces, `flatwire_tests::planet`), pods added by the real `cnitool` with the
//! installed conflist. Each host's member of the network becomes the pods' gateway on the TAP
//! `flatwire0`, with forwarding on and pod traffic leaving the flat network masqueraded.
//!
//! * `three_hosts_...`: two pods on each of three hosts; the full ping matrix between pods
//!   (IPv4, and IPv6 with one pod per host); each pod reaches its host, the host reaches it
//!   (ping, and a TCP connect as a kubelet probe makes, not masqueraded); egress to an underlay
//!   address outside the flat network arrives from the host's underlay address (a listener
//!   there reports the peer); failing ADDs (unknown network, exhausted pool) leave no TAP, no
//!   address and no NAT rule; an agent restart keeps every pod's connectivity, its host member
//!   on `flatwire0` from the start; DEL removes the pods and, with the last one, the NAT and
//!   forward chains. The hosts' `FORWARD` policy is `DROP` (as Docker and kube-proxy set it):
//!   the agent's own accept chain carries pod egress.
//! * `hundred_concurrent_adds_on_one_host`: 100 `cnitool add` at once on one host all succeed
//!   with unique addresses (p50/p99 printed), then DEL of all leaves nothing behind.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use flatwire_tests::netns::Host;
use flatwire_tests::planet::{Member, Network, NetworkSpec, Planet, PlanetSpec, V6Mode};

mod common;

use common::{CniEnv, PeerProbe, Run, agent_binary, assert_root, attachments, result_ip};

/// The host-side TAP of the primary network.
const PRIMARY_TAP: &str = flatwire_agent::networks::PRIMARY_TAP;
/// The agent's NAT chain.
const CHAIN: &str = flatwire_agent::attach::NAT_CHAIN;
/// The agent's chain in the filter table.
const FORWARD_CHAIN: &str = flatwire_agent::attach::FORWARD_CHAIN;

fn ok(run: Run, what: &str) -> Run {
    assert!(run.ok, "{what}: {run:?}");
    run
}

fn text(host: &Host, program: &str, args: &[&str]) -> String {
    host.run(program, args)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| panic!("{program} {args:?} in {}: {e}", host.name()))
}

/// The agent's NAT chain in `host` (`iptables -S` lines), `None` when it does not exist.
fn nat_chain(host: &Host, program: &str) -> Option<String> {
    host.run(program, &["-w", "-t", "nat", "-S", CHAIN])
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The agent's forward chain in `host` (`iptables -S` lines), `None` when it does not exist.
fn forward_chain(host: &Host, program: &str) -> Option<String> {
    host.run(program, &["-w", "-t", "filter", "-S", FORWARD_CHAIN])
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// TAP devices in `host` other than the host members' own (`flatwire0`, `fw...`): pod member
/// TAPs left behind (they belong in the pods' namespaces).
fn pod_taps(host: &Host) -> Vec<String> {
    text(host, "ip", &["-o", "link", "show", "type", "tun"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| *n != PRIMARY_TAP && !n.starts_with("fw"))
        .map(str::to_owned)
        .collect()
}

fn assert_clean_pod(pod: &Host) {
    let links = text(pod, "ip", &["-o", "link", "show"]);
    assert_eq!(
        links.lines().count(),
        1,
        "{}: only lo expected:\n{links}",
        pod.name()
    );
}

/// A pod added on `host` as a planet member (for the planet's ping helpers).
fn pod_member(host: &str, pod: Host, result: &serde_json::Value, nwid: &str) -> Member {
    let ipv6 = result["ips"]
        .as_array()
        .is_some_and(|ips| {
            ips.iter()
                .any(|i| i["address"].as_str().is_some_and(|a| a.contains(':')))
        })
        .then(|| result_ip(result, false).parse().unwrap());
    Member {
        name: format!("{host}/{}", pod.name()),
        agent: host.to_owned(),
        address: String::new(),
        nwid: nwid.to_owned(),
        ns: pod,
        dev: "eth0".into(),
        ipv4: Some(result_ip(result, true).parse().unwrap()),
        ipv6,
    }
}

/// Asserts every ordered pair of `pods` pings (after warming every path up).
fn assert_matrix(p: &Planet, pods: &[Member], v6: bool) {
    for a in pods {
        for b in pods.iter().filter(|b| b.name != a.name) {
            p.wait_ping(a, b.ip(v6).unwrap(), Duration::from_secs(15))
                .unwrap();
        }
    }
    let matrix = p.ping_matrix(pods, v6).unwrap();
    let failed: Vec<_> = matrix.iter().filter(|(_, _, r)| !r.ok).collect();
    assert!(failed.is_empty(), "ping matrix failures: {failed:#?}");
    let rtts: Vec<f64> = matrix.iter().filter_map(|(_, _, r)| r.rtt_ms).collect();
    eprintln!(
        "ping matrix IPv{}: {}/{} pairs answered, mean rtt {:.2} ms",
        if v6 { 6 } else { 4 },
        matrix.len() - failed.len(),
        matrix.len(),
        rtts.iter().sum::<f64>() / rtts.len().max(1) as f64
    );
}

/// Connects from `from` to `port` on `to` (curl) while `probe` listens there; the peer address
/// the listener saw.
fn probe_peer(from: &Host, to: IpAddr, port: u16, probe: PeerProbe) -> IpAddr {
    let url = match to {
        IpAddr::V4(a) => format!("http://{a}:{port}/"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}/"),
    };
    // The answer does not matter: the listener reports what it saw.
    let _ = from.run("curl", &["-s", "--max-time", "5", &url]);
    probe
        .peer()
        .unwrap_or_else(|| panic!("no connection from {} reached {url}", from.name()))
        .ip()
}

/// A planet with hosts `hosts` joined to an IPv4+IPv6 network, and a CNI setup per host.
fn planet(hosts: &[&str]) -> (Planet, Network, Vec<Member>, Vec<CniEnv>) {
    assert_root();
    let spec = hosts
        .iter()
        .fold(PlanetSpec::new(agent_binary().to_path_buf()), |s, h| {
            s.host(h, None)
        });
    let p = Planet::start(&spec).unwrap();
    let net = p
        .create_network(&NetworkSpec {
            v6: V6Mode::Pool,
            ..NetworkSpec::new("pods")
        })
        .unwrap();
    let members: Vec<Member> = hosts
        .iter()
        .map(|h| p.join(h, &net, &[]).unwrap())
        .collect();
    let envs = hosts
        .iter()
        .map(|h| CniEnv::install(&net.nwid, &p.agent(h).socket()))
        .collect();
    (p, net, members, envs)
}

#[test]
fn three_hosts_primary_mode_matrix_gateway_egress_failures_restart_del() {
    const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
    let (mut p, net, hosts, envs) = planet(&HOSTS);
    let root = p.agent("root0").host().clone();
    let root_ip = IpAddr::V4(p.agent("root0").underlay());
    let node = |p: &Planet, i: usize| p.agent(HOSTS[i]).host().clone();
    // Hosts that drop forwarded traffic unless a rule accepts it (Docker, kube-proxy).
    for i in 0..HOSTS.len() {
        for program in ["iptables", "ip6tables"] {
            text(&node(&p, i), program, &["-w", "-P", "FORWARD", "DROP"]);
        }
    }
    for (i, m) in hosts.iter().enumerate() {
        assert_ne!(
            m.dev, PRIMARY_TAP,
            "no primary attachment yet on {}",
            HOSTS[i]
        );
    }

    // Failing ADDs on h1 before any pod: an unknown network (the controller says so) and an
    // exhausted pool (the host member took the only address): errors, and nothing left.
    let ctl = p.agent("ctl0");
    let tiny = format!("{}{:06x}", ctl.address(), 0x77);
    let unknown = format!("{}{:06x}", ctl.address(), 0x99);
    ctl.api_ok(
        "POST",
        &format!("/controller/network/{tiny}"),
        Some(&serde_json::json!({
            "name": "tiny", "private": true,
            "ipAssignmentPools": [{"ipRangeStart": "198.19.9.10", "ipRangeEnd": "198.19.9.10"}],
            "routes": [{"target": "198.19.9.0/24", "via": null}],
            "v4AssignMode": {"zt": true}
        })),
    )
    .unwrap();
    let tiny_net = Network {
        nwid: tiny.clone(),
        spec: NetworkSpec::new("tiny"),
    };
    p.join("h1", &tiny_net, &[]).unwrap();
    for (name, nwid) in [("fw-tiny", &tiny), ("fw-unknown", &unknown)] {
        std::fs::write(
            envs[0].conf_dir().join(format!("30-{name}.conflist")),
            serde_json::json!({
                "cniVersion": "1.1.0", "name": name,
                "plugins": [{"type": "flatwire-cni", "network": nwid, "mode": "primary",
                    "agentSocket": p.agent("h1").socket()}],
            })
            .to_string(),
        )
        .unwrap();
    }
    let victim = p.topology().host("h1-failing").unwrap();
    let h1 = node(&p, 0);
    let links_before = text(&h1, "ip", &["-o", "link", "show"]).lines().count();
    for (name, why) in [
        ("fw-unknown", "does not exist"),
        ("fw-tiny", "IP pool exhausted"),
    ] {
        // cnitool prints the plugin's error message on stderr.
        let run = envs[0].cnitool_on(name, &h1, "add", victim.netns_path(), &[]);
        assert!(!run.ok && run.stderr.contains(why), "{name}: {run:?}");
        eprintln!(
            "{name}: refused as expected: {}",
            run.stderr.lines().next().unwrap_or("")
        );
        assert_clean_pod(&victim);
        assert!(pod_taps(&h1).is_empty(), "a failed ADD left a TAP on h1");
        assert_eq!(
            text(&h1, "ip", &["-o", "link", "show"]).lines().count(),
            links_before,
            "a failed ADD changed h1's links"
        );
        assert_eq!(
            nat_chain(&h1, "iptables"),
            None,
            "a failed ADD left NAT rules"
        );
        assert_eq!(
            nat_chain(&h1, "ip6tables"),
            None,
            "a failed ADD left NAT rules"
        );
    }
    assert!(attachments(&p.agent("h1").socket()).is_empty());

    // Two pods per host through the installed conflist (flatwire in primary mode).
    let mut pods: Vec<Member> = Vec::new();
    for (i, h) in HOSTS.iter().enumerate() {
        let nh = node(&p, i);
        for k in 1..=2 {
            let pod = p.topology().host(&format!("{h}-pod{k}")).unwrap();
            let t = Instant::now();
            let r = ok(envs[i].cnitool(&nh, "add", pod.netns_path(), &[]), "add");
            eprintln!("cnitool add {h}/pod{k}: {:?}", t.elapsed());
            let r = r.json.expect("a result");
            let host_v4 = hosts[i].ipv4.unwrap().to_string();
            let host_v6 = hosts[i].ipv6.unwrap().to_string();
            let mut gateways: Vec<&str> = r["ips"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|ip| ip["gateway"].as_str())
                .collect();
            gateways.sort_unstable_by_key(|g| g.contains(':'));
            assert_eq!(gateways, [host_v4.as_str(), host_v6.as_str()], "{r}");
            let routes = text(&pod, "ip", &["route", "show", "default"]);
            assert!(routes.contains(&format!("via {host_v4}")), "{routes}");
            let routes = text(&pod, "ip", &["-6", "route", "show", "default"]);
            assert!(routes.contains(&format!("via {host_v6}")), "{routes}");
            pods.push(pod_member(h, pod, &r, &net.nwid));
        }
    }

    // Each host: the host member sits on flatwire0 (the old fw TAP is gone), forwarding is on
    // for both families, and one masquerade rule per family covers the network.
    for (i, m) in hosts.iter().enumerate() {
        let nh = node(&p, i);
        let addrs = text(&nh, "ip", &["-o", "addr", "show", "dev", PRIMARY_TAP]);
        assert!(
            addrs.contains(&format!(" {}/24", m.ipv4.unwrap())),
            "{}: {addrs}",
            HOSTS[i]
        );
        assert!(
            nh.run("ip", &["link", "show", &m.dev]).is_err(),
            "{}: the old TAP {} is still there",
            HOSTS[i],
            m.dev
        );
        assert_eq!(
            text(&nh, "sysctl", &["-n", "net.ipv4.ip_forward"]).trim(),
            "1"
        );
        assert_eq!(
            text(&nh, "sysctl", &["-n", "net.ipv6.conf.all.forwarding"]).trim(),
            "1"
        );
        for (program, net_prefix) in [
            ("iptables", "198.19.0.0/24".to_string()),
            ("ip6tables", "fd00:f1a7::/64".to_string()),
        ] {
            let chain = nat_chain(&nh, program).expect("the NAT chain");
            let rule = format!("-s {net_prefix} ! -d {net_prefix}");
            let rules: Vec<&str> = chain.lines().filter(|l| l.starts_with("-A")).collect();
            assert_eq!(rules.len(), 1, "{program} on {}: {chain}", HOSTS[i]);
            assert!(
                rules[0].contains(&rule) && rules[0].contains("MASQUERADE"),
                "{program}: {chain}"
            );
            let post = text(&nh, program, &["-w", "-t", "nat", "-S", "POSTROUTING"]);
            assert!(post.contains(&format!("-j {CHAIN}")), "{post}");
            let fwd = forward_chain(&nh, program).expect("the forward chain");
            for dir in ["-i", "-o"] {
                assert!(
                    fwd.contains(&format!("{dir} {PRIMARY_TAP} ")) && fwd.contains("ACCEPT"),
                    "{program}: {fwd}"
                );
            }
            let forward = text(&nh, program, &["-w", "-S", "FORWARD"]);
            assert!(
                forward.contains("-P FORWARD DROP")
                    && forward.lines().nth(1) == Some(&*format!("-A FORWARD -j {FORWARD_CHAIN}")),
                "the jump comes first: {forward}"
            );
        }
    }

    // The full matrix between the six pods (IPv4), and one pod per host over IPv6.
    assert_matrix(&p, &pods, false);
    let one_per_host: Vec<Member> = pods.iter().step_by(2).cloned().collect();
    assert_matrix(&p, &one_per_host, true);

    // Pods reach their host (member address and underlay address); the host reaches them, and
    // a TCP connect from the host (as a kubelet probe) arrives from the host member's address.
    for (i, pod) in pods.iter().enumerate() {
        let h = i / 2;
        let nh = node(&p, h);
        p.wait_ping(
            pod,
            IpAddr::V4(hosts[h].ipv4.unwrap()),
            Duration::from_secs(5),
        )
        .unwrap();
        p.wait_ping(
            pod,
            IpAddr::V4(p.agent(HOSTS[h]).underlay()),
            Duration::from_secs(5),
        )
        .unwrap();
        let host_as_member = Member {
            name: HOSTS[h].to_owned(),
            ns: nh.clone(),
            ..hosts[h].clone()
        };
        p.wait_ping(
            &host_as_member,
            pod.ip(false).unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
        p.wait_ping(
            &host_as_member,
            pod.ip(true).unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let probe = PeerProbe::listen(&pods[2].ns, 8081, Duration::from_secs(10));
    let seen = probe_peer(&node(&p, 1), pods[2].ip(false).unwrap(), 8081, probe);
    assert_eq!(
        seen,
        IpAddr::V4(hosts[1].ipv4.unwrap()),
        "host -> pod probe"
    );

    // Egress: a pod's connection to the root's underlay address (outside the flat network)
    // arrives from its host's underlay address.
    let egress = |p: &Planet, pods: &[Member]| {
        for (i, pod) in pods.iter().enumerate().step_by(2) {
            let h = i / 2;
            let probe = PeerProbe::listen(&root, 8080, Duration::from_secs(10));
            let seen = probe_peer(&pod.ns, root_ip, 8080, probe);
            let want = IpAddr::V4(p.agent(HOSTS[h]).underlay());
            assert_eq!(seen, want, "egress of {} is not masqueraded", pod.name);
            eprintln!(
                "egress {} ({}) -> {root_ip}: the far end saw {seen}",
                pod.name,
                pod.ip(false).unwrap()
            );
        }
    };
    egress(&p, &pods);

    // Restart h2's agent: its pods come back (same addresses) and everything works again.
    let log = p.agent("h2").home().join("agent.log");
    let log_at = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    p.stop_agent("h2");
    let restarted = Instant::now();
    p.start_agent("h2").unwrap();
    // The host member is on flatwire0 from its first moment (claimed at start from the
    // attachment records), not rejoined to it when the first pod is restored.
    let text_since = std::fs::read_to_string(&log).unwrap_or_default();
    let text_since = text_since.get(log_at..).unwrap_or_default();
    let first_join = text_since
        .lines()
        .find(|l| l.contains("joined network"))
        .unwrap_or_else(|| panic!("no `joined network` line after the restart:\n{text_since}"));
    assert!(
        first_join.contains(&format!("tap={PRIMARY_TAP}")),
        "after the restart the host member first joined on another TAP: {first_join}"
    );
    assert!(
        !text_since.contains("rejoining the host member"),
        "the host member was rejoined after the restart:\n{text_since}"
    );
    p.wait_ping(
        &pods[2],
        pods[0].ip(false).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    eprintln!(
        "h2's pods talk again {:?} after its agent restarted",
        restarted.elapsed()
    );
    let h2 = node(&p, 1);
    assert!(
        text(&h2, "ip", &["-o", "addr", "show", "dev", PRIMARY_TAP])
            .contains(&format!(" {}/24", hosts[1].ipv4.unwrap())),
        "h2's host member is back on {PRIMARY_TAP}"
    );
    let chain = nat_chain(&h2, "iptables").expect("NAT chain after the restart");
    assert_eq!(
        chain.lines().filter(|l| l.starts_with("-A")).count(),
        1,
        "{chain}"
    );
    assert_matrix(&p, &pods, false);
    assert_matrix(&p, &one_per_host, true);
    egress(&p, &pods);
    let host_as_member = Member {
        ns: h2.clone(),
        ..hosts[1].clone()
    };
    for pod in &pods[2..4] {
        p.wait_ping(
            &host_as_member,
            pod.ip(false).unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    // DEL everything: the pods' interfaces, the hosts' pod TAPs, and with the last pod of a
    // host its NAT chain and jump go.
    for (i, pod) in pods.iter().enumerate() {
        let h = i / 2;
        let nh = node(&p, h);
        ok(envs[h].cnitool(&nh, "del", pod.ns.netns_path(), &[]), "del");
        assert_clean_pod(&pod.ns);
        if i % 2 == 0 {
            assert!(nat_chain(&nh, "iptables").is_some(), "one pod is left");
        }
    }
    for (i, h) in HOSTS.iter().enumerate() {
        let nh = node(&p, i);
        assert!(pod_taps(&nh).is_empty(), "{h}: {:?}", pod_taps(&nh));
        assert!(attachments(&p.agent(h).socket()).is_empty());
        for program in ["iptables", "ip6tables"] {
            assert_eq!(nat_chain(&nh, program), None, "{h}: {program} chain left");
            let post = text(&nh, program, &["-w", "-t", "nat", "-S", "POSTROUTING"]);
            assert!(!post.contains(CHAIN), "{h}: {post}");
            assert_eq!(
                forward_chain(&nh, program),
                None,
                "{h}: {program} chain left"
            );
            let forward = text(&nh, program, &["-w", "-S", "FORWARD"]);
            assert!(!forward.contains(FORWARD_CHAIN), "{h}: {forward}");
        }
    }
}

#[test]
fn hundred_concurrent_adds_on_one_host() {
    const PODS: usize = 100;
    let (mut p, net, hosts, envs) = planet(&["h1"]);
    // A full identity pool, as a node that has been up a while has (the agent keeps and
    // checks pool files it finds at start). With 100 new members at once the controller (and
    // root) check 100 new identities (a memory-hard hash each) on a shared machine: allow the
    // config wait up to the ADD deadline.
    p.stop_agent("h1");
    let t = Instant::now();
    common::fill_pool(p.agent("h1").home(), PODS);
    eprintln!("{PODS} pool identities generated in {:?}", t.elapsed());
    p.add_agent_args("h1", &["--attach-timeout", "55"]);
    p.start_agent("h1").unwrap();
    p.wait_member("h1", &net).unwrap();
    let nh = p.agent("h1").host().clone();
    let cni = &envs[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cni.cnitool(&nh, "status", nh.netns_path(), &[]).ok {
        assert!(Instant::now() < deadline, "the agent never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pods: Vec<Host> = (0..PODS)
        .map(|i| p.topology().host(&format!("c{i}")).unwrap())
        .collect();

    let started = Instant::now();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| s.spawn(|| cni.cnitool(&nh, "add", pod.netns_path(), &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let failed: Vec<&Run> = runs.iter().filter(|r| !r.ok).collect();
    assert!(
        failed.is_empty(),
        "{} ADDs failed: {:?}",
        failed.len(),
        failed.first()
    );
    let (p50, p99) = percentiles(runs.iter().map(|r| r.took).collect());
    eprintln!(
        "{PODS} concurrent cnitool ADDs: all done in {wall:?}; per ADD p50 {p50:?}, p99 {p99:?}"
    );
    let ips: Vec<String> = runs
        .iter()
        .map(|r| result_ip(r.json.as_ref().expect("a result"), true))
        .collect();
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), PODS, "duplicate addresses among {ips:?}");
    assert_eq!(attachments(&p.agent("h1").socket()).len(), PODS);
    for (pod, ip) in pods.iter().zip(&ips) {
        assert_eq!(
            pod.ipv4_on("eth0").map(|a| a.to_string()).as_ref(),
            Some(ip)
        );
    }
    // The agent's own view of each Attach (its log's `took_ms`), to tell it from cnitool's.
    let log = std::fs::read_to_string(p.agent("h1").home().join("agent.log")).unwrap();
    let agent_ms: Vec<Duration> = log
        .lines()
        .filter(|l| l.contains(" attached") && !l.contains("attach failed"))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map(Duration::from_millis)
        .collect();
    assert_eq!(
        agent_ms.len(),
        PODS,
        "one `attached` line per pod in the agent's log"
    );
    let (a50, a99) = percentiles(agent_ms);
    eprintln!("the agent's Attach (identity to configured link): p50 {a50:?}, p99 {a99:?}");
    // A sample talks: pods to each other, to the gateway and out through the NAT.
    let members: Vec<Member> = pods
        .iter()
        .zip(&runs)
        .step_by(33)
        .map(|(pod, r)| pod_member("h1", pod.clone(), r.json.as_ref().unwrap(), &net.nwid))
        .collect();
    assert_matrix(&p, &members, false);
    for m in &members {
        p.wait_ping(
            m,
            IpAddr::V4(hosts[0].ipv4.unwrap()),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    let started = Instant::now();
    let dels: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| s.spawn(|| cni.cnitool(&nh, "del", pod.netns_path(), &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<&Run> = dels.iter().filter(|r| !r.ok).collect();
    assert!(
        failed.is_empty(),
        "{} DELs failed: {:?}",
        failed.len(),
        failed.first()
    );
    let (d50, d99) = percentiles(dels.iter().map(|r| r.took).collect());
    eprintln!(
        "{PODS} concurrent cnitool DELs: all done in {:?}; per DEL p50 {d50:?}, p99 {d99:?}",
        started.elapsed()
    );
    // Nothing left: no pod TAP, no interface or address in any pod, no attachment or record,
    // no NAT rule; the host's own member is untouched.
    assert!(pod_taps(&nh).is_empty(), "{:?}", pod_taps(&nh));
    for pod in &pods {
        assert_clean_pod(pod);
    }
    assert!(attachments(&p.agent("h1").socket()).is_empty());
    let records = std::fs::read_dir(p.agent("h1").home().join("attachments"))
        .unwrap()
        .count();
    assert_eq!(records, 0, "attachment records left");
    assert_eq!(nat_chain(&nh, "iptables"), None);
    let addrs = text(&nh, "ip", &["-o", "addr", "show", "dev", PRIMARY_TAP]);
    assert!(
        addrs.contains(&format!(" {}/24", hosts[0].ipv4.unwrap())),
        "{addrs}"
    );
}

/// The median and 99th percentile of `d`.
fn percentiles(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    let p99 = d[(d.len() * 99).div_ceil(100) - 1];
    (d[d.len() / 2], p99)
}
