//! A planet of real `flatwire-agent` processes in network namespaces (needs root): one root
//! agent and two member agents on one switch, each with its own state dir, API socket and
//! metrics port inside its namespace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_agent::host;
use flatwire_api::{ClientOptions, connect_checked, v1};
use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::planet::sample;
use flatwire_tests::process::Proc;
use flatwire_vl1::{Identity, Root, World, WorldType};

mod common;

use common::{assert_root, lan_hosts, new_identity, scrape, start_agent};

/// Polls `Status` until ready (at most `limit`); returns the last answer.
async fn wait_ready(socket: &Path, proc: &mut Proc, limit: Duration) -> v1::StatusResponse {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        assert!(proc.try_status().is_none(), "{} exited", proc.name());
        if let Ok((_, s)) = connect_checked(socket, ClientOptions::default()).await {
            if s.ready {
                return s;
            }
            last = Some(s);
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready after {limit:?}: {last:?}",
            proc.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn total_drops(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("flatwire_drops_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls the metrics of `host` until `ok` holds (at most 20 s); returns the last scrape.
fn wait_metrics(host: &Host, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(host);
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; metrics of {}:\n{m}",
            host.name()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Our planet, signed with `key`, with `root` as its only root.
fn planet(
    root: &Identity,
    endpoint: &str,
    key: &(
        [u8; flatwire_vl1::identity::PUBLIC_KEY_LEN],
        [u8; flatwire_vl1::identity::SECRET_KEY_LEN],
    ),
    timestamp: u64,
) -> World {
    World::create(
        WorldType::Planet,
        0x00f1_a7f1,
        timestamp,
        key.0,
        vec![Root {
            identity: root.clone(),
            stable_endpoints: vec![endpoint.parse().unwrap()],
        }],
        &key.1,
    )
    .unwrap()
}

#[tokio::test]
async fn root_and_two_members_in_namespaces() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let names = ["root", "m1", "m2", "junk"];
    let hosts = lan_hosts(&mut topo, &names);
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| dir.path().join(n).join("home");
    let sock = |n: &str| dir.path().join(n).join("agent.sock");

    // The root's identity is made before its agent starts, so the planet can name it.
    let root_id = new_identity(&home("root"));
    // Members start with one revision of the planet; the root serves a newer one signed with
    // the same key, which it pushes in OK(HELLO) and which the members must persist.
    let key = flatwire_vl1::identity::generate_key_pair().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let old_planet = planet(&root_id, "198.18.0.1:9993", &key, now);
    let new_planet = planet(&root_id, "198.18.0.1:9993", &key, now + 1);
    let planet_file: PathBuf = dir.path().join("planet");
    std::fs::write(&planet_file, old_planet.serialize(false)).unwrap();
    let planet_arg = planet_file.to_str().unwrap();
    let newer_file: PathBuf = dir.path().join("planet-newer");
    std::fs::write(&newer_file, new_planet.serialize(false)).unwrap();

    let started = Instant::now();
    let mut root = start_agent(
        &hosts[0],
        &home("root"),
        &sock("root"),
        &["--planet", newer_file.to_str().unwrap(), "--root"],
    );
    let mut m1 = start_agent(
        &hosts[1],
        &home("m1"),
        &sock("m1"),
        &["--planet", planet_arg],
    );
    let mut m2 = start_agent(
        &hosts[2],
        &home("m2"),
        &sock("m2"),
        &["--planet", planet_arg],
    );

    let limit = Duration::from_secs(30);
    let s_root = wait_ready(&sock("root"), &mut root, limit).await;
    assert_eq!(s_root.node_address, root_id.address().to_string());
    let s1 = wait_ready(&sock("m1"), &mut m1, limit).await;
    let s2 = wait_ready(&sock("m2"), &mut m2, limit).await;
    eprintln!(
        "all three agents ready {:?} after start (root {}, members {} {})",
        started.elapsed(),
        s_root.node_address,
        s1.node_address,
        s2.node_address
    );
    assert_eq!(s1.node_address.len(), 10);
    assert_ne!(s1.node_address, s2.node_address);
    assert!(s1.not_ready_reasons.is_empty() && s2.not_ready_reasons.is_empty());

    // Each member knows exactly one peer, the root (roots are seeded from the planet), and has
    // a direct path to it; the root knows both members.
    for h in &hosts[1..3] {
        wait_metrics(h, "member sees the root over a direct path", |m| {
            sample(m, "flatwire_peers") == Some(1.0)
                && sample(m, "flatwire_paths{kind=\"direct\"}") == Some(1.0)
                && sample(m, "flatwire_paths{kind=\"relayed\"}") == Some(0.0)
        });
    }
    wait_metrics(&hosts[0], "root sees both members directly", |m| {
        sample(m, "flatwire_peers") == Some(2.0)
            && sample(m, "flatwire_paths{kind=\"direct\"}") == Some(2.0)
    });

    // The root pushed its newer planet and each member stored it in its state dir.
    for n in ["m1", "m2"] {
        let path = home(n).join(host::PLANET);
        let deadline = Instant::now() + limit;
        while std::fs::read(&path).unwrap() != new_planet.serialize(false) {
            assert!(
                Instant::now() < deadline,
                "{n} never stored the pushed planet"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Garbage from another namespace: 50 runt datagrams (6 bytes: `Runt`) and 50 of random
    // bytes. Each is a counted drop; the agent stays up and ready.
    let before = total_drops(&scrape(&hosts[0]));
    hosts[3]
        .run(
            "bash",
            &[
                "-c",
                "for i in $(seq 50); do printf 'junk%02d' $i > /dev/udp/198.18.0.1/9993; \
                 head -c 120 /dev/urandom > /dev/udp/198.18.0.1/9993; done",
            ],
        )
        .unwrap();
    let m = wait_metrics(&hosts[0], "garbage counted as drops", |m| {
        sample(m, "flatwire_drops_total{reason=\"Runt\"}").unwrap_or(0.0) >= 50.0
            && total_drops(m) - before >= 100.0
    });
    eprintln!(
        "root drops after garbage: {}",
        m.lines()
            .filter(|l| l.starts_with("flatwire_drops_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let again = wait_ready(&sock("root"), &mut root, limit).await;
    assert_eq!(again.node_address, s_root.node_address);

    // A restarted member keeps its identity (and its planet: no --planet this time).
    m2.stop();
    let mut m2 = start_agent(&hosts[2], &home("m2"), &sock("m2"), &[]);
    let restarted = Instant::now();
    let s2b = wait_ready(&sock("m2"), &mut m2, limit).await;
    eprintln!("m2 ready again {:?} after restart", restarted.elapsed());
    assert_eq!(s2b.node_address, s2.node_address);
    wait_metrics(&hosts[2], "restarted member sees the root directly", |m| {
        sample(m, "flatwire_paths{kind=\"direct\"}") == Some(1.0)
    });

    // Clean shutdown of every agent (SIGTERM) before the namespaces go.
    for p in [&mut root, &mut m1, &mut m2] {
        p.stop();
    }
    drop(topo);
}
