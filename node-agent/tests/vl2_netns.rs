//! VL2 over real agents in network namespaces (needs root): one agent is the planet's root and
//! the network controller (a network pre-created as JSON in its `controller.d`), two member
//! agents join it with `--join`, get their addresses on their TAPs and ping each other over
//! the overlay; a restarted member rejoins from `networks.d` with the same address.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flatwire_agent::networks::tap_name;
use flatwire_tests::netns::Topology;
use flatwire_tests::planet::ping_in;

use flatwire_vl2::NetworkId;

mod common;

use common::{
    assert_root, lan_hosts, new_identity, start_agent, start_controller, wait_ipv4,
    write_lan_planet, write_network,
};

#[test]
fn controller_and_two_members_ping_over_the_overlay() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let hosts = lan_hosts(&mut topo, &["ctl", "m1", "m2", "m3"]);
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| -> PathBuf { dir.path().join(n) };

    // Identities made up front: the planet names the root, the controller pre-authorizes the
    // members by address.
    let root_id = new_identity(&home("ctl"));
    let m1_id = new_identity(&home("m1"));
    let m2_id = new_identity(&home("m2"));
    let m3_id = new_identity(&home("m3"));
    let planet_file = write_lan_planet(dir.path(), &root_id);
    let planet_arg = planet_file.to_str().unwrap();

    // The network, as ZeroTier controller JSON in controller.d: private, a 10.77.0.0/24 pool
    // (overlay only: it exists on the TAPs inside these namespaces), both members authorized.
    let nwid = NetworkId::new(root_id.address(), 0x00_0001);
    write_network(&home("ctl"), nwid, "10.77.0", &[&m1_id, &m2_id]);

    let tap = tap_name(nwid);
    let nwid_arg = nwid.to_string();
    let started = Instant::now();
    // The root listens before the members say HELLO (else they retry only after 5 s).
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
    // Not authorized: the private network refuses it.
    let mut m3 = start_agent(
        &hosts[3],
        &home("m3"),
        &home("m3").join("agent.sock"),
        &["--planet", planet_arg, "--join", &nwid_arg],
    );
    let limit = Duration::from_secs(30);
    let ip1 = wait_ipv4(&hosts[1], &tap, &mut m1, limit);
    let ip2 = wait_ipv4(&hosts[2], &tap, &mut m2, limit);
    eprintln!(
        "members have their IPs {:?} after start: {ip1} {ip2} on {tap}",
        started.elapsed()
    );
    assert!(ctl.try_status().is_none(), "controller agent exited");
    for ip in [ip1, ip2] {
        assert_eq!(ip.octets()[..3], [10, 77, 0], "{ip} outside the pool");
    }
    assert_ne!(ip1, ip2);
    // The TAP carries the member MAC of vl2 and the network's MTU.
    let link = hosts[1]
        .run("ip", &["-o", "link", "show", "dev", &tap])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    let mac = flatwire_vl2::Mac::from_address(m1_id.address(), nwid).to_string();
    assert!(link.contains("mtu 2800"), "{link}");
    assert!(link.contains(&mac), "{link} lacks {mac}");
    // The persisted join.
    assert!(
        home("m1")
            .join("networks.d")
            .join(format!("{nwid}.json"))
            .exists()
    );

    let t = Instant::now();
    let r = ping_in(&hosts[1], ip2.into(), 3);
    assert!(
        r.ok,
        "ping {ip1} -> {ip2} over the overlay failed:\n{}",
        r.output
    );
    eprintln!(
        "ping -c 3 m1 -> m2 ok in {:?}, rtt avg {:?} ms",
        t.elapsed(),
        r.rtt_ms
    );
    let neigh = hosts[1]
        .run("ip", &["neigh", "show", "dev", &tap, &ip2.to_string()])
        .unwrap();
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    let mac2 = flatwire_vl2::Mac::from_address(m2_id.address(), nwid).to_string();
    assert!(
        neigh.contains(&mac2),
        "no ARP entry for {ip2} ({mac2}): {neigh}"
    );
    let r = ping_in(&hosts[2], ip1.into(), 3);
    assert!(r.ok, "ping {ip2} -> {ip1} failed:\n{}", r.output);

    // Restart m2 without --join: it rejoins from networks.d, gets the same address, and
    // traffic flows again within 5 s.
    m2.stop();
    let restarted = Instant::now();
    let mut m2 = start_agent(&hosts[2], &home("m2"), &home("m2").join("agent.sock"), &[]);
    let ip2b = wait_ipv4(&hosts[2], &tap, &mut m2, Duration::from_secs(5));
    let to_ip = restarted.elapsed();
    assert_eq!(ip2b, ip2, "the restarted member got another address");
    let deadline = restarted + Duration::from_secs(5);
    loop {
        let r = ping_in(&hosts[1], ip2.into(), 1);
        if r.ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ping to the restarted member within 5 s:\n{}",
            r.output
        );
    }
    eprintln!(
        "restarted m2: IP back after {to_ip:?}, ping ok after {:?}",
        restarted.elapsed()
    );

    // The unauthorized member got no address (its TAP exists, without one) and the controller
    // recorded it as a new, unauthorized member.
    assert!(m3.try_status().is_none(), "m3 exited");
    assert!(hosts[3].run("ip", &["link", "show", "dev", &tap]).is_ok());
    assert_eq!(
        hosts[3].ipv4_on(&tap),
        None,
        "unauthorized member got an IP"
    );
    let m3_path = home("ctl")
        .join("controller.d")
        .join("network")
        .join(nwid.to_string())
        .join("member")
        .join(format!("{}.json", m3_id.address()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let m3_file: serde_json::Value = loop {
        if let Ok(b) = std::fs::read(&m3_path) {
            break serde_json::from_slice(&b).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no member file for the unauthorized member"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(m3_file["authorized"], false, "{m3_file}");

    for p in [&mut ctl, &mut m1, &mut m2, &mut m3] {
        p.stop();
    }
    drop(topo);
}
