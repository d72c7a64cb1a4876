//! The `NetworkMember` reconciler end to end: a real `flatwire-agent --controller` on
//! loopback (with a planet of our own whose only root is that agent) is the controller
//! store, reached through its HTTP API by the operator's `HttpSink`; Networks and
//! NetworkMembers are applied with kubectl to a real etcd + kube-apiserver. The member
//! JSON appears in the agent's controller, changes follow the spec, a member with an unknown
//! tag gets `Ready=False` and a Warning Event without reaching the controller, and deleting
//! the NetworkMember removes it from the controller before the object goes (finalizer).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_operator::controller::{self, ControllerAddress};
use flatwire_operator::crd::NetworkMember;
use flatwire_operator::metrics::Metrics;
use flatwire_operator::sink::{ControllerSink, HttpSink};
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::planet::{Profile, agent_binary};
use flatwire_tests::process::Proc;
use flatwire_vl1::identity::generate_key_pair;
use flatwire_vl1::{Identity, Root, World, WorldType};
use kube::Api;
use serde_json::Value;
use tokio::task::block_in_place;

const TIMEOUT: Duration = Duration::from_secs(60);
const MEMBER: &str = "0123456789";

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    block_in_place(|| {
        cp.kubectl_run(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    })
}

fn apply(cp: &ControlPlane, yaml: &str) {
    block_in_place(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), yaml).unwrap();
        cp.kubectl_run(&["apply", "-f", f.path().to_str().unwrap()])
            .unwrap_or_else(|e| panic!("kubectl apply:\n{yaml}\n{e}"));
    });
}

/// A `flatwire-agent --root --controller` on loopback ports of its own.
struct Agent {
    proc: Proc,
    home: tempfile::TempDir,
    address: String,
    api: SocketAddr,
}

impl Agent {
    fn start() -> Self {
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
        Self {
            proc,
            home,
            address: id.address().to_string(),
            api,
        }
    }

    fn token(&self) -> Option<String> {
        std::fs::read_to_string(self.home.path().join("authtoken.secret")).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("agent.log")).unwrap_or_default()
    }

    /// `GET path` on its API: (status, body).
    fn get(&mut self, path: &str) -> (u16, Value) {
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
}

