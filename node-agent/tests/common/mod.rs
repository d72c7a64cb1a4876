//! Helpers shared by the tests that run real `flatwire-agent` processes in namespaces.

#![allow(dead_code)] // Each test file uses its own subset.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use flatwire_agent::host;
use flatwire_agent::state::StateDir;
use flatwire_api::v1;
use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::process::Proc;
use flatwire_vl1::Identity;
use flatwire_vl2::NetworkId;

/// Fails loudly unless the test runs as root (namespaces, TAPs and routes need it).
pub fn assert_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root to create network namespaces and TAP devices"
    );
}

/// Starts an agent inside `host` with its state in `home` and its API socket at `socket`;
/// ended by PID when the returned guard drops. Without `--identity-pool` in `extra` it keeps
/// no pool (no background identity generation, no warmed identities at the roots).
pub fn start_agent(host: &Host, home: &Path, socket: &Path, extra: &[&str]) -> Proc {
    let mut cmd = host.command(env!("CARGO_BIN_EXE_flatwire-agent"));
    cmd.arg("--home")
        .arg(home)
        .arg("--socket")
        .arg(socket)
        .args(["--metrics-listen", "127.0.0.1:9994"])
        .args(extra);
    if !extra.contains(&"--identity-pool") {
        cmd.args(["--identity-pool", "0"]);
    }
    cmd.env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null());
    Proc::spawn(&format!("agent in {}", host.name()), &mut cmd).unwrap()
}

/// Starts the lab's root and controller (`--root --controller` with `planet`) inside `host`,
/// its state in `home` and its API socket at `home/agent.sock`, and waits for the socket.
pub fn start_controller(host: &Host, home: &Path, planet: &Path) -> Proc {
    let socket = home.join("agent.sock");
    let planet = planet.to_str().expect("a UTF-8 planet path");
    let mut ctl = start_agent(
        host,
        home,
        &socket,
        &["--planet", planet, "--root", "--controller"],
    );
    wait_socket(&mut ctl, &socket, "controller agent");
    ctl
}

/// One new host in `topo` per name in `names`, all on one switch `lan`, at
/// `198.18.0.<n>/24` in order from `.1`.
pub fn lan_hosts(topo: &mut Topology, names: &[&str]) -> Vec<Host> {
    let mut lan = topo.switch("lan").unwrap();
    let hosts: Vec<Host> = names.iter().map(|n| topo.host(n).unwrap()).collect();
    for (i, h) in hosts.iter().enumerate() {
        topo.plug(&mut lan, h, &format!("198.18.0.{}/24", i + 1))
            .unwrap();
    }
    hosts
}

/// Writes `dir/planet`: our own planet whose one root is `root` at `198.18.0.1:9993` (the
/// first of [`lan_hosts`]); returns its path.
pub fn write_lan_planet(dir: &Path, root: &Identity) -> PathBuf {
    let endpoint: std::net::SocketAddr = "198.18.0.1:9993".parse().unwrap();
    let path = dir.join("planet");
    std::fs::write(&path, flatwire_tests::zt_planet!(root, endpoint)).unwrap();
    path
}

/// Writes `value` as JSON to `path`, creating its directory.
pub fn write_json(path: &Path, value: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, value.to_string()).unwrap();
}

/// Writes network `nwid` into the controller store of the agent whose state is in `ctl_home`,
/// as ZeroTier controller JSON: private, named `net-<pool>`, MTU 2800, addresses
/// `<pool>.10`-`<pool>.250` with the route `<pool>.0/24` (`pool` is like `10.77.0`), and
/// `members` authorized.
pub fn write_network(ctl_home: &Path, nwid: NetworkId, pool: &str, members: &[&Identity]) {
    let nets = ctl_home.join("controller.d").join("network");
    let id = nwid.to_string();
    write_json(
        &nets.join(format!("{id}.json")),
        serde_json::json!({
            "id": id, "nwid": id, "name": format!("net-{pool}"), "private": true, "mtu": 2800,
            "ipAssignmentPools": [
                {"ipRangeStart": format!("{pool}.10"), "ipRangeEnd": format!("{pool}.250")}
            ],
            "routes": [{"target": format!("{pool}.0/24"), "via": null}],
            "v4AssignMode": {"zt": true}
        }),
    );
    std::fs::create_dir_all(nets.join(&id).join("member")).unwrap();
    for member in members {
        let a = member.address().to_string();
        write_json(
            &nets.join(&id).join("member").join(format!("{a}.json")),
            serde_json::json!({"id": a, "address": a, "nwid": id, "authorized": true}),
        );
    }
}

