//! Starts the real `flatwire-agent` binary on a temporary socket and talks to it through the
//! `flatwire-api` client.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flatwire_api::{ClientOptions, connect_checked, v1};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The agent process; killed (by its own PID) if a test fails before stopping it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Agent {
    /// Waits (at most 20 s) for the agent to exit by itself; returns its status and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    }
}

fn start(home: &Path, socket: &Path) -> Agent {
    Agent(
        Command::new(env!("CARGO_BIN_EXE_flatwire-agent"))
            .arg("--home")
            .arg(home)
            .arg("--socket")
            .arg(socket)
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn key() -> v1::AttachmentKey {
    v1::AttachmentKey {
        network_name: "flat".into(),
        container_id: "c0ffee".into(),
        ifname: "eth0".into(),
    }
}

#[tokio::test]
async fn status_through_the_api_client_then_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/agent.sock");
    let mut agent = start(&dir.path().join("home"), &socket);

    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut client, status) = loop {
        match connect_checked(&socket, ClientOptions::default()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "agent never answered: {e}");
                assert!(agent.0.try_wait().unwrap().is_none(), "agent exited early");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(status.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.api_version, flatwire_api::API_VERSION);
    // No planet: the identity exists (generated on first start) but the node cannot run.
    assert!(!status.ready);
    assert_eq!(status.node_address.len(), 10, "{status:?}");
    assert_eq!(status.not_ready_reasons.len(), 1, "{status:?}");
    let reason = &status.not_ready_reasons[0];
    assert!(
        reason.starts_with("the VL1 node is not running yet") && reason.contains("no planet"),
        "{reason}"
    );

    // No fake attachments: Attach is unavailable, the rest answer for the empty set.
    let err = client
        .attach(v1::AttachRequest {
            key: Some(key()),
            netns_path: "/var/run/netns/x".into(),
            network_id: "8056c2e21c000001".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("not running"), "{}", err.message());
    let err = client
        .attach(v1::AttachRequest {
            key: Some(key()),
            netns_path: "/var/run/netns/x".into(),
            network_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let detached = client
        .detach(v1::DetachRequest {
            key: Some(key()),
            netns_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!detached.removed);
    let list = client
        .list_attachments(v1::ListAttachmentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.attachments.is_empty());

    // SIGTERM while a client is still connected: clean exit within the grace period, socket
    // removed. (Never block this runtime's thread: the client's connection task runs on it.)
    kill(Pid::from_raw(agent.0.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "agent ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(client);
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}

#[test]
fn unusable_state_dir_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::write(&home, b"a file, not a directory").unwrap();
    let agent = start(&home, &dir.path().join("agent.sock"));
    let (status, stderr) = agent.finish();
    assert!(!status.success());
    assert!(stderr.contains(&home.display().to_string()), "{stderr}");
}

#[test]
fn live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let agent = start(&dir.path().join("home"), &socket);
    let (status, stderr) = agent.finish();
    assert!(!status.success());
    assert!(stderr.contains("already listening"), "{stderr}");
    assert!(socket.exists());
}

#[test]
fn corrupt_identity_refuses_to_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let secret = home.join("identity.secret");
    std::fs::write(&secret, b"0123456789:0:not-a-key\n").unwrap();
    let agent = start(&home, &dir.path().join("agent.sock"));
    let (status, stderr) = agent.finish();
    assert!(!status.success());
    assert!(stderr.contains(&secret.display().to_string()), "{stderr}");
    assert!(stderr.contains("corrupted"), "{stderr}");
    // Nothing was regenerated over it.
    assert_eq!(std::fs::read(&secret).unwrap(), b"0123456789:0:not-a-key\n");
}

#[test]
fn root_flag_requires_being_a_root_of_the_planet() {
    use flatwire_vl1::{Identity, Root, World, WorldType};
    let dir = tempfile::tempdir().unwrap();
    let other = Identity::generate(&std::sync::atomic::AtomicBool::new(false)).unwrap();
    let (pk, sk) = flatwire_vl1::identity::generate_key_pair().unwrap();
    let planet = World::create(
        WorldType::Planet,
        1,
        1,
        pk,
        vec![Root {
            identity: other.clone(),
            stable_endpoints: vec!["198.18.0.1:9993".parse().unwrap()],
        }],
        &sk,
    )
    .unwrap();
    let file = dir.path().join("planet");
    std::fs::write(&file, planet.serialize(false)).unwrap();
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_flatwire-agent"))
            .arg("--home")
            .arg(dir.path().join("home"))
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(["--root", "--planet"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (status, stderr) = agent.finish();
    assert!(!status.success());
    assert!(stderr.contains("is not one of the roots"), "{stderr}");
    assert!(stderr.contains(&other.address().to_string()), "{stderr}");
}

#[test]
fn malformed_kubernetes_mode_flags_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expect) in [
        (
            &["--planet-configmap", "no-namespace"][..],
            "NAMESPACE/NAME",
        ),
        (&["--planet-configmap", "ns/a/b"][..], "NAMESPACE/NAME"),
        (&["--pod-gc-grace", "soon"][..], "--pod-gc-grace"),
        (&["--pod-gc-grace=-5"][..], "--pod-gc-grace"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flatwire-agent"))
            .arg("--home")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a refused start wrote state"
    );
}

#[test]
fn a_data_plane_thread_count_out_of_range_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let agent = env!("CARGO_BIN_EXE_flatwire-agent");
    for bad in ["0", "65", "two", "-1"] {
        let out = std::process::Command::new(agent)
            .arg("--home")
            .arg(dir.path())
            .arg(format!("--dataplane-threads={bad}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--dataplane-threads"), "{bad}: {stderr}");
    }
    // The same value from the environment is checked the same way.
    let out = std::process::Command::new(agent)
        .arg("--home")
        .arg(dir.path())
        .env("FLATWIRE_DATAPLANE_THREADS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}