/// Polls `f` until it returns `Some`, panicking with `what` after [`TIMEOUT`].
async fn wait<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cond(m: &NetworkMember, t: &str) -> Option<(String, String, String)> {
    let c = m
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn member_yaml(name: &str, address: &str, authorized: bool, extra: &str) -> String {
    format!(
        "apiVersion: flatwire.io/v1alpha1\nkind: NetworkMember\nmetadata:\n  name: {name}\n\
         spec:\n  network: lab\n  address: \"{address}\"\n  authorized: {authorized}\n{extra}"
    )
}

const NETWORK: &str = r#"
apiVersion: flatwire.io/v1alpha1
kind: Network
metadata:
  name: lab
spec:
  number: 5
  name: lab
  ipAssignmentPools:
  - {ipRangeStart: 198.19.0.10, ipRangeEnd: 198.19.0.250}
  routes:
  - {target: 198.19.0.0/24}
  v4AssignMode: [pool]
  tags:
  - {name: department, id: 1000, enum: {eng: 100, ops: 200}}
  capabilities:
  - {name: superuser, id: 7, rules: "accept;"}
  rules: |
    drop not ethertype ipv4 and not ethertype arp;
    accept;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_members_reach_a_real_agent_controller() {
    let mut agent = Agent::start();
    let cp = block_in_place(ControlPlane::start).expect("control plane (run `cargo xtask tools`)");
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    kubectl(&cp, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(
        &cp,
        &[
            "wait",
            "--for=condition=established",
            "crd/networks.flatwire.io",
            "crd/networkmembers.flatwire.io",
            "--timeout=60s",
        ],
    );
    let (code, v) = wait("the agent's controller API", async || {
        let r = agent.get("/controller");
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!((code, v["controller"].clone()), (200, Value::Bool(true)));

    let client = controller::client(Some(cp.kubeconfig())).await.unwrap();
    let address: ControllerAddress = agent.address.parse().unwrap();
    let token = agent.token().unwrap();
    let sink: Arc<dyn ControllerSink> =
        Arc::new(HttpSink::new(&format!("http://{}", agent.api), &token).unwrap());
    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ctl = tokio::spawn(controller::run_controllers(
        client.clone(),
        address,
        Some(sink),
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let members: Api<NetworkMember> = Api::all(client.clone());
    let nwid = format!("{}000005", agent.address);
    let member_path = format!("/controller/network/{nwid}/member/{MEMBER}");

    // An authorized member with a tag, a capability and a static IP.
    apply(&cp, NETWORK);
    apply(
        &cp,
        &member_yaml(
            "laptop",
            MEMBER,
            true,
            "  tags: {department: ops}\n  capabilities: [superuser]\n  \
             ipAssignments: [198.19.0.9]\n  name: Ada's laptop\n",
        ),
    );
    let m = wait("laptop Ready", async || {
        let m = members.get("laptop").await.ok()?;
        (cond(&m, "Ready")?.0 == "True").then_some(m)
    })
    .await;
    assert_eq!(cond(&m, "Authorized").unwrap().1, "Authorized");
    assert_eq!(m.status.as_ref().unwrap().assigned_ips, vec!["198.19.0.9"]);
    assert!(
        m.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "flatwire.io/deauthorize"),
        "{:?}",
        m.metadata.finalizers
    );
    let (code, mj) = agent.get(&member_path);
    assert_eq!(code, 200, "{mj}");
    assert_eq!(mj["authorized"], true);
    assert_eq!(mj["tags"], serde_json::json!([[1000, 200]]));
    assert_eq!(mj["capabilities"], serde_json::json!([7]));
    assert_eq!(mj["ipAssignments"], serde_json::json!(["198.19.0.9"]));
    assert_eq!(mj["name"], "Ada's laptop");
    assert_eq!(mj["activeBridge"], false);
    let (code, nj) = agent.get(&format!("/controller/network/{nwid}"));
    assert_eq!(code, 200, "{nj}");
    assert_eq!(nj["name"], "lab");
    assert_eq!(nj["ipAssignmentPools"][0]["ipRangeStart"], "198.19.0.10");
    assert_eq!(nj["v4AssignMode"]["zt"], true);
    assert_eq!(nj["capabilities"][0]["id"], 7);

    // A spec change reaches the controller: deauthorized, tag changed.
    apply(
        &cp,
        &member_yaml("laptop", MEMBER, false, "  tags: {department: eng}\n"),
    );
    let mj = wait("laptop deauthorized in the controller", async || {
        let (code, mj) = agent.get(&member_path);
        (code == 200 && mj["authorized"] == false).then_some(mj)
    })
    .await;
    assert_eq!(mj["tags"], serde_json::json!([[1000, 100]]));
    let m = wait("laptop NotAuthorized", async || {
        let m = members.get("laptop").await.ok()?;
        (cond(&m, "Authorized")?.1 == "NotAuthorized").then_some(m)
    })
    .await;
    assert_eq!(cond(&m, "Ready").unwrap().0, "True");

    // An invalid member: Ready=False with the reason, a Warning Event, nothing written.
    apply(
        &cp,
        &member_yaml("odd", "0123456788", true, "  tags: {team: a}\n"),
    );
    let m = wait("odd reported", async || {
        let m = members.get("odd").await.ok()?;
        cond(&m, "Ready").filter(|c| c.0 == "False").map(|_| m)
    })
    .await;
    let (_, reason, msg) = cond(&m, "Ready").unwrap();
    assert_eq!(reason, "UnknownTag");
    assert!(msg.contains("\"team\""), "{msg}");
    let events = kubectl(&cp, &["get", "events.v1.events.k8s.io", "-A", "-o", "json"]);
    let events: Value = serde_json::from_str(&events).unwrap();
    assert!(
        events["items"].as_array().unwrap().iter().any(|e| {
            e["regarding"]["name"] == "odd" && e["reason"] == "UnknownTag" && e["type"] == "Warning"
        }),
        "no UnknownTag Warning Event"
    );
    let (code, _) = agent.get(&format!("/controller/network/{nwid}/member/0123456788"));
    assert_eq!(code, 404, "an invalid member is not written");
    let text = wait("member count in the metrics", async || {
        let t = metrics.encode();
        t.contains("flatwire_operator_network_members 2")
            .then_some(t)
    })
    .await;
    assert!(text.contains("flatwire_operator_networks 1"), "{text}");

    // Deleting the NetworkMember removes it from the controller first.
    kubectl(
        &cp,
        &[
            "delete",
            "networkmember",
            "laptop",
            "--wait=true",
            "--timeout=60s",
        ],
    );
    let (code, body) = agent.get(&member_path);
    assert_eq!(code, 404, "still in the controller: {body}");
    assert!(members.get_opt("laptop").await.unwrap().is_none());
    let (code, list) = agent.get(&format!("/controller/network/{nwid}/member"));
    assert_eq!(code, 200);
    assert!(list.get(MEMBER).is_none(), "{list}");

    let text = metrics.encode();
    assert!(
        text.contains(
            r#"flatwire_operator_reconciles_total{resource="networkmember",result="ok"}"#
        ),
        "{text}"
    );

    assert!(agent.proc.try_status().is_none(), "the agent kept running");

    // The controller goes away: a new member gets Ready=False ControllerError and an Event,
    // and the failed reconciles are counted.
    block_in_place(|| agent.proc.stop());
    apply(&cp, &member_yaml("late", "0123456787", true, ""));
    let m = wait("late reported", async || {
        let m = members.get("late").await.ok()?;
        cond(&m, "Ready").filter(|c| c.0 == "False").map(|_| m)
    })
    .await;
    let (_, reason, msg) = cond(&m, "Ready").unwrap();
    assert_eq!(reason, "ControllerError");
    assert!(msg.contains(&agent.api.to_string()), "{msg}");
    wait("a failed reconcile in the metrics", async || {
        metrics
            .encode()
            .contains(
                r#"flatwire_operator_reconciles_total{resource="networkmember",result="error"}"#,
            )
            .then_some(())
    })
    .await;

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, ctl)
        .await
        .expect("controllers stop")
        .unwrap();
}