/// Waits (at most `limit`) for an IPv4 address on `dev` in `host`; fails at once if `agent`
/// exits.
pub fn wait_ipv4(host: &Host, dev: &str, agent: &mut Proc, limit: Duration) -> std::net::Ipv4Addr {
    let deadline = Instant::now() + limit;
    loop {
        assert!(agent.try_status().is_none(), "{} exited", agent.name());
        if let Some(a) = host.ipv4_on(dev) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no IPv4 address on {dev} in {} after {limit:?}",
            host.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The metrics of the agent in `host` (started by [`start_agent`]: its endpoint is on
/// loopback in its namespace).
pub fn scrape(host: &Host) -> String {
    let out = host
        .run("curl", &["-s", "-m", "5", "http://127.0.0.1:9994/metrics"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of sample `series` (name and labels) in scraped `text`, 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A root-and-controller `ctl` and members `m1`, `m2`, each with an identity in its state
/// dir `dir/<name>`, the LAN planet in `dir` and network `number` of `ctl`
/// (see [`write_network`]: addresses from `pool`) authorizing both members.
pub struct TwoMemberLab {
    /// The controller's identity (also the planet's root).
    pub root: Identity,
    /// `m1`'s and `m2`'s identities.
    pub members: [Identity; 2],
    /// The planet file.
    pub planet: std::path::PathBuf,
    /// The network.
    pub nwid: NetworkId,
}

impl TwoMemberLab {
    /// Writes the identities, the planet and the network under `dir`.
    pub fn write(dir: &Path, number: u32, pool: &str) -> Self {
        let root = new_identity(&dir.join("ctl"));
        let members = [new_identity(&dir.join("m1")), new_identity(&dir.join("m2"))];
        let planet = write_lan_planet(dir, &root);
        let nwid = NetworkId::new(root.address(), number);
        write_network(&dir.join("ctl"), nwid, pool, &[&members[0], &members[1]]);
        Self {
            root,
            members,
            planet,
            nwid,
        }
    }
}

/// Generates an identity and stores it in the state dir `home`, as the agent would.
pub fn new_identity(home: &Path) -> Identity {
    let id = Identity::generate(&AtomicBool::new(false)).unwrap();
    host::store_identity(&StateDir::open(home).unwrap(), &id).unwrap();
    id
}

/// Waits up to 10 s until `agent` (named `what` in failures) has created its API socket at
/// `socket`; fails at once if it exits.
pub fn wait_socket(agent: &mut Proc, socket: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(agent.try_status().is_none(), "{what} exited");
        assert!(Instant::now() < deadline, "{what} never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An Attach request for the pod whose namespace is `pod` (named after it, in namespace
/// `default`, UID `uid-<name>`) on network `nwid` in `mode`, under CNI network name `flat`.
pub fn attach_request(pod: &Host, nwid: NetworkId, mode: v1::Mode) -> v1::AttachRequest {
    v1::AttachRequest {
        key: Some(v1::AttachmentKey {
            network_name: "flat".into(),
            container_id: pod.name().into(),
            ifname: "eth0".into(),
        }),
        netns_path: pod.netns_path(),
        network_id: nwid.to_string(),
        mode: mode as i32,
        pod: Some(v1::PodRef {
            namespace: "default".into(),
            name: pod.name().into(),
            uid: format!("uid-{}", pod.name()),
        }),
        ..Default::default()
    }
}
