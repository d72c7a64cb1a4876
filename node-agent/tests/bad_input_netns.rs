//! Bad input against real agents in network namespaces (needs root): a root/controller and two
//! member agents on one LAN, plus an "evil" namespace that sends
//!
//! - a flood of HELLOs from thousands of random identities (written by flatwire-vl1's own
//!   `Node`, so each is a well-formed, correctly armored HELLO),
//! - truncated, oversized and garbage UDP datagrams,
//!
//! to member m1, while m2 keeps pinging m1 over the overlay; and frames written straight into
//! m1's TAP with a raw packet socket (runts shorter than an Ethernet header, which the kernel
//! refuses, and header-only, short and over-MTU frames from a foreign source MAC). Each must
//! end as a counted drop (or be refused by the kernel) while the agent stays up, keeps its
//! peers and its memory bounded, and overlay traffic carries on.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flatwire_agent::networks::tap_name;
use flatwire_agent::tap;
use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::planet::ping_in;
use flatwire_vl1::identity::{self, SECRET_KEY_LEN};
use flatwire_vl1::node::MAX_DATAGRAM_LEN;
use flatwire_vl1::wire;
use flatwire_vl1::{Identity, Node, NodeConfig, Root, World, WorldType};
use flatwire_vl2::{Mac, NetworkId};
use nix::ifaddrs::getifaddrs;
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, sendto, socket,
};

mod common;

use common::{
    TwoMemberLab, assert_root, lan_hosts, metric, new_identity, scrape, start_agent,
    start_controller, wait_ipv4, write_lan_planet,
};

/// HELLOs in the flood, each from its own identity.
const FLOOD: usize = 2000;

/// Runs `f` on a dedicated thread inside `host`'s network namespace (sockets made there stay
/// in it).
fn in_netns<T: Send + 'static>(host: &Host, f: impl FnOnce() -> T + Send + 'static) -> T {
    tap::in_netns(Path::new(&host.netns_path()), move || Ok(f())).unwrap()
}

fn drops(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("flatwire_drops_total{{reason=\"{reason}\"}}"),
    )
}

