//! Helpers shared by the tests that run real `flatwire-agent` processes in namespaces.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use flatwire_agent::host;
use flatwire_agent::state::StateDir;
use flatwire_tests::netns::Host;
use flatwire_tests::process::Proc;
use flatwire_vl1::Identity;

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
