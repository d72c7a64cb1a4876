//! Pods on a flatwire network the Kubernetes way, with every part real: etcd and
//! kube-apiserver, the CRDs applied with kubectl, two `flatwire-operator` replicas with
//! leader election, node agents in Kubernetes mode (`--kube-node`) in harness namespaces, the
//! runtime's side played by the real `cnitool` calling `flatwire-cni` with the pod's
//! `K8S_POD_*` arguments, and Pod objects bound to the nodes (there is no kubelet yet).
//!
//! It checks that a pod member is authorized by its node's vouch for a pod the API server
//! places on that node, gets its tags from the pod's labels and an IP from the Network's pool;
//! that pods on two hosts ping each other, a tag rule edited into the Network blocks and then
//! allows a TCP port, a deleted Pod's member is revoked within 2 s, a `NetworkMember` lets an
//! outside agent in, and killing the leading operator hands over to the standby within 15 s
//! while existing pods keep talking.
//!
//! The agents reach the API server, and the operators the controller agent's HTTP API,
//! through [`TcpBridge`]s (control-plane TCP between namespaces on loopback only).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flatwire_tests::bridge::TcpBridge;
use flatwire_tests::controlplane::{ControlPlane, free_port};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{
    AGENT_PORT, Network, NetworkSpec, Planet, PlanetSpec, Profile, agent_binary, check_root,
    ping_in,
};
use flatwire_tests::process::{Proc, cargo_build};
use flatwire_tests::tools;
use serde_json::{Value, json};

const NS: &str = "flatwire-system";
/// The CNI network name (cnitool caches results under it in /var/lib/cni/results).
const CNI_NETWORK: &str = "fw-k8s-pods";
const LIMIT: Duration = Duration::from_secs(60);
const REVOKE_LIMIT: Duration = Duration::from_secs(2);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(15);
const BLOCK_5201: &str = "\
    drop ipprotocol tcp dport 5201 tseq role web treq role db;\n\
    drop ipprotocol tcp dport 5201 tseq role db treq role web;\n\
    accept;\n";

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    cp.kubectl_run(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

fn apply(cp: &ControlPlane, doc: &Value) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), doc.to_string()).unwrap();
    kubectl(cp, &["apply", "-f", f.path().to_str().unwrap()]);
}

fn get(cp: &ControlPlane, what: &[&str]) -> Value {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&kubectl(cp, &args)).unwrap()
}

/// Polls `f` every 100 ms until it gives `Some`, panicking with `what` after `limit`.
fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn pod(name: &str, node: &str, role: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"role": role}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    })
}

fn network(rules: &str) -> Value {
    json!({
        "apiVersion": "flatwire.io/v1alpha1", "kind": "Network",
        "metadata": {"name": "pods"},
        "spec": {
            "number": 7,
            "ipAssignmentPools": [{"ipRangeStart": "198.19.7.10", "ipRangeEnd": "198.19.7.250"}],
            "routes": [{"target": "198.19.7.0/24"}],
            "v4AssignMode": ["pool"],
            "tags": [{
                "name": "role", "id": 100, "enum": {"web": 1, "db": 2, "laptop": 3},
                "podLabel": "role", "default": 3,
            }],
            "rules": rules,
            "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]},
        },
    })
}

