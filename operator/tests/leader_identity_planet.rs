//! The operator's own state against a real etcd + kube-apiserver: the controller identity
//! Secret (one winner when two replicas race to create it), Lease leader election between
//! in-process operators (exactly one of two leads; the standby takes over after a clean stop
//! and after a crash; a leader whose Lease is taken steps down), and the `flatwire-operator` binary with the Helm chart's flags: it
//! creates the identity, publishes a planet rooted at it, serves metrics, keeps the planet
//! across restarts, re-signs it when the endpoints change, and refuses a malformed Secret.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flatwire_operator::controller::{self, ControllerAddress, Options, Outcome};
use flatwire_operator::crd::Network;
use flatwire_operator::identity::{self, ControllerIdentity};
use flatwire_operator::leader::LeaseConfig;
use flatwire_operator::metrics::Metrics;
use flatwire_operator::planet::PLANET_KEY;
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::process::Proc;
use flatwire_vl1::World;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, block_in_place};

const NS: &str = "flatwire-system";
const TIMEOUT: Duration = Duration::from_secs(60);
const LEASE: Duration = Duration::from_secs(4);
const RENEW: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(500);

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    block_in_place(|| {
        cp.kubectl_run(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    })
}

/// Polls `f` until it returns `Some`, panicking with `what` after `limit`.
async fn wait<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One in-process operator taking part in the election.
struct Instance {
    name: &'static str,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Outcome, controller::RunError>>,
}

