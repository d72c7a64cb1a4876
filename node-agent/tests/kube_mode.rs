//! Kubernetes mode of the real `flatwire-agent` binary against a real etcd + kube-apiserver
//! (on loopback; the planet's only root is an unused loopback port, so nothing leaves the
//! machine), with nothing but the Helm chart's agent RBAC (its ServiceAccount's token):
//!
//! - started before the planet ConfigMap exists, the agent waits for it, stores it and runs;
//! - it writes its public host identity (never the secret) into its Node's annotation
//!   `flatwire.io/host-identity`, and puts it back after someone removes it;
//! - a newer planet signed by the planet's key reaches the state directory; a forged one
//!   does not;
//! - the operator's controller sidecar (`--root --controller --planet-configmap`, no Node,
//!   the chart's operator RBAC) takes the planet from the ConfigMap and serves it as its root;
//! - with the API server stopped the agent keeps running and serving `/status`, and it
//!   recovers when the API server is back;
//! - a bad kubeconfig, a missing Node and missing RBAC permissions end it at start with a
//!   clear message and a non-zero exit;
//! - in network namespaces with real roots (the API server reached through a
//!   [`TcpBridge`]): a signed planet update in the ConfigMap that adds a root is put in force
//!   in the running agent within seconds (it reaches the new root, and once the old root is
//!   stopped it resolves and reaches a node only the new root knows), while a forged or an
//!   older planet is refused with a log line and changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flatwire_agent::kube::HOST_IDENTITY_ANNOTATION;
use flatwire_tests::bridge::TcpBridge;
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::k8s::kubectl;
use flatwire_tests::netns::{Host, Topology, run_checked};
use flatwire_tests::process::Proc;
use flatwire_tests::tools;
use flatwire_vl1::identity::{PUBLIC_KEY_LEN, SECRET_KEY_LEN, generate_key_pair};
use flatwire_vl1::{Identity, Root, World, WorldType};
use serde_json::Value;

mod common;

const NS: &str = "flatwire-system";
const CM: &str = "flatwire-planet";
const NODE: &str = "node-a";
const PLANET_ID: u64 = 0x0000_f1a7_0001;

/// Polls `f` every 200 ms until it gives `Some`, failing with `what` after `limit`.
fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

type KeyPair = ([u8; PUBLIC_KEY_LEN], [u8; SECRET_KEY_LEN]);

/// Planet [`PLANET_ID`] at `timestamp` with `roots` (identity, endpoint), naming `key` for
/// updates and signed with `signer`.
fn world(
    roots: &[(&Identity, &str)],
    key: &KeyPair,
    signer: &[u8; SECRET_KEY_LEN],
    timestamp: u64,
) -> World {
    let roots = roots
        .iter()
        .map(|(id, ep)| Root {
            identity: id.to_public(),
            stable_endpoints: vec![ep.parse().unwrap()],
        })
        .collect();
    World::create(
        WorldType::Planet,
        PLANET_ID,
        timestamp,
        key.0,
        roots,
        signer,
    )
    .unwrap()
}

/// A planet whose only root is `root` at a loopback port nobody serves.
fn planet(
    root: &Identity,
    key: &KeyPair,
    signer: &[u8; SECRET_KEY_LEN],
    timestamp: u64,
    port: u16,
) -> World {
    world(
        &[(root, &format!("127.0.0.1:{port}"))],
        key,
        signer,
        timestamp,
    )
}

/// Creates or replaces the planet ConfigMap with `w` (binaryData, as the operator writes it).
fn publish(cp: &ControlPlane, dir: &Path, w: &World) {
    let file = dir.join("planet.bin");
    std::fs::write(&file, w.serialize(false)).unwrap();
    let from = format!("--from-file=planet={}", file.display());
    let manifest = kubectl(
        cp,
        &[
            "create",
            "configmap",
            CM,
            "-n",
            NS,
            &from,
            "--dry-run=client",
            "-o",
            "json",
        ],
    );
    assert!(manifest.contains("\"binaryData\""), "{manifest}");
    let path = dir.join("planet-cm.json");
    std::fs::write(&path, manifest).unwrap();
    kubectl(cp, &["apply", "-f", path.to_str().unwrap()]);
}

