//! The Kubernetes side of the end-to-end tests, on a real etcd + kube-apiserver
//! ([`ControlPlane`]): `kubectl` that fails the test loudly, objects as JSON, polling for a
//! condition, the checked-in CRDs installed, planet hosts turned into Kubernetes nodes
//! (a Node object, the API server bridged into the host's namespace, the agent restarted with
//! `--kube-node`, its host identity registered), the controller agent's HTTP API bridged to
//! loopback for operator replicas with leader election, and the container runtime's side of a
//! pod start (the real `cnitool` running `flatwire-cni` with the pod's `K8S_POD_*` arguments;
//! there is no kubelet).
//!
//! Every helper panics with a clear message when its real part is missing or fails: they are
//! for tests.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::bridge::TcpBridge;
use crate::controlplane::{ControlPlane, free_port};
use crate::netns::Host;
use crate::planet::{AGENT_PORT, Planet};
use crate::process::{Proc, cargo_build};
use crate::tools;

/// The operator's namespace (Lease, identity Secret, planet ConfigMap), as the chart uses.
pub const NAMESPACE: &str = "flatwire-system";
/// The operator's Lease name.
pub const LEASE: &str = "flatwire-operator";
/// The Node annotation the agents register their host identity in.
pub const HOST_IDENTITY: &str = "flatwire.io/host-identity";

/// Runs `kubectl args` against `cp`; panics with its stderr on failure.
pub fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    cp.kubectl_run(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// `kubectl apply` of `doc` (YAML, or JSON such as a [`Value`]).
pub fn apply(cp: &ControlPlane, doc: impl Display) {
    let f = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(f.path(), doc.to_string()).expect("writing a temporary file");
    let path = f.path().to_str().expect("a UTF-8 temporary path");
    cp.kubectl_run(&["apply", "-f", path])
        .unwrap_or_else(|e| panic!("kubectl apply:\n{doc}\n{e}"));
}

/// `kubectl get what -o json`.
pub fn get(cp: &ControlPlane, what: &[&str]) -> Value {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    let text = kubectl(cp, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {text}"))
}

/// The Events (`events.k8s.io/v1`) of every namespace.
pub fn events(cp: &ControlPlane) -> Vec<Value> {
    get(cp, &["events.v1.events.k8s.io", "-A"])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `f` every 100 ms until it gives `Some`: the value and how long it took. Panics
/// with `what` after `limit`.
pub fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Applies the checked-in CRDs (`crds/`) and waits until the API server serves them.
pub fn install_crds(cp: &ControlPlane) {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
    kubectl(cp, &["apply", "-f", crds]);
    kubectl(
        cp,
        &[
            "wait",
            "--for=condition=established",
            "crd/networks.flatwire.io",
            "crd/networkmembers.flatwire.io",
            "--timeout=60s",
        ],
    );
}

/// A Node object named `name`.
pub fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

/// A Pod object `namespace/name` with `labels`, bound to node `node` (no kubelet runs it).
pub fn pod(namespace: &str, name: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    })
}

/// Builds the `flatwire-operator` binary (debug) and returns its path.
pub fn operator_binary() -> PathBuf {
    cargo_build(
        &["-p", "flatwire-operator", "--bin", "flatwire-operator"],
        "flatwire-operator",
    )
    .expect("flatwire-operator build")
}

/// Builds the `flatwire-cni` binary (debug) and returns its path.
pub fn cni_binary() -> PathBuf {
    cargo_build(
        &["-p", "flatwire-cni", "--bin", "flatwire-cni"],
        "flatwire-cni",
    )
    .expect("flatwire-cni build")
}

/// Makes planet host `name` a Kubernetes node: creates its Node, bridges the API server into
/// the host's namespace (same address and port, so the harness kubeconfig works there),
/// restarts its agent with `--kube-node name --kubeconfig ...` and `extra` flags, and waits
/// until the agent registered its public host identity on the Node. Keep the bridge.
pub fn kube_node(cp: &ControlPlane, planet: &mut Planet, name: &str, extra: &[&str]) -> TcpBridge {
    apply(cp, node(name));
    let api: SocketAddr = cp
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .expect("the API server's address");
    let host = planet.agent(name).host().clone();
    let bridge = TcpBridge::start(Some(&host), api, None, api).expect("API server bridge");
    planet.stop_agent(name);
    let kubeconfig = cp.kubeconfig().to_str().expect("a UTF-8 path").to_owned();
    planet.add_agent_args(name, &["--kube-node", name, "--kubeconfig", &kubeconfig]);
    planet.add_agent_args(name, extra);
    planet
        .start_agent(name)
        .unwrap_or_else(|e| panic!("agent {name} in Kubernetes mode: {e}"));
    let address = planet.agent(name).address().to_owned();
    wait(
        &format!("node {name}'s host identity"),
        Duration::from_secs(60),
        || {
            let v = get(cp, &["node", name]);
            let id = v["metadata"]["annotations"][HOST_IDENTITY].as_str()?;
            assert!(
                id.starts_with(&address),
                "{name}: {id} is not {address}'s identity"
            );
            assert_eq!(
                id.split(':').count(),
                3,
                "{name}: the annotation holds more than the public key"
            );
            Some(())
        },
    );
    bridge
}

/// A planet controller agent's HTTP API reached from loopback, as operators use it.
pub struct ControllerApi {
    /// The controller address (10 hex digits).
    pub address: String,
    /// The API token file.
    pub token: PathBuf,
    /// Where the API answers on loopback.
    pub url: SocketAddr,
    _bridge: TcpBridge,
}

impl ControllerApi {
    /// Bridges the HTTP API of planet agent `name` (a controller) to a free loopback port.
    pub fn expose(planet: &Planet, name: &str) -> Self {
        let ctl = planet.agent(name);
        let url: SocketAddr = format!("127.0.0.1:{}", free_port().expect("a free port"))
            .parse()
            .expect("a loopback address");
        let local: SocketAddr = format!("127.0.0.1:{AGENT_PORT}")
            .parse()
            .expect("a loopback address");
        let bridge =
            TcpBridge::start(None, url, Some(ctl.host()), local).expect("controller bridge");
        Self {
            address: ctl.address().to_owned(),
            token: ctl.home().join("authtoken.secret"),
            url,
            _bridge: bridge,
        }
    }
}

/// Starts one `flatwire-operator run` replica `id` (binary `bin`) on loopback against `cp`,
/// serving `ctl` from namespace [`NAMESPACE`] with leader election on a short Lease (6 s,
/// renew deadline 4 s, retry every 1 s). Its log is `operator-<id>.log` in the control
/// plane's directory.
pub fn start_operator(bin: &Path, cp: &ControlPlane, ctl: &ControllerApi, id: &str) -> Proc {
    let log = std::fs::File::create(cp.dir().join(format!("operator-{id}.log")))
        .expect("the operator's log file");
    Proc::spawn(
        &format!("operator {id}"),
        std::process::Command::new(bin)
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args([
                "--namespace",
                NAMESPACE,
                "--controller-address",
                &ctl.address,
            ])
            .args(["--controller-api", &format!("http://{}", ctl.url)])
            .arg("--controller-token-file")
            .arg(&ctl.token)
            .args(["--leader-elect", "--leader-identity", id])
            .args([
                "--lease-duration",
                "6s",
                "--renew-deadline",
                "4s",
                "--retry-period",
                "1s",
            ])
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log),
    )
    .expect("flatwire-operator")
}