fn all_drops(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("flatwire_drops_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// `FLOOD` HELLO datagrams to `target` at `at`, each from its own random identity: a key
/// pair with a made-up address (cheap to forge: the address is not the memory-hard hash of
/// the key, which the agent learns only after spending a validation on it). A vl1 `Node`
/// whose planet names the target as its only root writes each one, correctly armored, on
/// its first timer run.
fn hellos(target: &Identity, at: SocketAddr) -> Vec<Vec<u8>> {
    let (pk, sk) = identity::generate_key_pair().unwrap();
    let planet = World::create(
        WorldType::Planet,
        0x0bad_f00d,
        1,
        pk,
        vec![Root {
            identity: target.to_public(),
            stable_endpoints: vec![at],
        }],
        &sk,
    )
    .unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut out = Vec::with_capacity(FLOOD);
    while out.len() < FLOOD {
        let (public, secret) = identity::generate_key_pair().unwrap();
        let mut bin = vec![0u8; 5];
        getrandom::fill(&mut bin).unwrap();
        bin.push(0);
        bin.extend_from_slice(&public);
        bin.push(SECRET_KEY_LEN as u8);
        bin.extend_from_slice(&secret);
        let Ok((id, _)) = Identity::from_bytes(&bin) else {
            continue; // a reserved address
        };
        let mut node = Node::new(NodeConfig::new(planet.clone()), vec![id]).unwrap();
        node.handle_timeout(1_000);
        while let Some(t) = node.poll_transmit(&mut buf) {
            if t.to == at && out.len() < FLOOD {
                out.push(buf[..t.len].to_vec());
            }
        }
    }
    out
}

/// Sends raw Ethernet frames out of `dev` (in the calling thread's namespace) with an
/// `AF_PACKET` socket; one result per frame.
fn send_frames(dev: &str, frames: &[Vec<u8>]) -> Vec<nix::Result<usize>> {
    let link: LinkAddr = getifaddrs()
        .unwrap()
        .filter(|i| i.interface_name == dev)
        .find_map(|i| i.address?.as_link_addr().copied())
        .unwrap_or_else(|| panic!("no link-layer address of {dev}"));
    let sock = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::EthAll,
    )
    .expect("packet socket");
    frames
        .iter()
        .map(|f| sendto(sock.as_raw_fd(), f, &link, MsgFlags::empty()))
        .collect()
}

/// An Ethernet frame `dest <- source`, IPv4 ethertype, `len` bytes in all.
fn frame(dest: Mac, source: Mac, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dest.0);
    f.extend_from_slice(&source.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(len, 0x5a);
    f
}

#[test]
fn floods_and_malformed_input_are_counted_drops_and_traffic_continues() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let hosts = lan_hosts(&mut topo, &["ctl", "m1", "m2", "evil"]);
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| -> PathBuf { dir.path().join(n) };
    let lab = TwoMemberLab::write(dir.path(), 0x00_0b4d, "10.78.0");
    let [m1_id, m2_id] = &lab.members;
    let (planet_file, nwid) = (lab.planet.clone(), lab.nwid);
    let planet_arg = planet_file.to_str().unwrap();

    let tap = tap_name(nwid);
    let nwid_arg = nwid.to_string();
    let mut ctl = start_controller(&hosts[0], &home("ctl"), &planet_file);
    let mut m1 = start_agent(
        &hosts[1],
        &home("m1"),
        &home("m1").join("agent.sock"),
        &["--planet", planet_arg, "--join", &nwid_arg],
    );
    let mut m2 = start_agent(
        &hosts[2],
        &home("m2"),
        &home("m2").join("agent.sock"),
        &["--planet", planet_arg, "--join", &nwid_arg],
    );
    let ip1 = wait_ipv4(&hosts[1], &tap, &mut m1, Duration::from_secs(30));
    let ip2 = wait_ipv4(&hosts[2], &tap, &mut m2, Duration::from_secs(30));
    let r = ping_in(&hosts[2], ip1.into(), 3);
    assert!(r.ok, "m2 -> m1 before any bad input:\n{}", r.output);
    let m1_at: SocketAddr = "198.18.0.2:9993".parse().unwrap();

    // (a) HELLO flood from random identities, while m2 pings m1 over the overlay.
    let t = Instant::now();
    let flood = hellos(m1_id, m1_at);
    eprintln!(
        "{} HELLOs from random identities made in {:?}",
        flood.len(),
        t.elapsed()
    );
    let before = scrape(&hosts[1]);
    let peers_before = metric(&before, "flatwire_peers");
    let rss_before = rss_kib(m1.pid());
    let pinger = {
        let mut h2 = hosts[2].command("ping");
        h2.args(["-n", "-q", "-c", "40", "-i", "0.1", &ip1.to_string()]);
        std::thread::spawn(move || h2.output().unwrap())
    };
    let t = Instant::now();
    let sent = in_netns(&hosts[3], move || {
        let s = UdpSocket::bind("198.18.0.4:0").unwrap();
        let mut n = 0usize;
        for (i, d) in flood.iter().enumerate() {
            if s.send_to(d, m1_at).is_ok() {
                n += 1;
            }
            // In bursts of 100 with a short pause, so the receive buffer is not what drops
            // them (the agent's own defences are under test).
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        n
    });
    let flood_time = t.elapsed();
    let ping = pinger.join().unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout).into_owned();
    std::thread::sleep(Duration::from_millis(1500));
    let after = scrape(&hosts[1]);
    let rss_after = rss_kib(m1.pid());
    let peers_after = metric(&after, "flatwire_peers");
    let limited = drops(&after, "RateLimited") - drops(&before, "RateLimited");
    let bad_id = drops(&after, "BadIdentity") - drops(&before, "BadIdentity");
    eprintln!(
        "flood: {sent} HELLOs in {flood_time:?}; m1 peers {peers_before} -> {peers_after}, \
         RateLimited +{limited}, BadIdentity +{bad_id}, RSS {rss_before} -> {rss_after} KiB; \
         m2 -> m1 ping during it: {}",
        ping_out
            .lines()
            .filter(|l| l.contains("transmitted"))
            .collect::<String>()
    );
    assert_eq!(sent, FLOOD);
    assert!(m1.try_status().is_none(), "m1 exited under the HELLO flood");
    assert!(
        ping.status.success() && ping_out.contains(" 0% packet loss"),
        "m2 -> m1 over the overlay suffered during the flood:\n{ping_out}"
    );
    // Identity validations are budgeted per source prefix (16 per 2 s): all but a few dozen
    // HELLOs are refused before any expensive work.
    let windows = (flood_time.as_secs_f64() / 2.0).ceil() + 1.0;
    let validated_max = 16.0 * windows;
    assert!(
        limited >= FLOOD as f64 - validated_max,
        "only {limited} HELLOs rate-limited of {FLOOD} (at most {validated_max} validations)"
    );
    // The few that were validated failed the address check; none got into the peer table.
    assert!(bad_id >= 1.0, "no HELLO reached identity validation");
    // m1's only real peers are its root and m2 (the one it may not have counted yet before
    // the flood, as m2's pings go on during it).
    assert!(
        peers_after <= peers_before.max(2.0),
        "the peer table grew from {peers_before} to {peers_after} under the flood"
    );
    // The memory bound: at most `validated_max` new peers (well under 10 KiB each with their
    // maps), the node's reusable buffer pool (256 x 20 KiB = 5 MiB at the very most) and one
    // 2 MiB scratch of the memory-hard hash; 12 MiB leaves room for allocator slack and is
    // far below what keeping every one of the 2,000 identities and their datagrams would
    // cost if nothing were bounded.
    let grew = rss_after.saturating_sub(rss_before);
    assert!(grew < 12 * 1024, "RSS grew by {grew} KiB under the flood");

    // (b) Runts (an empty datagram, a 5-byte one like ZeroTier's NAT probes), truncated,
    // oversized and garbage datagrams.
    let mut bad: Vec<Vec<u8>> = vec![vec![], vec![0x01; 5], vec![0x02; 27], vec![0xff; 12_000]];
    let runts = bad
        .iter()
        .filter(|d| d.len() <= wire::FRAGMENT_HEADER_LEN)
        .count();
    let truncated_or_oversized = bad.len() - runts;
    let me = m1_id.address().to_bytes();
    for i in 0..500u32 {
        let mut g = vec![0u8; 60 + (i as usize % 200)];
        getrandom::fill(&mut g).unwrap();
        if i % 2 == 0 {
            // Addressed to m1 from a made-up sender, garbage after the header.
            g[8..13].copy_from_slice(&me);
        }
        bad.push(g);
    }
    let n_bad = bad.len();
    let before = scrape(&hosts[1]);
    in_netns(&hosts[3], move || {
        let s = UdpSocket::bind("198.18.0.4:0").unwrap();
        for (i, d) in bad.iter().enumerate() {
            s.send_to(d, m1_at).unwrap();
            // Paced like the flood, so the socket buffer does not drop any.
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    // Packets parked while their made-up sender is looked up, and heads of fragmented
    // packets whose other pieces never come, are counted when they expire (5 s, checked at
    // the next 5 s timer).
    let deadline = Instant::now() + Duration::from_secs(12);
    let after = loop {
        std::thread::sleep(Duration::from_millis(500));
        let after = scrape(&hosts[1]);
        if all_drops(&after) - all_drops(&before) >= n_bad as f64 || Instant::now() > deadline {
            break after;
        }
    };
    let malformed = drops(&after, "Malformed") - drops(&before, "Malformed");
    let runt = drops(&after, "Runt") - drops(&before, "Runt");
    let total = all_drops(&after) - all_drops(&before);
    eprintln!(
        "garbage: {n_bad} datagrams -> drops +{total} (Malformed +{malformed}, Runt +{runt})"
    );
    assert!(m1.try_status().is_none(), "m1 exited on garbage datagrams");
    assert!(
        runt >= runts as f64,
        "the empty and the 5-byte datagram not counted as Runt: +{runt}"
    );
    assert!(
        malformed >= truncated_or_oversized as f64,
        "truncated/oversized datagrams not counted as Malformed: +{malformed}"
    );
    assert!(
        total >= n_bad as f64,
        "{n_bad} bad datagrams but only {total} drops counted"
    );
    assert_eq!(
        metric(&after, "flatwire_peers"),
        metric(&before, "flatwire_peers"),
        "garbage changed the peer table"
    );
    let r = ping_in(&hosts[2], ip1.into(), 2);
    assert!(r.ok, "m2 -> m1 after garbage:\n{}", r.output);

    // (c) Bad frames into m1's TAP.
    let mac2 = Mac::from_address(m2_id.address(), nwid);
    let foreign = Mac([0x02, 0xba, 0xdb, 0xad, 0xba, 0xd0]);
    let before = scrape(&hosts[1]);
    let tap_c = tap.clone();
    let results = in_netns(&hosts[1], move || {
        let runts = send_frames(&tap_c, &[vec![0xaa; 6], vec![0xbb; 13]]);
        let mut junk = vec![frame(mac2, foreign, 14), frame(mac2, foreign, 20)];
        for n in 0..200 {
            junk.push(frame(mac2, foreign, 60 + n));
        }
        let junk = send_frames(&tap_c, &junk);
        (runts, junk)
    });
    // Frames shorter than an Ethernet header never reach the agent: the kernel refuses them.
    for r in &results.0 {
        assert!(r.is_err(), "the kernel took a runt frame: {r:?}");
    }
    assert!(results.1.iter().all(|r| r.is_ok()), "{:?}", results.1);
    // Frames over the network MTU (2800): the TAP's own MTU has to be raised first, else the
    // kernel refuses to send them at all.
    let over = hosts[1].run("ip", &["link", "set", "dev", &tap, "mtu", "9000"]);
    assert!(over.is_ok(), "raise {tap} MTU: {over:?}");
    // Over the MTU is refused first, from a foreign MAC and from m1's own alike.
    let tap_c = tap.clone();
    let mac1 = Mac::from_address(m1_id.address(), nwid);
    let big = in_netns(&hosts[1], move || {
        send_frames(
            &tap_c,
            &[
                frame(mac2, foreign, 4000),
                frame(mac2, foreign, 9014),
                frame(mac2, mac1, 4000),
            ],
        )
    });
    assert!(big.iter().all(|r| r.is_ok()), "{big:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let after = scrape(&hosts[1]);
    let not_bridge = drops(&after, "Vl2NotBridge") - drops(&before, "Vl2NotBridge");
    let too_big = drops(&after, "Vl2TooBig") - drops(&before, "Vl2TooBig");
    eprintln!(
        "TAP: {} junk frames -> Vl2NotBridge +{not_bridge}; {} over the MTU -> Vl2TooBig \
         +{too_big}",
        results.1.len(),
        big.len()
    );
    assert!(
        not_bridge >= results.1.len() as f64,
        "frames from a foreign MAC not all counted: +{not_bridge}"
    );
    assert!(
        too_big >= big.len() as f64,
        "frames over the MTU not all counted: +{too_big}"
    );
    assert!(m1.try_status().is_none(), "m1 exited on bad TAP frames");
    hosts[1]
        .run("ip", &["link", "set", "dev", &tap, "mtu", "2800"])
        .unwrap();
    for (from, to) in [(&hosts[1], ip2), (&hosts[2], ip1)] {
        let r = ping_in(from, IpAddr::V4(to), 2);
        assert!(
            r.ok,
            "overlay ping to {to} after bad TAP frames:\n{}",
            r.output
        );
    }
    // The rules that let this traffic through are counted per action and direction, and the
    // root counts the bytes it relayed (the members' first packets, before their direct path).
    std::thread::sleep(Duration::from_millis(1100));
    let m = scrape(&hosts[1]);
    for dir in ["tx", "rx"] {
        let s = format!(
            "flatwire_rule_hits_total{{network=\"{nwid}\",action=\"accept\",direction=\"{dir}\"}}"
        );
        assert!(metric(&m, &s) > 0.0, "{s} not counted:\n{m}");
    }
    let root = scrape(&hosts[0]);
    let (packets, bytes) = (
        metric(&root, "flatwire_relayed_packets_total"),
        metric(&root, "flatwire_relayed_bytes_total"),
    );
    assert!(
        packets > 0.0 && bytes >= 28.0 * packets,
        "relayed {packets} packets but {bytes} bytes on the root"
    );
    assert!(ctl.try_status().is_none(), "controller exited");
}

/// A datagram addressed to `to` from a made-up sender (garbage after the header).
fn datagram_to(to: flatwire_vl1::Address) -> Vec<u8> {
    let mut d = vec![0x5a; 64];
    d[8..13].copy_from_slice(&to.to_bytes());
    d[13..18].copy_from_slice(&[0x0a, 0x0b, 0x0c, 0x0d, 0x0e]);
    d
}

/// A failed attach after the agent took a pool identity leaves nothing of it behind: no
/// interface in the pod, and no standby node of the identity (made while it waited in the pool)
/// in the data plane: a datagram to its address is then for no one there (a `NotForUs` drop),
/// where before the attach the standby node took it.
#[test]
fn a_failed_attach_leaves_no_standby_node_of_its_identity() {
    use flatwire_agent::state::{Sensitivity, StateDir};
    use flatwire_api::v1;

    assert_root();
    let mut topo = Topology::new().unwrap();
    let hosts = lan_hosts(&mut topo, &["ctl", "node"]);
    let pod = topo.host("pod").unwrap();
    let (ctl, node, pod) = (&hosts[0], &hosts[1], &pod);
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| -> PathBuf { dir.path().join(n) };
    let root_id = new_identity(&home("ctl"));
    new_identity(&home("node"));
    // The pool's one identity, made here so the test knows its address.
    let member = Identity::generate(&std::sync::atomic::AtomicBool::new(false)).unwrap();
    StateDir::open(home("node").join(flatwire_agent::pool::POOL_DIR))
        .unwrap()
        .write(
            &format!("{}.secret", member.address()),
            member.to_secret_string().unwrap().as_bytes(),
            Sensitivity::Secret,
        )
        .unwrap();
    let planet_file = write_lan_planet(dir.path(), &root_id);
    let planet_arg = planet_file.to_str().unwrap();
    let mut root = start_agent(
        ctl,
        &home("ctl"),
        &home("ctl").join("agent.sock"),
        &["--planet", planet_arg, "--root"],
    );
    common::wait_socket(&mut root, &home("ctl").join("agent.sock"), "root agent");
    let socket = home("node").join("agent.sock");
    let mut agent = start_agent(
        node,
        &home("node"),
        &socket,
        &["--planet", planet_arg, "--identity-pool", "1"],
    );
    common::wait_socket(&mut agent, &socket, "node agent");

    let node_at: SocketAddr = "198.18.0.2:9993".parse().unwrap();
    let probe = datagram_to(member.address());
    let send = |n: usize| {
        let d = probe.clone();
        in_netns(ctl, move || {
            let s = UdpSocket::bind("198.18.0.1:0").unwrap();
            for _ in 0..n {
                s.send_to(&d, node_at).unwrap();
            }
        });
    };
    let not_for_us = || drops(&scrape(node), "NotForUs");
    // Metrics are refreshed once a second.
    let publish = Duration::from_millis(1300);
    // Before: once warmed, the identity's standby node takes datagrams to its address.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(agent.try_status().is_none(), "the node agent exited");
        let before = not_for_us();
        send(1);
        std::thread::sleep(publish);
        if not_for_us() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool identity {} never got its standby node",
            member.address()
        );
    }

    // The pod already has an eth0 (not a TAP): the member's TAP cannot be made there, after
    // the identity was taken.
    pod.run(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ],
    )
    .unwrap();
    let links_before = pod.run("ip", &["-o", "link", "show"]).unwrap().stdout;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut c = loop {
            let ready = async {
                let mut c = flatwire_api::connect(&socket, flatwire_api::ClientOptions::default())
                    .await
                    .ok()?;
                let s = c.status(v1::StatusRequest {}).await.ok()?.into_inner();
                s.ready.then_some(c)
            };
            if let Some(c) = ready.await {
                break c;
            }
            assert!(Instant::now() < deadline, "the node agent never got ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let nwid = NetworkId::new(root_id.address(), 1);
        c.attach(common::attach_request(pod, nwid, v1::Mode::Secondary))
            .await
            .expect_err("attaching where eth0 exists")
    });
    eprintln!("refused: {refused}");
    assert!(refused.message().contains("eth0"), "{refused}");
    assert!(
        !home("node")
            .join(flatwire_agent::pool::POOL_DIR)
            .join(format!("{}.secret", member.address()))
            .exists(),
        "the identity was not taken from the pool"
    );
    assert_eq!(
        pod.run("ip", &["-o", "link", "show"]).unwrap().stdout,
        links_before,
        "the failed attach changed the pod's links"
    );

    // After: nothing of the identity is left in the data plane.
    let before = not_for_us();
    send(5);
    let deadline = Instant::now() + Duration::from_secs(5);
    while not_for_us() < before + 5.0 {
        assert!(
            Instant::now() < deadline,
            "datagrams to {} are still taken: its standby node outlived the failed attach",
            member.address()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.try_status().is_none(), "the node agent exited");
}