fn annotation(cp: &ControlPlane) -> String {
    kubectl(
        cp,
        &[
            "get",
            "node",
            NODE,
            "-o",
            r"jsonpath={.metadata.annotations.flatwire\.io/host-identity}",
        ],
    )
}

/// Runs the agent binary with `home` and `args`, stderr into `home/agent.log`.
fn agent(home: &Path, args: &[&str]) -> Proc {
    agent_in(None, home, args)
}

/// [`agent`] inside namespace `host` (`None`: the test's own).
fn agent_in(host: Option<&Host>, home: &Path, args: &[&str]) -> Proc {
    std::fs::create_dir_all(home).unwrap();
    let log = std::fs::File::create(home.join("agent.log")).unwrap();
    let bin = env!("CARGO_BIN_EXE_flatwire-agent");
    let mut cmd = host.map_or_else(|| Command::new(bin), |h| h.command(bin));
    cmd.arg("--home")
        .arg(home)
        .arg("--socket")
        .arg(home.join("agent.sock"))
        .args(["--metrics-listen", "127.0.0.1:0", "--identity-pool", "1"])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn("flatwire-agent", &mut cmd).unwrap()
}

/// The agent's log.
fn log_of(home: &Path) -> String {
    std::fs::read_to_string(home.join("agent.log")).unwrap_or_default()
}

/// Runs the agent with `args`, expecting it to exit by itself; its status and log.
fn agent_fails(home: &Path, args: &[&str]) -> (ExitStatus, String) {
    let mut p = agent(home, args);
    let status = p
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the agent kept running with {args:?}: {}", log_of(home)));
    (status, log_of(home))
}

/// `GET /status` on the agent's local API: the HTTP code and body.
fn status(port: u16, token: &str) -> (u16, String) {
    api(None, port, token, "GET", "/status")
}

/// `method path` on the local API at loopback `port` of namespace `host` (`None`: ours):
/// the HTTP code and body.
fn api(host: Option<&Host>, port: u16, token: &str, method: &str, path: &str) -> (u16, String) {
    let mut curl = host.map_or_else(|| Command::new("curl"), |h| h.command("curl"));
    let out = curl
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", "-X", method, "-H"])
        .arg(format!("X-ZT1-Auth: {token}"))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A kubeconfig in `dir` for ServiceAccount `ns/sa` (a token from the TokenRequest API).
fn token_kubeconfig(cp: &ControlPlane, dir: &Path, ns: &str, sa: &str) -> PathBuf {
    let token = kubectl(cp, &["create", "token", sa, "-n", ns]);
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {sa}\n  user:\n    token: {}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: {sa}\n\
             current-context: c\n",
            cp.server_url(),
            cp.dir().join("ca.crt").display(),
            token.trim()
        ),
    )
    .unwrap();
    path
}

/// Creates the Node object [`NODE`] (there is no kubelet to register it).
fn apply_node(cp: &ControlPlane, dir: &Path) {
    let node = dir.join("node.json");
    std::fs::write(
        &node,
        format!(r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{NODE}"}}}}"#),
    )
    .unwrap();
    kubectl(cp, &["apply", "-f", node.to_str().unwrap()]);
}

/// Applies the chart's ServiceAccount and RBAC of `component` (`agent` or `operator`;
/// release `flatwire` in [`NS`]); returns a kubeconfig with that ServiceAccount's token.
fn chart_rbac(cp: &ControlPlane, dir: &Path, component: &str) -> PathBuf {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/flatwire");
    let mut helm = Command::new(tools::bin("helm").expect("helm (run `cargo xtask tools`)"));
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        helm.env(var, dir.join("helm").join(sub));
    }
    helm.args(["template", "flatwire"])
        .arg(chart)
        .args(["--namespace", NS])
        .arg("--show-only")
        .arg(format!("templates/{component}-serviceaccount.yaml"))
        .arg("--show-only")
        .arg(format!("templates/{component}-rbac.yaml"));
    let out = run_checked(&mut helm).unwrap_or_else(|e| panic!("{e}"));
    let manifest = dir.join(format!("{component}-rbac.yaml"));
    std::fs::write(&manifest, out.stdout).unwrap();
    kubectl(cp, &["apply", "-f", manifest.to_str().unwrap()]);
    token_kubeconfig(cp, dir, NS, &format!("flatwire-{component}"))
}

