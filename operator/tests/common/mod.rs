//! Shared setup of the operator tests that write to a real controller: kubectl helpers, a
//! real `flatwire-agent --root --controller` on loopback (with a planet of our own whose only
//! root is that agent), the CRDs installed into a real etcd + kube-apiserver, and the
//! operator's controllers running against both.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_operator::controller::{self, ControllerAddress};
use flatwire_operator::metrics::Metrics;
use flatwire_operator::sink::{ControllerSink, HttpSink};
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::k8s;
use flatwire_tests::planet::{Profile, agent_binary};
use flatwire_tests::process::Proc;
use flatwire_vl1::identity::generate_key_pair;
use flatwire_vl1::{Identity, Root, World, WorldType};
use serde_json::Value;
use tokio::task::{JoinHandle, block_in_place};

/// How long any awaited condition may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs kubectl against `cp` ([`k8s::kubectl`] off the async workers); panics with its
/// output on failure.
pub fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    block_in_place(|| k8s::kubectl(cp, args))
}

/// `kubectl apply` of `yaml` ([`k8s::apply`] off the async workers).
pub fn apply(cp: &ControlPlane, yaml: &str) {
    block_in_place(|| k8s::apply(cp, yaml));
}

/// Starts the control plane and installs the checked-in CRDs (established).
pub fn control_plane_with_crds() -> ControlPlane {
    block_in_place(|| {
        let cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
        k8s::install_crds(&cp);
        cp
    })
}

/// A `flatwire-agent --root --controller` on loopback ports of its own.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its home directory (identity, token, controller.d, log).
    pub home: tempfile::TempDir,
    /// Its address (the controller address).
    pub address: String,
    /// Its HTTP API.
    pub api: SocketAddr,
}

impl Agent {
    /// Starts one and waits until its controller API answers.
    pub async fn start() -> Self {
        let bin = block_in_place(|| agent_binary(Profile::Debug)).expect("flatwire-agent build");
        let home = tempfile::tempdir().unwrap();
        let id = Identity::generate(&AtomicBool::new(false)).unwrap();
        std::fs::write(
            home.path().join("identity.secret"),
            format!("{}\n", id.to_secret_string().unwrap()),
        )
        .unwrap();
        std::fs::write(home.path().join("identity.public"), format!("{id}\n")).unwrap();
        let port = free_port().unwrap();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let (public, secret) = generate_key_pair().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let roots = vec![Root {
            identity: id.to_public(),
            stable_endpoints: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        }];
        let world =
            World::create(WorldType::Planet, 0x00f1_a7e3, now, public, roots, &secret).unwrap();
        let planet = home.path().join("planet.in");
        std::fs::write(&planet, world.serialize(false)).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--home")
            .arg(home.path())
            .args(["--port", &port.to_string()])
            .arg("--socket")
            .arg(home.path().join("agent.sock"))
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", free_port().unwrap()),
            ])
            .args(["--api-listen", &api.to_string()])
            .arg("--planet")
            .arg(&planet)
            .args(["--root", "--controller"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.path().join("agent.log")).unwrap());
        let proc = Proc::spawn("flatwire-agent --controller", &mut cmd).unwrap();
        let mut agent = Self {
            proc,
            home,
            address: id.address().to_string(),
            api,
        };
        let (code, v) = wait("the agent's controller API", async || {
            let r = agent.get("/controller");
            (r.0 == 200).then_some(r)
        })
        .await;
        assert_eq!((code, v["controller"].clone()), (200, Value::Bool(true)));
        agent
    }

    /// The API token.
    pub fn token(&self) -> Option<String> {
        std::fs::read_to_string(self.home.path().join("authtoken.secret")).ok()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("agent.log")).unwrap_or_default()
    }

    /// `GET path` on its API: (status, body).
    pub fn get(&mut self, path: &str) -> (u16, Value) {
        assert!(
            self.proc.try_status().is_none(),
            "the agent exited:\n{}",
            self.log()
        );
        let token = self.token().unwrap_or_default();
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-w", "\n%{http_code}", "-H"])
            .arg(format!("X-ZT1-Auth: {}", token.trim()))
            .arg(format!("http://{}{path}", self.api))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    /// An [`HttpSink`] writing to its controller.
    pub fn sink(&self) -> Arc<dyn ControllerSink> {
        let token = self.token().expect("the agent's API token");
        Arc::new(HttpSink::new(&format!("http://{}", self.api), &token).unwrap())
    }
}

/// The operator's controllers running against `cp`, writing to `agent`'s controller.
pub struct Operator {
    /// The API client.
    pub client: kube::Client,
    /// Their metrics.
    pub metrics: Arc<Metrics>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Operator {
    /// Starts [`controller::run_controllers`] with the agent's address and sink.
    pub async fn start(cp: &ControlPlane, agent: &Agent) -> Self {
        Self::start_with(cp, agent.address.parse().unwrap(), agent.sink()).await
    }

    /// Starts [`controller::run_controllers`] with controller `address` writing to `sink`.
    pub async fn start_with(
        cp: &ControlPlane,
        address: ControllerAddress,
        sink: Arc<dyn ControllerSink>,
    ) -> Self {
        let client = controller::client(Some(cp.kubeconfig())).await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run_controllers(
            client.clone(),
            address,
            Some(sink),
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            client,
            metrics,
            stop,
            task,
        }
    }

    /// Stops the controllers and waits for them.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("controllers stop")
            .unwrap();
    }
}

/// Polls `f` until it returns `Some`, panicking with `what` after [`TIMEOUT`].
pub async fn wait<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    wait_for(what, TIMEOUT, f).await
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after `limit`.
pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Events (events.k8s.io/v1) of every namespace.
pub fn events(cp: &ControlPlane) -> Vec<Value> {
    block_in_place(|| k8s::events(cp))
}
