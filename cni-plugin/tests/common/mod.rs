//! Helpers shared by the CNI plugin's tests: running the real `flatwire-cni` binary, the real
//! `cnitool`, and real `flatwire-agent` processes in harness namespaces with a planet of our own.

#![allow(dead_code)] // Each test file uses its own subset.

use std::ffi::OsStr;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_agent::host;
use flatwire_agent::state::StateDir;
use flatwire_api::v1;
use flatwire_tests::netns::Host;
use flatwire_tests::process::Proc;
use flatwire_tests::tools;
use flatwire_vl1::{Identity, Root, World, WorldType};

/// The plugin binary under test.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_flatwire-cni");

/// What one plugin run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    /// Exit success.
    pub ok: bool,
    /// stdout parsed as JSON (`None` when empty or not JSON).
    pub json: Option<serde_json::Value>,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
    /// Wall time of the run.
    pub took: Duration,
}

/// Runs `cmd` with `stdin` and collects what it printed.
pub fn run_cmd(mut cmd: Command, stdin: &[u8]) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    // A plugin may exit before reading stdin (e.g. on a bad environment): ignore EPIPE.
    let _ = child.stdin.take().expect("piped stdin").write_all(stdin);
    let out = child.wait_with_output().expect("wait for the command");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).ok();
    Run {
        ok: out.status.success(),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// Runs the plugin directly with exactly the environment `env` (plus PATH) and `stdin`.
pub fn plugin(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut cmd = Command::new(PLUGIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied());
    run_cmd(cmd, stdin.as_bytes())
}

/// Asserts that `run` failed with a CNI error object of `code` and returns it.
pub fn assert_cni_error(run: &Run, code: u64) -> serde_json::Value {
    assert!(!run.ok, "expected failure with code {code}: {run:?}");
    let err = run
        .json
        .clone()
        .unwrap_or_else(|| panic!("no error JSON on stdout: {run:?}"));
    assert_eq!(err["code"], code, "{err}");
    assert!(!err["msg"].as_str().unwrap_or_default().is_empty(), "{err}");
    err
}

/// A network config for the plugin alone (not a list).
pub fn netconf(version: &str, socket: &Path, extra: serde_json::Value) -> String {
    let mut conf = serde_json::json!({
        "cniVersion": version,
        "name": "flat",
        "type": "flatwire-cni",
        "network": "8056c2e21c000001",
        "agentSocket": socket,
    });
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    conf.to_string()
}

/// The `flatwire-agent` binary, built once per test process into the target directory and
/// profile (dev or `--release`) the plugin under test was built in.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = Path::new(PLUGIN).parent().expect("target/<profile>");
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let mut build = Command::new(cargo);
        build
            .current_dir(workspace)
            .args(["build", "-p", "flatwire-agent", "--bin", "flatwire-agent"])
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build -p flatwire-agent");
        assert!(status.success(), "cargo build -p flatwire-agent failed");
        let bin = profile_dir.join("flatwire-agent");
        assert!(bin.is_file(), "{} missing after the build", bin.display());
        bin
    })
}

/// Fails loudly unless the test runs as root (namespaces and TAP devices need it).
pub fn assert_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root to create network namespaces and TAP devices"
    );
}

/// Generates an identity and stores it in the state dir `home`, as the agent would.
pub fn new_identity(home: &Path) -> Identity {
    let id = Identity::generate(&AtomicBool::new(false)).expect("generate an identity");
    host::store_identity(&StateDir::open(home).expect("state dir"), &id).expect("store it");
    id
}

/// Writes a planet whose only root is `root` at `endpoint` to `path`.
pub fn write_planet(path: &Path, root: &Identity, endpoint: &str) {
    let key = flatwire_vl1::identity::generate_key_pair().expect("planet key");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let planet = World::create(
        WorldType::Planet,
        0x00f1_a7c1,
        now,
        key.0,
        vec![Root {
            identity: root.clone(),
            stable_endpoints: vec![endpoint.parse().expect("root endpoint")],
        }],
        &key.1,
    )
    .expect("create the planet");
    std::fs::write(path, planet.serialize(false)).expect("write the planet");
}

/// Starts the real agent inside `host` with its state in `home` and its API socket at
/// `socket`; ended by PID when the returned guard drops.
pub fn start_agent(host: &Host, home: &Path, socket: &Path, extra: &[&str]) -> Proc {
    let mut cmd = host.command(agent_binary());
    cmd.arg("--home")
        .arg(home)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    Proc::spawn(&format!("agent in {}", host.name()), &mut cmd).expect("start flatwire-agent")
}