fn read_trimmed(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn agent_registers_follows_the_planet_and_survives_the_api_server() {
    let mut cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
    let dir = tempfile::tempdir().unwrap();
    kubectl(&cp, &["create", "namespace", NS]);
    let kubeconfig = chart_rbac(&cp, dir.path(), "agent");
    let kubeconfig = kubeconfig.to_str().unwrap();
    apply_node(&cp, dir.path());

    // The agent starts before the planet is published and waits for it.
    let home = dir.path().join("home");
    let (udp, api) = (free_port().unwrap(), free_port().unwrap());
    let api_listen = format!("127.0.0.1:{api}");
    let mut a = agent(
        &home,
        &[
            "--kube-node",
            NODE,
            "--kubeconfig",
            kubeconfig,
            "--planet-configmap",
            &format!("{NS}/{CM}"),
            "--port",
            &udp.to_string(),
            "--api-listen",
            &api_listen,
        ],
    );
    wait(
        "the agent waits for the planet",
        Duration::from_secs(30),
        || {
            log_of(&home)
                .contains("waiting for one in the ConfigMap")
                .then_some(())
        },
    );
    assert!(a.try_status().is_none(), "{}", log_of(&home));
    let root = Identity::generate(&std::sync::atomic::AtomicBool::new(false)).unwrap();
    let key = generate_key_pair().unwrap();
    let unused = free_port().unwrap();
    let v1 = planet(&root, &key, &key.1, 1_000, unused);
    publish(&cp, dir.path(), &v1);
    let stored = home.join("planet");
    wait(
        "the planet reaches the state dir",
        Duration::from_secs(30),
        || (std::fs::read(&stored).ok()? == v1.serialize(false)).then_some(()),
    );
    wait("the node runs", Duration::from_secs(30), || {
        log_of(&home).contains("VL1 node running").then_some(())
    });

    // The Node carries the public identity, and only that.
    let public = read_trimmed(home.join("identity.public"));
    let secret = read_trimmed(home.join("identity.secret"));
    let secret_key = secret.rsplit(':').next().unwrap().to_owned();
    assert!(secret_key.len() >= 64, "{secret}");
    let got = wait(
        "the host identity annotation",
        Duration::from_secs(30),
        || Some(annotation(&cp)).filter(|a| !a.is_empty()),
    );
    assert_eq!(got, public);
    assert_eq!(got.split(':').count(), 3, "{got}");
    let node_json = kubectl(&cp, &["get", "node", NODE, "-o", "json"]);
    assert!(
        !node_json.contains(&secret_key),
        "the secret key is on the Node"
    );
    assert!(node_json.contains(HOST_IDENTITY_ANNOTATION), "{node_json}");

    // Removed, it comes back.
    let remove = format!("{HOST_IDENTITY_ANNOTATION}-");
    kubectl(&cp, &["annotate", "node", NODE, &remove]);
    assert_eq!(annotation(&cp), "");
    wait(
        "the annotation is put back",
        Duration::from_secs(30),
        || (annotation(&cp) == public).then_some(()),
    );

    // A newer planet signed with the planet's key is taken; a forged one is refused.
    let root_port = free_port().unwrap();
    let v2 = planet(&root, &key, &key.1, 2_000, root_port);
    publish(&cp, dir.path(), &v2);
    wait("the updated planet", Duration::from_secs(30), || {
        (std::fs::read(&stored).ok()? == v2.serialize(false)).then_some(())
    });

    // The operator's controller sidecar: the root's identity, only --planet-configmap (no
    // Node), the chart's operator RBAC. It takes the planet from the ConfigMap and serves it
    // as its root.
    let root_home = dir.path().join("root");
    std::fs::create_dir_all(&root_home).unwrap();
    flatwire_agent::host::store_identity(
        &flatwire_agent::state::StateDir::open(&root_home).unwrap(),
        &root,
    )
    .unwrap();
    let op_kubeconfig = chart_rbac(&cp, dir.path(), "operator");
    let mut r = agent(
        &root_home,
        &[
            "--root",
            "--controller",
            "--kubeconfig",
            op_kubeconfig.to_str().unwrap(),
            "--planet-configmap",
            &format!("{NS}/{CM}"),
            "--port",
            &root_port.to_string(),
            "--api-listen",
            "127.0.0.1:0",
        ],
    );
    wait(
        "the sidecar runs as the root",
        Duration::from_secs(30),
        || {
            log_of(&root_home)
                .contains("root=true controller=true")
                .then_some(())
        },
    );
    assert_eq!(
        std::fs::read(root_home.join("planet")).unwrap(),
        v2.serialize(false)
    );
    assert!(r.try_status().is_none(), "{}", log_of(&root_home));
    assert!(!log_of(&root_home).contains("forbidden"));

    let other = generate_key_pair().unwrap();
    let forged = planet(&root, &key, &other.1, 3_000, unused);
    publish(&cp, dir.path(), &forged);
    wait(
        "the forged planet is refused",
        Duration::from_secs(30),
        || {
            log_of(&home)
                .contains("refusing the planet in the ConfigMap")
                .then_some(())
        },
    );
    assert_eq!(std::fs::read(&stored).unwrap(), v2.serialize(false));
    wait(
        "the sidecar refuses the forged planet too",
        Duration::from_secs(30),
        || {
            log_of(&root_home)
                .contains("refusing the planet in the ConfigMap")
                .then_some(())
        },
    );
    assert_eq!(
        std::fs::read(root_home.join("planet")).unwrap(),
        v2.serialize(false)
    );

    // Without the API server the agent runs on, serving /status.
    let token = read_trimmed(home.join("authtoken.secret"));
    let address = public.split(':').next().unwrap().to_owned();
    let (code, body) = status(api, &token);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&address), "{body}");
    // So far the chart's RBAC was enough for all of it (Node, pods, the planet ConfigMap).
    let log = log_of(&home);
    assert!(!log.contains("forbidden"), "{log}");
    assert!(!log.contains("cannot watch"), "{log}");
    assert!(!log.contains("cannot register"), "{log}");
    cp.stop_apiserver();
    wait("the agent notices", Duration::from_secs(60), || {
        let log = log_of(&home);
        (log.contains("cannot watch the planet ConfigMap")
            || log.contains("cannot register the host identity"))
        .then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.try_status().is_none(), "{}", log_of(&home));
    let (code, body) = status(api, &token);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&address), "{body}");
    assert_eq!(std::fs::read(&stored).unwrap(), v2.serialize(false));

    // Back, it is used again: a removed annotation is restored.
    cp.restart_apiserver().unwrap();
    kubectl(&cp, &["annotate", "node", NODE, &remove]);
    wait(
        "the annotation after the restart",
        Duration::from_secs(60),
        || (annotation(&cp) == public).then_some(()),
    );
    assert!(a.try_status().is_none(), "{}", log_of(&home));
    assert!(r.try_status().is_none(), "{}", log_of(&root_home));
    a.stop();
    r.stop();
}