impl Instance {
    fn start(client: &Client, name: &'static str) -> Self {
        let metrics = Arc::new(Metrics::new());
        let opts = Options {
            namespace: NS.into(),
            address: Some("89e92ceee5".parse::<ControllerAddress>().unwrap()),
            identity_secret: "unused".into(),
            root: None,
            election: Some(LeaseConfig {
                namespace: NS.into(),
                name: "flatwire-operator".into(),
                holder: name.into(),
                lease_duration: LEASE,
                renew_deadline: RENEW,
                retry_period: RETRY,
            }),
            sink: None,
            metrics: metrics.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(client.clone(), opts, async move {
            let _ = stopped.await;
        }));
        Self {
            name,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    fn leads(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// A clean stop (SIGTERM): the controllers stop and the Lease is released.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let out = tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the operator stops")
            .unwrap()
            .unwrap();
        assert_eq!(out, Outcome::Stopped, "{}", self.name);
    }
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases
        .get_opt("flatwire-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Waits until exactly one of `a`, `b` leads and the Lease names it; returns its name.
async fn one_leader(client: &Client, a: &Instance, b: &Instance) -> &'static str {
    wait("exactly one leader", TIMEOUT, async || {
        let leader = match (a.leads(), b.leads()) {
            (true, false) => a.name,
            (false, true) => b.name,
            _ => return None,
        };
        (holder(client).await.as_deref() == Some(leader)).then_some(leader)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_leader_election_and_planet_against_a_real_apiserver() {
    let cp = block_in_place(ControlPlane::start).expect("control plane (run `cargo xtask tools`)");
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    kubectl(&cp, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(&cp, &["create", "namespace", NS]);
    let client = controller::client(Some(cp.kubeconfig())).await.unwrap();

    // Two replicas racing to create the identity: one creates, both end with the same one.
    let (a, b) = tokio::join!(
        identity::load_or_create(client.clone(), NS, "race"),
        identity::load_or_create(client.clone(), NS, "race"),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.0.identity, b.0.identity);
    assert_eq!(a.0.world_public, b.0.world_public);
    assert!(a.1 ^ b.1, "exactly one created the Secret: {} {}", a.1, b.1);
    let again = identity::load_or_create(client.clone(), NS, "race")
        .await
        .unwrap();
    assert_eq!((again.0.identity, again.1), (a.0.identity.clone(), false));

    // Leader election: exactly one of two operators leads, and keeps leading.
    let one = Instance::start(&client, "op-a");
    let two = Instance::start(&client, "op-b");
    let first = one_leader(&client, &one, &two).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            one.leads() as u8 + two.leads() as u8,
            1,
            "one leader at a time"
        );
        assert_eq!(holder(&client).await.as_deref(), Some(first));
    }
    let (leader, standby) = if first == one.name {
        (one, two)
    } else {
        (two, one)
    };

    // A clean stop releases the Lease: the standby takes over at its next retry.
    let stopped_at = Instant::now();
    leader.stop().await;
    wait(
        "the standby leads after a clean stop",
        TIMEOUT,
        async || {
            (standby.leads() && holder(&client).await.as_deref() == Some(standby.name))
                .then_some(())
        },
    )
    .await;
    let clean = stopped_at.elapsed();
    assert!(clean < RETRY * 4, "takeover after a release took {clean:?}");

    // A crash (the task is dropped: no release, no more renewals): a new candidate takes
    // over once the Lease has been silent for the lease duration.
    let fresh = Instance::start(&client, "op-c");
    tokio::time::sleep(RETRY * 3).await;
    assert!(!fresh.leads(), "a candidate does not take a renewed Lease");
    standby.task.abort();
    let crashed_at = Instant::now();
    wait(
        "the new candidate leads after a crash",
        TIMEOUT,
        async || (fresh.leads() && holder(&client).await.as_deref() == Some("op-c")).then_some(()),
    )
    .await;
    let crash = crashed_at.elapsed();
    assert!(
        crash <= LEASE + RETRY * 2 + Duration::from_secs(1),
        "takeover after a crash took {crash:?} (lease {LEASE:?}, retry {RETRY:?})"
    );
    assert!(crash >= LEASE - RETRY * 2, "took over too early: {crash:?}");
    println!("takeover: {clean:?} after a clean stop, {crash:?} after a crash");

    // Someone else takes the Lease: the leader steps down (controllers stopped, run ends).
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let mut lease = leases.get("flatwire-operator").await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    leases
        .replace("flatwire-operator", &Default::default(), &lease)
        .await
        .unwrap();
    let out = tokio::time::timeout(TIMEOUT, fresh.task)
        .await
        .expect("the deposed leader stops")
        .unwrap()
        .unwrap();
    assert_eq!(out, Outcome::LostLeadership);
    assert_eq!(fresh.metrics.leader.get(), 0);
    assert_eq!(
        holder(&client).await.as_deref(),
        Some("intruder"),
        "not released"
    );

    // The binary with the chart's flags: identity Secret, planet ConfigMap, metrics.
    let metrics_port = free_port().unwrap();
    let endpoint = "198.18.0.1:9993";
    let mut op = Operator::start(
        &cp,
        metrics_port,
        &[endpoint],
        "flatwire-controller-identity",
    );
    op.wait_log("planet published").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = secrets.get("flatwire-controller-identity").await.unwrap();
    let id = ControllerIdentity::from_secret_data(secret.data.as_ref().unwrap()).unwrap();
    let planet1 = planet_bytes(&client).await;
    let (world, _) = World::parse(&planet1).unwrap();
    assert_eq!(world.id, id.identity.address().to_u64());
    assert_eq!(world.roots.len(), 1);
    assert_eq!(world.roots[0].identity, id.identity.to_public());
    assert_eq!(
        world.roots[0].stable_endpoints,
        vec![endpoint.parse().unwrap()]
    );
    assert!(world.verify_signature(&id.world_public));
    assert_eq!(world.updates_must_be_signed_by, id.world_public);
    // The controller address is the identity's: a Network's ID is under it.
    let yaml = "apiVersion: flatwire.io/v1alpha1\nkind: Network\nmetadata: {name: bin}\nspec: {number: 7}\n";
    block_in_place(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), yaml).unwrap();
        cp.kubectl_run(&["apply", "-f", f.path().to_str().unwrap()])
            .unwrap();
    });
    let nets: Api<Network> = Api::all(client.clone());
    let want = format!("{}000007", id.address());
    wait(
        "Network bin gets an ID under the identity",
        TIMEOUT,
        async || {
            let n = nets.get("bin").await.ok()?;
            (n.status?.network_id? == want).then_some(())
        },
    )
    .await;
    let text = wait("metrics of the leader", TIMEOUT, async || {
        let t = scrape(metrics_port).await?;
        t.contains("flatwire_operator_networks 1").then_some(t)
    })
    .await;
    assert!(text.contains("flatwire_operator_leader 1"), "{text}");
    assert!(
        text.contains(r#"flatwire_operator_reconciles_total{resource="network",result="ok"}"#),
        "{text}"
    );
    op.terminate();
    assert_eq!(holder(&client).await, None, "the binary released the Lease");

    // A restart reuses the identity and leaves the planet as it is.
    let mut op = Operator::start(
        &cp,
        metrics_port,
        &[endpoint],
        "flatwire-controller-identity",
    );
    op.wait_log("planet published").await;
    assert!(
        op.log().contains(&format!("address={}", id.address())),
        "{}",
        op.log()
    );
    assert_eq!(planet_bytes(&client).await, planet1, "planet unchanged");
    op.terminate();

    // New endpoints: a newer planet signed by the same world key, which agents accept.
    let mut op = Operator::start(
        &cp,
        metrics_port,
        &[endpoint, "198.18.0.2:9993"],
        "flatwire-controller-identity",
    );
    op.wait_log("planet published").await;
    let (world2, _) = World::parse(&planet_bytes(&client).await).unwrap();
    assert_eq!(world2.roots[0].stable_endpoints.len(), 2);
    assert!(world2.timestamp > world.timestamp);
    assert!(
        world.should_replace_with(&world2),
        "agents accept the update"
    );
    op.terminate();
    let after = secrets.get("flatwire-controller-identity").await.unwrap();
    assert_eq!(after.data, secret.data, "the identity never changes");

    // A malformed Secret is an error, and is left as it is.
    kubectl(
        &cp,
        &[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "broken",
            "--from-literal=identity.secret=not-an-identity",
        ],
    );
    let mut op = Operator::start(&cp, metrics_port, &[endpoint], "broken");
    let status = op.wait_exit();
    assert!(!status.success());
    let log = op.log();
    assert!(
        log.contains("identity Secret flatwire-system/broken is malformed")
            && log.contains("never replaces"),
        "{log}"
    );
    let broken = secrets.get("broken").await.unwrap();
    assert_eq!(broken.data.unwrap().len(), 1, "not regenerated");

    // Bad flags: a clear error before anything runs.
    let out = Command::new(env!("CARGO_BIN_EXE_flatwire-operator"))
        .args(["--lease-duration=15", "--leader-elect=true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--lease-duration") && err.contains("not a duration like 15s"),
        "{err}"
    );
}

async fn planet_bytes(client: &Client) -> Vec<u8> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let cm = cms.get("flatwire-planet").await.unwrap();
    cm.binary_data.unwrap()[PLANET_KEY].0.clone()
}

/// `GET /metrics` on loopback with curl.
async fn scrape(port: u16) -> Option<String> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sf",
            "-m",
            "2",
            &format!("http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `flatwire-operator` process with the chart's flags, its log in a file; ended by PID
/// when dropped.
struct Operator {
    proc: Proc,
    log: tempfile::NamedTempFile,
}

impl Operator {
    fn start(cp: &ControlPlane, metrics_port: u16, endpoints: &[&str], secret: &str) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatwire-operator"));
        cmd.arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args([
                &format!("--namespace={NS}"),
                "--leader-elect=true",
                "--lease-name=flatwire-operator",
                "--lease-duration=4s",
                "--renew-deadline=3s",
                "--retry-period=500ms",
                "--leader-identity=op-bin",
                "--root=true",
                "--planet-configmap=flatwire-planet",
                &format!("--identity-secret={secret}"),
                "--port=9993",
                &format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            ])
            .args(endpoints.iter().map(|e| format!("--stable-endpoint={e}")))
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .env_remove("FLATWIRE_CONTROLLER_ADDRESS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap());
        Self {
            proc: Proc::spawn("flatwire-operator", &mut cmd).unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        let _ = self.log.reopen().unwrap().read_to_string(&mut s);
        s
    }

    async fn wait_log(&mut self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.log().contains(what) {
            if let Some(st) = self.proc.try_status() {
                panic!("flatwire-operator exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        block_in_place(|| self.proc.wait_timeout(TIMEOUT))
            .unwrap_or_else(|| panic!("flatwire-operator did not exit:\n{}", self.log()))
    }

    /// SIGTERM, then a clean exit.
    fn terminate(mut self) {
        let pid = self.proc.pid().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        let st = self.wait_exit();
        assert!(st.success(), "exit {st} on SIGTERM:\n{}", self.log());
    }
}
