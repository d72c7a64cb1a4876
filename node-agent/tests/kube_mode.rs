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
//!   clear message and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flatwire_agent::kube::HOST_IDENTITY_ANNOTATION;
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::netns::run_checked;
use flatwire_tests::process::Proc;
use flatwire_tests::tools;
use flatwire_vl1::identity::{PUBLIC_KEY_LEN, SECRET_KEY_LEN, generate_key_pair};
use flatwire_vl1::{Identity, Root, World, WorldType};

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

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    cp.kubectl_run(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// A planet whose only root is `root` at a loopback port nobody serves.
fn planet(
    root: &Identity,
    key: &([u8; PUBLIC_KEY_LEN], [u8; SECRET_KEY_LEN]),
    signer: &[u8; SECRET_KEY_LEN],
    timestamp: u64,
    port: u16,
) -> World {
    World::create(
        WorldType::Planet,
        PLANET_ID,
        timestamp,
        key.0,
        vec![Root {
            identity: root.to_public(),
            stable_endpoints: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        }],
        signer,
    )
    .unwrap()
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
    std::fs::create_dir_all(home).unwrap();
    let log = std::fs::File::create(home.join("agent.log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatwire-agent"));
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

/// The agent's log, without terminal colors.
fn log_of(home: &Path) -> String {
    let raw = std::fs::read_to_string(home.join("agent.log")).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw.as_str();
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        rest = rest.find('m').map_or("", |m| &rest[m + 1..]);
    }
    out.push_str(rest);
    out
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
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", "-H"])
        .arg(format!("X-ZT1-Auth: {token}"))
        .arg(format!("http://127.0.0.1:{port}/status"))
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
    let node = dir.path().join("node.json");
    std::fs::write(
        &node,
        format!(r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{NODE}"}}}}"#),
    )
    .unwrap();
    kubectl(&cp, &["apply", "-f", node.to_str().unwrap()]);

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
