//! End to end (needs root): multicast over the overlay. ARP (broadcast) is exercised by every
//! IPv4 ping; here IPv6 neighbour discovery between pool addresses (solicitations go to
//! solicited-node multicast groups), and an IPv4 multicast group: two members join 239.77.0.1
//! and answer a ping sent to the group by the third.

use std::time::Duration;

use flatwire_tests::planet::{self, Member, NetworkSpec, Planet, PlanetSpec, Profile, V6Mode};

const GROUP: &str = "239.77.0.1";
/// Its Ethernet multicast MAC (01:00:5e and the low 23 bits of the address).
const GROUP_MAC: &str = "01:00:5e:4d:00:01";

fn planet_with_members() -> (Planet, Vec<Member>) {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let p = Planet::start(
        &PlanetSpec::new(agent)
            .host("s", None)
            .host("r1", None)
            .host("r2", None),
    )
    .unwrap();
    let mut spec = NetworkSpec::new("mcast");
    spec.v6 = V6Mode::Pool;
    let net = p.create_network(&spec).unwrap();
    let members = ["s", "r1", "r2"]
        .iter()
        .map(|h| p.join(h, &net, &[]).unwrap())
        .collect();
    (p, members)
}

#[test]
fn ipv6_neighbour_discovery_crosses_the_overlay() {
    let (p, m) = planet_with_members();
    // The first ping6 resolves the neighbour through a solicitation to its solicited-node
    // multicast group.
    for r in &m[1..] {
        let v6 = r.ipv6.unwrap();
        assert_eq!(
            v6.segments()[..3],
            [0xfd00, 0xf1a7, 0],
            "{v6} outside the pool"
        );
        p.wait_ping(&m[0], v6.into(), Duration::from_secs(5))
            .unwrap();
        let neigh = m[0]
            .ns
            .run(
                "ip",
                &["-6", "neigh", "show", "dev", &m[0].dev, &v6.to_string()],
            )
            .unwrap();
        let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
        assert!(
            neigh.contains("lladdr"),
            "no neighbour entry for {v6} after ping6: {neigh:?}"
        );
    }
}

#[test]
fn an_ipv4_multicast_group_reaches_its_members() {
    let (p, m) = planet_with_members();
    let (s, receivers) = (&m[0], &m[1..]);
    // The receivers join the group on their TAP and answer echoes sent to it.
    for r in receivers {
        r.ns.run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{GROUP}/32"),
                "dev",
                &r.dev,
                "autojoin",
            ],
        )
        .unwrap();
        r.ns.run("sysctl", &["-qw", "net.ipv4.icmp_echo_ignore_broadcasts=0"])
            .unwrap();
    }
    // Each receiver's agent sees the join on its TAP and announces the group (LIKE) to the
    // directory; once both list it, the sender's first gather finds both. (A sender that
    // already knows one member gathers again only after 60 s, as ZeroTier One does.)
    for r in receivers {
        p.wait(
            &format!("{} to subscribe to {GROUP}", r.name),
            Duration::from_secs(10),
            || {
                let (_, v) = p
                    .agent(&r.agent)
                    .api("GET", &format!("/network/{}", r.nwid), None);
                let subscribed = v["multicastSubscriptions"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|g| g["mac"] == GROUP_MAC));
                Ok(subscribed.then_some(()))
            },
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut answered = Vec::new();
    for _ in 0..5 {
        let out =
            s.ns.command("ping")
                .args([
                    "-n", "-c", "3", "-i", "0.3", "-w", "2", "-t", "4", "-I", &s.dev, GROUP,
                ])
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        answered = receivers
            .iter()
            .filter(|r| text.contains(&format!("from {}:", r.ipv4.unwrap())))
            .map(|r| r.name.clone())
            .collect();
        if answered.len() == receivers.len() {
            break;
        }
    }
    assert_eq!(
        answered,
        ["r1", "r2"],
        "not every group member answered a ping to {GROUP}"
    );
}