/// The holder of the operator's Lease, if any.
pub fn lease_holder(cp: &ControlPlane) -> Option<String> {
    let lease = get(cp, &["lease", LEASE, "-n", NAMESPACE]);
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

/// The runtime's side of a pod start or stop: the real `cnitool` runs `flatwire-cni` with a
/// conflist of its own.
pub struct Runtime {
    cnitool: PathBuf,
    cni_path: String,
    name: String,
    conf: tempfile::TempDir,
}

impl Runtime {
    /// A runtime whose CNI network `name` (cnitool caches results under it) attaches pods
    /// to flatwire network `nwid` (secondary mode) through the agent at `socket`, with the
    /// plugin `cni_bin`.
    pub fn new(cni_bin: &Path, name: &str, nwid: &str, socket: &Path) -> Self {
        let conf = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(
            conf.path().join("10-flatwire.conflist"),
            json!({
                "cniVersion": "1.1.0", "name": name,
                "plugins": [{
                    "type": "flatwire-cni", "network": nwid, "mode": "secondary",
                    "agentSocket": socket,
                }],
            })
            .to_string(),
        )
        .expect("writing the conflist");
        let plugins = tools::cni_plugin_dir().expect("CNI plugins (run `cargo xtask tools`)");
        let dir = cni_bin.parent().expect("the plugin's directory");
        Self {
            cnitool: tools::bin("cnitool").expect("cnitool (run `cargo xtask tools`)"),
            cni_path: format!("{}:{}", dir.display(), plugins.display()),
            name: name.to_owned(),
            conf,
        }
    }

    /// Runs `cnitool verb` on `host` for `pod` (as stored: with its uid) in namespace
    /// `netns`; the result JSON (null when it printed none). Panics when cnitool fails.
    pub fn run(&self, host: &Host, verb: &str, netns: &Host, pod: &Value) -> Value {
        let meta = &pod["metadata"];
        let field = |k: &str| meta[k].as_str().unwrap_or_default().to_owned();
        let args = format!(
            "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            field("namespace"),
            field("name"),
            field("uid")
        );
        let out = host
            .command(&self.cnitool)
            .args([verb, &self.name, &netns.netns_path()])
            .env("NETCONFPATH", self.conf.path())
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .output()
            .expect("cnitool");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cnitool {verb} {}: {stdout}{}",
            meta["name"],
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or(Value::Null)
    }
}

/// The first IP address of a CNI result.
pub fn result_ip(result: &Value) -> IpAddr {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_default();
    cidr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IP in the CNI result {result}"))
}