#[test]
fn bad_configuration_ends_the_agent_with_a_clear_message() {
    let cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap().to_string();
    let run = |name: &str, kubeconfig: &Path, node: &str| {
        agent_fails(
            &dir.path().join(name),
            &[
                "--kube-node",
                node,
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--port",
                &port,
                "--api-listen",
                "127.0.0.1:0",
            ],
        )
    };

    // Not a kubeconfig.
    let garbage = dir.path().join("garbage.kubeconfig");
    std::fs::write(&garbage, "clusters: [this is not: a kubeconfig\n").unwrap();
    let (st, log) = run("garbage", &garbage, NODE);
    assert!(!st.success(), "{log}");
    assert!(
        log.contains("kubeconfig") && log.contains(&garbage.display().to_string()),
        "{log}"
    );

    // No such file.
    let missing = dir.path().join("missing.kubeconfig");
    let (st, log) = run("missing", &missing, NODE);
    assert!(!st.success(), "{log}");
    assert!(log.contains(&missing.display().to_string()), "{log}");

    // A Node that does not exist.
    let (st, log) = run("no-node", cp.kubeconfig(), "no-such-node");
    assert!(!st.success(), "{log}");
    assert!(
        log.contains("node \"no-such-node\" not found") && log.contains("--kube-node"),
        "{log}"
    );

    // A ServiceAccount without any RBAC: the refusal names the verb and the resource.
    kubectl(
        &cp,
        &["create", "serviceaccount", "nobody", "-n", "default"],
    );
    let weak = token_kubeconfig(&cp, dir.path(), "default", "nobody");
    let (st, log) = run("rbac", &weak, "no-such-node");
    assert!(!st.success(), "{log}");
    assert!(
        log.contains("forbidden: the agent may not get nodes/no-such-node")
            && log.contains("system:serviceaccount:default:nobody"),
        "{log}"
    );
}