/// Waits until `socket` exists (the agent serves its API), failing if `agent` exits.
pub fn wait_socket(agent: &mut Proc, socket: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !socket.exists() {
        assert!(agent.try_status().is_none(), "{} exited", agent.name());
        assert!(
            Instant::now() < deadline,
            "{} did not create {} within {limit:?}",
            agent.name(),
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A CNI setup for `cnitool`: the config directory and `CNI_PATH` (our installed plugin first,
/// then the pinned reference plugins).
pub struct CniEnv {
    /// Holds the config and binary directories.
    pub dir: tempfile::TempDir,
    /// `CNI_PATH`.
    pub cni_path: String,
}

impl CniEnv {
    /// Installs the plugin with `flatwire-cni install` (network `nwid`, agent at `socket`) into
    /// a fresh directory, and returns the setup.
    pub fn install(nwid: &str, socket: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new(PLUGIN)
            .arg("install")
            .arg("--bin-dir")
            .arg(dir.path().join("bin"))
            .arg("--conf-dir")
            .arg(dir.path().join("net.d"))
            .args(["--network", nwid])
            .arg("--agent-socket")
            .arg(socket)
            .env_remove("CNI_COMMAND")
            .output()
            .expect("run flatwire-cni install");
        assert!(
            out.status.success(),
            "flatwire-cni install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plugins = tools::cni_plugin_dir().expect("CNI plugins (run `cargo xtask tools`)");
        let cni_path = format!("{}:{}", dir.path().join("bin").display(), plugins.display());
        Self { dir, cni_path }
    }

    /// The configuration directory (`NETCONFPATH`).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    /// Runs `cnitool VERB flatwire NETNS` (the installed conflist) inside `node` with extra
    /// environment `env`.
    pub fn cnitool(
        &self,
        node: &Host,
        verb: &str,
        netns: impl AsRef<OsStr>,
        env: &[(&str, &str)],
    ) -> Run {
        self.cnitool_on("flatwire", node, verb, netns, env)
    }

    /// Runs `cnitool VERB NETWORK NETNS` inside `node` with extra environment `env`.
    pub fn cnitool_on(
        &self,
        network: &str,
        node: &Host,
        verb: &str,
        netns: impl AsRef<OsStr>,
        env: &[(&str, &str)],
    ) -> Run {
        let cnitool = tools::bin("cnitool").expect("cnitool (run `cargo xtask tools`)");
        let mut cmd = node.command(cnitool);
        cmd.arg(verb)
            .arg(network)
            .arg(netns)
            .env("NETCONFPATH", self.conf_dir())
            .env("CNI_PATH", &self.cni_path)
            .env_remove("CNI_COMMAND")
            .envs(env.iter().copied());
        run_cmd(cmd, b"")
    }
}

/// The attachments the agent at `socket` holds for the network name `flatwire` (the installed
/// conflist's).
pub fn attachments(socket: &Path) -> Vec<v1::Attachment> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut c = flatwire_api::connect(socket, flatwire_api::ClientOptions::default())
            .await
            .expect("connect to the agent");
        c.list_attachments(v1::ListAttachmentsRequest {
            network_name: "flatwire".into(),
        })
        .await
        .expect("ListAttachments")
        .into_inner()
        .attachments
    })
}

/// The first IPv4 (`v4`) or IPv6 address of `eth0` in a CNI result, without its prefix.
pub fn result_ip(result: &serde_json::Value, v4: bool) -> String {
    let eth0 = result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .position(|i| i["name"] == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in {result}"));
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter(|ip| ip["interface"] == eth0)
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next())
        .find(|a| a.contains(':') != v4)
        .unwrap_or_else(|| panic!("no IPv{} address in {result}", if v4 { 4 } else { 6 }))
        .to_owned()
}

/// A TCP listener on a port inside a harness namespace (a real socket there, held by a thread
/// of this test process): it accepts one connection and reports the peer address it saw, which
/// tells whether a NAT rewrote the source on the way.
pub struct PeerProbe {
    seen: std::thread::JoinHandle<Option<SocketAddr>>,
}

impl PeerProbe {
    /// Listens on `port` (all addresses) in `host`'s namespace; returns once it is bound.
    pub fn listen(host: &Host, port: u16, limit: Duration) -> Self {
        let netns = PathBuf::from(host.netns_path());
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let seen = std::thread::spawn(move || {
            flatwire_agent::tap::in_netns(&netns, move || {
                let io = |what| move |source| flatwire_agent::tap::TapError::Io { what, source };
                let l = TcpListener::bind(("0.0.0.0", port)).map_err(io("bind the probe"))?;
                l.set_nonblocking(true).map_err(io("probe non-blocking"))?;
                let _ = bound_tx.send(());
                let deadline = Instant::now() + limit;
                while Instant::now() < deadline {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nseen\n");
                            return Ok(Some(peer));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(io("accept on the probe")(e)),
                    }
                }
                Ok(None)
            })
            .expect("the probe listener")
        });
        bound_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the probe listener did not bind");
        Self { seen }
    }

    /// The peer of the one connection accepted, `None` if none came in time.
    pub fn peer(self) -> Option<SocketAddr> {
        self.seen.join().expect("probe thread")
    }
}

/// Puts `n` freshly generated member identities into the identity pool of the agent whose
/// state directory is `home` (generated here on two threads; the agent, stopped meanwhile,
/// checks and uses the files it finds at start).
pub fn fill_pool(home: &Path, n: usize) {
    let pool = StateDir::open(home.join(flatwire_agent::pool::POOL_DIR)).expect("pool dir");
    std::thread::scope(|s| {
        for part in [n / 2, n - n / 2] {
            let pool = &pool;
            s.spawn(move || {
                for _ in 0..part {
                    let id = Identity::generate(&AtomicBool::new(false)).expect("an identity");
                    let secret = id.to_secret_string().expect("its secret form");
                    pool.write(
                        &format!("{}.secret", id.address()),
                        secret.as_bytes(),
                        flatwire_agent::state::Sensitivity::Secret,
                    )
                    .expect("a pool file");
                }
            });
        }
    });
}
