//! Helpers shared by the tests that run real `flatwire-agent` processes in namespaces.

#![allow(dead_code)] // Each test file uses its own subset.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use flatwire_agent::host;
use flatwire_agent::state::StateDir;
use flatwire_api::v1;
use flatwire_tests::netns::Host;
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