/// The agent's peer `address` in its `/peer` answer, if listed.
fn peer(host: &Host, token: &str, address: &str) -> Option<Value> {
    let (code, body) = api(Some(host), 9993, token, "GET", "/peer");
    assert_eq!(code, 200, "{body}");
    let peers: Value = serde_json::from_str(&body).unwrap();
    peers
        .as_array()?
        .iter()
        .find(|p| p["address"] == address)
        .cloned()
}

/// Whether `p` (a `/peer` entry) is a root with a direct path to `endpoint`.
fn root_via(p: &Value, endpoint: &str) -> bool {
    p["role"] == "PLANET"
        && p["paths"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["address"] == endpoint))
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

#[test]
fn a_planet_update_in_the_configmap_moves_the_running_agent_to_the_new_roots() {
    common::assert_root();
    let cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
    let dir = tempfile::tempdir().unwrap();
    kubectl(&cp, &["create", "namespace", NS]);
    let kubeconfig = chart_rbac(&cp, dir.path(), "agent");
    apply_node(&cp, dir.path());

    // Roots r1 and r2, the agent a and a node m on one switch; a reaches the API server
    // through a bridge listening on the same loopback address in its namespace.
    let mut topo = Topology::new().unwrap();
    let mut lan = topo.switch("lan").unwrap();
    let hosts: Vec<Host> = ["r1", "r2", "a", "m"]
        .iter()
        .map(|n| topo.host(n).unwrap())
        .collect();
    let (h_r1, h_r2, h_a, h_m) = (&hosts[0], &hosts[1], &hosts[2], &hosts[3]);
    for (h, ip) in hosts.iter().zip(["1", "2", "10", "20"]) {
        topo.plug(&mut lan, h, &format!("198.18.0.{ip}/24"))
            .unwrap();
    }
    let api_server: std::net::SocketAddr = cp
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let _bridge = TcpBridge::start(Some(h_a), api_server, None, api_server).expect("bridge");

    let home = |n: &str| dir.path().join(n);
    let (r1, r2) = (
        common::new_identity(&home("r1")),
        common::new_identity(&home("r2")),
    );
    let (e1, e2) = ("198.18.0.1:9993", "198.18.0.2:9993");
    let key = generate_key_pair().unwrap();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // P1: r1 alone. P2: signed by P1's update key, adds r2. r1 serves P1 (so no root ever
    // pushes P2: only the ConfigMap can bring it), r2 serves P2.
    let p1 = world(&[(&r1, e1)], &key, &key.1, t0);
    let p2 = world(&[(&r1, e1), (&r2, e2)], &key, &key.1, t0 + 1_000);
    let file = |name: &str, w: &World| {
        let f = dir.path().join(name);
        std::fs::write(&f, w.serialize(false)).unwrap();
        f.to_str().unwrap().to_owned()
    };
    let (f1, f2) = (file("p1.bin", &p1), file("p2.bin", &p2));
    let mut root1 = agent_in(Some(h_r1), &home("r1"), &["--root", "--planet", &f1]);
    let _root2 = agent_in(Some(h_r2), &home("r2"), &["--root", "--planet", &f2]);

    publish(&cp, dir.path(), &p1);
    let mut a = agent_in(
        Some(h_a),
        &home("a"),
        &[
            "--kube-node",
            NODE,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--planet-configmap",
            &format!("{NS}/{CM}"),
        ],
    );
    let token_file = home("a").join("authtoken.secret");
    let token = wait("the agent's API token", Duration::from_secs(30), || {
        std::fs::read_to_string(&token_file)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    });
    let (a1, a2) = (r1.address().to_string(), r2.address().to_string());
    let (p1_path, p2_path) = ("198.18.0.1/9993", "198.18.0.2/9993");
    wait("the agent reaches r1", Duration::from_secs(30), || {
        peer(h_a, &token, &a1).filter(|p| root_via(p, p1_path))
    });
    assert!(peer(h_a, &token, &a2).is_none(), "r2 is not in P1");
    let pid = a.pid();

    // The signed update: in force in the running agent within seconds.
    let published = Instant::now();
    publish(&cp, dir.path(), &p2);
    wait("the agent reaches r2", Duration::from_secs(10), || {
        peer(h_a, &token, &a2).filter(|p| root_via(p, p2_path))
    });
    let took = published.elapsed();
    eprintln!("r2 reached {took:?} after the ConfigMap update");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        a.try_status().is_none() && a.pid() == pid,
        "the agent restarted"
    );
    let stored = home("a").join("planet");
    assert_eq!(std::fs::read(&stored).unwrap(), p2.serialize(false));
    let timestamp = |h: &Host| -> u64 {
        let (code, body) = api(Some(h), 9993, &token, "GET", "/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["planetWorldTimestamp"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(timestamp(h_a), p2.timestamp);
    let log = log_of(&home("a"));
    assert!(
        log.contains("planet from the ConfigMap in force in the running node"),
        "{log}"
    );
    // r2 heard from a (its HELLO), which only the new planet could make it send.
    let (code, body) = api(
        Some(h_r2),
        9993,
        &read_trimmed(home("r2").join("authtoken.secret")),
        "GET",
        &format!(
            "/peer/{}",
            read_trimmed(home("a").join("identity.public"))
                .split(':')
                .next()
                .unwrap()
        ),
    );
    assert_eq!(code, 200, "r2 does not know the agent: {body}");

    // A forged update (newer, wrong key) and an older one are refused and change nothing.
    let other = generate_key_pair().unwrap();
    let forged = world(&[(&r1, e1)], &key, &other.1, t0 + 2_000);
    let older = world(&[(&r2, e2)], &key, &key.1, t0 + 500);
    for (w, reason) in [(&forged, "updatesMustBeSignedBy"), (&older, "is not newer")] {
        let before = count(&log_of(&home("a")), "refusing the planet in the ConfigMap");
        publish(&cp, dir.path(), w);
        let log = wait("the refusal", Duration::from_secs(30), || {
            let log = log_of(&home("a"));
            (count(&log, "refusing the planet in the ConfigMap") > before).then_some(log)
        });
        assert!(log.contains(reason), "{log}");
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(std::fs::read(&stored).unwrap(), p2.serialize(false));
        assert_eq!(timestamp(h_a), p2.timestamp);
        assert!(peer(h_a, &token, &a2).is_some_and(|p| p["role"] == "PLANET"));
        assert!(peer(h_a, &token, &a1).is_some_and(|p| p["role"] == "PLANET"));
    }

    // r1 stops. m (a controller on P2) comes up afterwards, so only r2 knows it: a joining
    // m's network must resolve m through r2 and get m's answer (no such network).
    root1.stop();
    let mut m = agent_in(Some(h_m), &home("m"), &["--controller", "--planet", &f2]);
    let m_address = wait("m's identity", Duration::from_secs(30), || {
        std::fs::read_to_string(home("m").join("identity.public"))
            .ok()
            .and_then(|s| s.split(':').next().map(str::to_owned))
    });
    wait("m runs", Duration::from_secs(30), || {
        log_of(&home("m"))
            .contains("VL1 node running")
            .then_some(())
    });
    let nwid = format!("{m_address}000001");
    let (code, body) = api(Some(h_a), 9993, &token, "POST", &format!("/network/{nwid}"));
    assert_eq!(code, 200, "{body}");
    let joined = Instant::now();
    wait("m's answer through r2", Duration::from_secs(15), || {
        let (_, body) = api(Some(h_a), 9993, &token, "GET", &format!("/network/{nwid}"));
        body.contains("\"NOT_FOUND\"").then_some(())
    });
    eprintln!("m answered {:?} after the join, r1 down", joined.elapsed());
    assert!(
        a.try_status().is_none() && a.pid() == pid,
        "{}",
        log_of(&home("a"))
    );
    assert!(m.try_status().is_none(), "{}", log_of(&home("m")));
    a.stop();
    m.stop();
}