/// One operator replica on loopback.
fn operator(
    bin: &Path,
    cp: &ControlPlane,
    ctl: &str,
    api: SocketAddr,
    token: &Path,
    id: &str,
) -> Proc {
    let log = std::fs::File::create(cp.dir().join(format!("operator-{id}.log"))).unwrap();
    Proc::spawn(
        &format!("operator {id}"),
        std::process::Command::new(bin)
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(["--namespace", NS, "--controller-address", ctl])
            .args(["--controller-api", &format!("http://{api}")])
            .arg("--controller-token-file")
            .arg(token)
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
    .unwrap()
}

/// The runtime's side of a pod start or stop: the real `cnitool` runs `flatwire-cni`.
struct Runtime {
    cnitool: PathBuf,
    cni_path: String,
    conf: tempfile::TempDir,
}

impl Runtime {
    fn new(cni_bin: &Path, nwid: &str, socket: &Path) -> Self {
        let conf = tempfile::tempdir().unwrap();
        std::fs::write(
            conf.path().join("10-flatwire.conflist"),
            json!({
                "cniVersion": "1.1.0", "name": CNI_NETWORK,
                "plugins": [{
                    "type": "flatwire-cni", "network": nwid, "mode": "secondary",
                    "agentSocket": socket,
                }],
            })
            .to_string(),
        )
        .unwrap();
        let plugins = tools::cni_plugin_dir().expect("CNI plugins (run `cargo xtask tools`)");
        Self {
            cnitool: tools::bin("cnitool").expect("cnitool (run `cargo xtask tools`)"),
            cni_path: format!(
                "{}:{}",
                cni_bin.parent().unwrap().display(),
                plugins.display()
            ),
            conf,
        }
    }

    /// Runs `cnitool verb` for the pod in namespace `netns` on `host`; the result JSON.
    fn run(&self, host: &Host, verb: &str, netns: &Host, pod: &Value) -> Value {
        let meta = &pod["metadata"];
        let args = format!(
            "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            meta["namespace"].as_str().unwrap(),
            meta["name"].as_str().unwrap(),
            meta["uid"].as_str().unwrap()
        );
        let out = host
            .command(&self.cnitool)
            .args([verb, CNI_NETWORK, &netns.netns_path()])
            .env("NETCONFPATH", self.conf.path())
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .output()
            .unwrap();
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

fn result_ip(result: &Value) -> IpAddr {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_default();
    cidr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IP in the CNI result {result}"))
}

#[test]
fn pods_join_by_vouch_with_tags_rules_revocation_and_failover() {
    check_root().expect("root");
    let cp = ControlPlane::start().expect("etcd + kube-apiserver");
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
    kubectl(&cp, &["apply", "-f", crds]);
    kubectl(&cp, &["create", "namespace", NS]);
    kubectl(
        &cp,
        &["create", "serviceaccount", "default", "-n", "default"],
    );
    let agent = agent_binary(Profile::Debug).expect("flatwire-agent build");
    let operator_bin = cargo_build(
        &["-p", "flatwire-operator", "--bin", "flatwire-operator"],
        "flatwire-operator",
    )
    .expect("flatwire-operator build");
    let cni_bin = cargo_build(
        &["-p", "flatwire-cni", "--bin", "flatwire-cni"],
        "flatwire-cni",
    )
    .expect("flatwire-cni build");

    let spec = PlanetSpec::new(agent)
        .host("a", None)
        .host("b", None)
        .host("c", None);
    let mut planet = Planet::start(&spec).expect("planet");
    let api: SocketAddr = cp
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let mut bridges = Vec::new();
    for n in ["a", "b"] {
        apply(&cp, &node(n));
        let host = planet.agent(n).host().clone();
        bridges.push(TcpBridge::start(Some(&host), api, None, api).expect("API server bridge"));
        planet.stop_agent(n);
        let kubeconfig = cp.kubeconfig().to_str().unwrap().to_owned();
        planet.add_agent_args(n, &["--kube-node", n, "--kubeconfig", &kubeconfig]);
        planet.start_agent(n).expect("agent in Kubernetes mode");
    }
    // The agents register their host identities on their Nodes.
    for n in ["a", "b"] {
        let address = planet.agent(n).address().to_owned();
        wait(&format!("node {n}'s host identity"), LIMIT, || {
            let v = get(&cp, &["node", n]);
            let id = v["metadata"]["annotations"]["flatwire.io/host-identity"].as_str()?;
            assert!(
                id.starts_with(&address),
                "{n}: {id} is not {address}'s identity"
            );
            assert_eq!(
                id.split(':').count(),
                3,
                "{n}: the annotation holds more than the public key"
            );
            Some(())
        });
    }

    let pod_ns: Vec<Host> = ["a-p1", "b-p2"]
        .iter()
        .map(|n| planet.topology().host(n).unwrap())
        .collect();
    let ctl = planet.agent("ctl0");
    let ctl_address = ctl.address().to_owned();
    let token = ctl.home().join("authtoken.secret");
    let ctl_api: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let local: SocketAddr = format!("127.0.0.1:{AGENT_PORT}").parse().unwrap();
    bridges
        .push(TcpBridge::start(None, ctl_api, Some(ctl.host()), local).expect("controller bridge"));
    let mut operators = [
        Some(operator(
            &operator_bin,
            &cp,
            &ctl_address,
            ctl_api,
            &token,
            "op-1",
        )),
        Some(operator(
            &operator_bin,
            &cp,
            &ctl_address,
            ctl_api,
            &token,
            "op-2",
        )),
    ];

    apply(&cp, &network("accept;"));
    let (nwid, _) = wait("the Network's ID", LIMIT, || {
        get(&cp, &["network", "pods"])["status"]["networkId"]
            .as_str()
            .map(str::to_owned)
    });
    let net = Network {
        nwid: nwid.clone(),
        spec: NetworkSpec::new("pods"),
    };
    assert!(
        nwid.starts_with(&ctl_address),
        "{nwid} is not a network of {ctl_address}"
    );

    // Pods p1 (web) on a and p2 (db) on b, started by the runtime through cnitool.
    let mut pods = Vec::new();
    for (name, host, role) in [("p1", "a", "web"), ("p2", "b", "db")] {
        apply(&cp, &pod(name, host, role));
        let obj = get(&cp, &["pod", name, "-n", "default"]);
        // A runtime would retry a refused ADD; waiting for the operator's binding (pod on
        // its node, tags from labels) keeps this test's timing out of the kubelet's backoff.
        let uid = obj["metadata"]["uid"].as_str().unwrap().to_owned();
        let host_address = planet.agent(host).address().to_owned();
        let ctl = planet.agent("ctl0");
        let (binding, took) = wait(&format!("the operator's binding of {name}"), LIMIT, || {
            let path = format!("/controller/network/{nwid}/pod/{uid}");
            let (code, v) = ctl.api("GET", &path, None);
            (code == 200).then_some(v)
        });
        eprintln!("binding of {name} after {took:?}: {binding}");
        assert_eq!(binding["host"], host_address.as_str(), "{binding}");
        let want = if role == "web" { 1 } else { 2 };
        assert_eq!(binding["tags"], json!([[100, want]]), "{binding}");
        let netns = pod_ns[pods.len()].clone();
        let rt = Runtime::new(&cni_bin, &nwid, &planet.agent(host).socket());
        let result = rt.run(planet.agent(host).host(), "add", &netns, &obj);
        let ip = result_ip(&result);
        assert!(
            ip.to_string().starts_with("198.19.7."),
            "{name}: {ip} is not from the pool"
        );
        pods.push((name, host, role, obj, netns, ip, rt));
    }
    // Each pod member was authorized by vouch and carries its label's tag.
    let members = ctl
        .api_ok("GET", &format!("/controller/network/{nwid}/member"), None)
        .unwrap();
    let mut vouched = std::collections::HashMap::new();
    for addr in members.as_object().unwrap().keys() {
        let m = ctl
            .api_ok(
                "GET",
                &format!("/controller/network/{nwid}/member/{addr}"),
                None,
            )
            .unwrap();
        if m["lastAuthorizedCredentialType"] != "vouch" {
            continue;
        }
        let ip = m["ipAssignments"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (_, _, role, _, _, pod_ip, _) = pods
            .iter()
            .find(|p| p.5.to_string() == ip)
            .unwrap_or_else(|| panic!("vouched member {addr} with IP {ip} is no pod of ours"));
        let want = if *role == "web" { 1 } else { 2 };
        assert_eq!(m["tags"], json!([[100, want]]), "member {addr}: {m}");
        assert_eq!(m["authorized"], true, "{m}");
        vouched.insert(*pod_ip, addr.clone());
    }
    assert_eq!(
        vouched.len(),
        2,
        "two pod members authorized by vouch: {members}"
    );

    let (p1_ns, p2_ns, p2_ip) = (pods[0].4.clone(), pods[1].4.clone(), pods[1].5);
    let p1_ip = pods[0].5;
    let (_, took) = wait("p1 to ping p2", LIMIT, || {
        ping_in(&p1_ns, p2_ip, 1).ok.then_some(())
    });
    eprintln!("p1 -> p2 first ping after {took:?}");
    assert!(ping_in(&p2_ns, p1_ip, 3).ok, "p2 does not ping p1");

    // A tag rule edited into the Network blocks TCP 5201 between web and db, then is lifted:
    // a one-second iperf3 run from p1 to p2 connects or not.
    let tcp_5201 = || {
        planet
            .iperf(&p2_ns, &p1_ns, p2_ip, 5201, 1)
            .expect("iperf3")
            .is_some()
    };
    wait("TCP 5201 to answer", LIMIT, || tcp_5201().then_some(()));
    apply(&cp, &network(BLOCK_5201));
    let (_, took) = wait("the rule to block TCP 5201", LIMIT, || {
        (!tcp_5201()).then_some(())
    });
    assert!(
        ping_in(&p1_ns, p2_ip, 2).ok,
        "ping must pass while TCP 5201 is blocked"
    );
    eprintln!("rule enforced after {took:?}");
    apply(&cp, &network("accept;"));
    let (_, took) = wait("the lifted rule to let TCP 5201 through", LIMIT, || {
        tcp_5201().then_some(())
    });
    eprintln!("rule lifted after {took:?}");

    // An outside agent (c, in no cluster) joins through a NetworkMember.
    let c = planet.agent("c").address().to_owned();
    apply(
        &cp,
        &json!({
            "apiVersion": "flatwire.io/v1alpha1", "kind": "NetworkMember",
            "metadata": {"name": "laptop-c"},
            "spec": {"network": "pods", "address": c, "authorized": true, "tags": {"role": "laptop"}},
        }),
    );
    planet
        .agent("c")
        .api_ok("POST", &format!("/network/{nwid}"), Some(&json!({})))
        .unwrap();
    let c_member = planet.wait_member("c", &net).expect("c gets its address");
    let c_ip = c_member.ip(false).unwrap();
    wait("p1 to ping the outside member", LIMIT, || {
        ping_in(&p1_ns, c_ip, 1).ok.then_some(())
    });

    // Leader election: kill the active operator; the standby takes over within 15 s while p1
    // keeps pinging c; the new leader then handles a Pod deletion.
    let lease = get(&cp, &["lease", "flatwire-operator", "-n", NS]);
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_owned();
    let leader = if holder == "op-1" { 0 } else { 1 };
    let pinger = p1_ns
        .command("ping")
        .args(["-n", "-q", "-i", "0.1", "-w", "20", &c_ip.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // SIGKILL: the leader cannot release the Lease; the standby waits for it to expire.
    let mut dead = operators[leader].take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the leading operator");
    dead.stop();
    let (new_holder, took) = wait("the standby to take the Lease", TAKEOVER_LIMIT, || {
        let l = get(&cp, &["lease", "flatwire-operator", "-n", NS]);
        l["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| *h != holder)
            .map(str::to_owned)
    });
    eprintln!("{new_holder} took over from {holder} {took:?} after it was killed");
    let pings = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&pings.stdout);
    assert!(
        summary.contains(" 0% packet loss"),
        "pings dropped during the takeover:\n{summary}"
    );

    // Deleting a Pod revokes its member within 2 s.
    kubectl(
        &cp,
        &["delete", "pod", "p2", "-n", "default", "--wait=false"],
    );
    let deleted = Instant::now();
    // Each probe is one echo with a 0.3 s wait; the first unanswered one dates the cut.
    let (cut, _) = wait("p2's member to be cut off", LIMIT, || {
        let sent = deleted.elapsed();
        let answered = p1_ns
            .command("ping")
            .args(["-n", "-c", "1", "-W", "0.3", &p2_ip.to_string()])
            .output()
            .is_ok_and(|o| o.status.success());
        (!answered).then_some(sent)
    });
    eprintln!("p2 cut off {cut:?} after its Pod was deleted");
    assert!(cut < REVOKE_LIMIT, "revocation took {cut:?}");
    let p2_address = vouched[&p2_ip].clone();
    wait("p2's member to leave the controller", LIMIT, || {
        let path = format!("/controller/network/{nwid}/member");
        let members = ctl.api_ok("GET", &path, None).ok()?;
        members.get(&p2_address).is_none().then_some(())
    });

    // The runtime stops both pods; their attachments go.
    for (name, host, _, obj, netns, _, rt) in pods.iter().rev() {
        rt.run(planet.agent(host).host(), "del", netns, obj);
        assert!(
            netns.run("ip", &["link", "show", "eth0"]).is_err(),
            "eth0 is left in {name} after DEL"
        );
    }
    drop(bridges);
}
