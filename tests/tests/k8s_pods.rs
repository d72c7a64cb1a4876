//! Pods on a flatwire network the Kubernetes way, with every part real: etcd and
//! kube-apiserver, the CRDs applied with kubectl, two `flatwire-operator` replicas with
//! leader election, node agents in Kubernetes mode (`--kube-node`) in harness namespaces, the
//! runtime's side played by the real `cnitool` calling `flatwire-cni` with the pod's
//! `K8S_POD_*` arguments, and Pod objects bound to the nodes (there is no kubelet yet).
//!
//! It checks that a pod member is authorized by its node's vouch for a pod the API server
//! places on that node, gets its tags from the pod's labels and an IP from the Network's pool;
//! that pods on two hosts ping each other, a tag rule edited into the Network blocks and then
//! allows a TCP port, a `NetworkMember` lets an outside agent in, killing the leading
//! operator hands over to the standby within 15 s while no ping between the pods (nor to the
//! outside member) is lost, the pods keep talking and stay attached while the API server is
//! away for longer than the agents' pod GC grace, a deleted Pod's member is revoked within
//! 2 s, and once the Pod object is gone its node's agent detaches it (the Kubernetes-mode
//! pod GC).
//!
//! The agents reach the API server, and the operators the controller agent's HTTP API,
//! through TCP bridges (control-plane TCP between namespaces on loopback only; see
//! [`flatwire_tests::k8s`]).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use flatwire_tests::controlplane::ControlPlane;
use flatwire_tests::k8s::{
    self, ControllerApi, NAMESPACE, Runtime, apply, cni_binary, get, install_crds, kube_node,
    kubectl, lease_holder, operator_binary, result_ip, start_operator, wait,
};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{
    Network, NetworkSpec, Planet, PlanetSpec, Profile, agent_binary, check_root, ping_in,
};
use serde_json::{Value, json};

/// The CNI network name (cnitool caches results under it in /var/lib/cni/results).
const CNI_NETWORK: &str = "fw-k8s-pods";
const LIMIT: Duration = Duration::from_secs(60);
const REVOKE_LIMIT: Duration = Duration::from_secs(2);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(15);
/// The agents' `--pod-gc-grace`: how long a pod may be gone before its attachment goes.
const GC_GRACE: Duration = Duration::from_secs(3);
/// How long the API server stays away: longer than the grace plus the agent's 5 s GC period
/// and the operators' renew deadline.
const OUTAGE: Duration = Duration::from_secs(10);
const BLOCK_5201: &str = "\
    drop ipprotocol tcp dport 5201 tseq role web treq role db;\n\
    drop ipprotocol tcp dport 5201 tseq role db treq role web;\n\
    accept;\n";

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

/// Pings `to` from `from` every 0.1 s for about `secs` seconds, in the background: a count
/// of echoes rather than a deadline, so that the last echo's reply is waited for (a deadline
/// can fall between an echo and its reply and count it lost).
fn pinger(from: &Host, to: std::net::IpAddr, secs: u64) -> Child {
    from.command("ping")
        .args([
            "-n",
            "-q",
            "-i",
            "0.1",
            "-W",
            "2",
            "-c",
            &(secs * 10).to_string(),
            &to.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping")
}

/// Waits for a [`pinger`] and asserts that no echo went unanswered.
fn no_loss(pinger: Child, what: &str) {
    let out = pinger.wait_with_output().expect("ping");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(" 0% packet loss"),
        "{what}: pings dropped:\n{summary}"
    );
    eprintln!(
        "{what}: {}",
        summary.lines().rev().nth(1).unwrap_or_default()
    );
}

/// Whether the pod namespace `netns` still has its flatwire interface.
fn has_eth0(netns: &Host) -> bool {
    netns.run("ip", &["link", "show", "eth0"]).is_ok()
}

/// Waits until the operator's Lease is renewed by a live holder (its resourceVersion moves
/// twice), and returns the holder.
fn wait_leader(cp: &ControlPlane) -> String {
    let version =
        || get(cp, &["lease", k8s::LEASE, "-n", NAMESPACE])["metadata"]["resourceVersion"].clone();
    let mut seen = vec![version()];
    wait("a renewing leader", LIMIT, || {
        let v = version();
        if seen.last() != Some(&v) {
            seen.push(v);
        }
        (seen.len() >= 3).then_some(())
    });
    lease_holder(cp).expect("a Lease holder")
}

#[test]
fn pods_join_by_vouch_with_tags_rules_revocation_and_failover() {
    check_root().expect("root");
    let mut cp = ControlPlane::start().expect("etcd + kube-apiserver");
    install_crds(&cp);
    kubectl(&cp, &["create", "namespace", NAMESPACE]);
    kubectl(
        &cp,
        &["create", "serviceaccount", "default", "-n", "default"],
    );
    let agent = agent_binary(Profile::Debug).expect("flatwire-agent build");
    let operator_bin = operator_binary();
    let cni_bin = cni_binary();

    let spec = PlanetSpec::new(agent)
        .host("a", None)
        .host("b", None)
        .host("c", None);
    let mut planet = Planet::start(&spec).expect("planet");
    let grace = GC_GRACE.as_secs().to_string();
    let _bridges: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| kube_node(&cp, &mut planet, n, &["--pod-gc-grace", &grace]))
        .collect();

    let pod_ns: Vec<Host> = ["a-p1", "b-p2"]
        .iter()
        .map(|n| planet.topology().host(n).unwrap())
        .collect();
    let ctl_api = ControllerApi::expose(&planet, "ctl0");
    let ctl_address = ctl_api.address.clone();
    let mut operators = [
        Some(start_operator(&operator_bin, &cp, &ctl_api, "op-1")),
        Some(start_operator(&operator_bin, &cp, &ctl_api, "op-2")),
    ];

    apply(&cp, network("accept;"));
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
        apply(&cp, k8s::pod("default", name, host, json!({"role": role})));
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
        let rt = Runtime::new(&cni_bin, CNI_NETWORK, &nwid, &planet.agent(host).socket());
        let result = rt.run(planet.agent(host).host(), "add", &netns, &obj);
        let ip = result_ip(&result);
        assert!(
            ip.to_string().starts_with("198.19.7."),
            "{name}: {ip} is not from the pool"
        );
        pods.push((name, host, role, obj, netns, ip, rt));
    }
    // Each pod member was authorized by vouch and carries its label's tag.
    let ctl = planet.agent("ctl0");
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
    apply(&cp, network(BLOCK_5201));
    let (_, took) = wait("the rule to block TCP 5201", LIMIT, || {
        (!tcp_5201()).then_some(())
    });
    assert!(
        ping_in(&p1_ns, p2_ip, 2).ok,
        "ping must pass while TCP 5201 is blocked"
    );
    eprintln!("rule enforced after {took:?}");
    apply(&cp, network("accept;"));
    let (_, took) = wait("the lifted rule to let TCP 5201 through", LIMIT, || {
        tcp_5201().then_some(())
    });
    eprintln!("rule lifted after {took:?}");

    // An outside agent (c, in no cluster) joins through a NetworkMember.
    let c = planet.agent("c").address().to_owned();
    apply(
        &cp,
        json!({
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
    // keeps pinging p2 (pod to pod, across hosts) and c; the new leader then handles a Pod
    // deletion.
    let holder = lease_holder(&cp).expect("a Lease holder");
    let leader = if holder == "op-1" { 0 } else { 1 };
    let pingers = [
        (pinger(&p1_ns, p2_ip, 20), "p1 -> p2 during the takeover"),
        (pinger(&p1_ns, c_ip, 20), "p1 -> c during the takeover"),
    ];
    // SIGKILL: the leader cannot release the Lease; the standby waits for it to expire.
    let mut dead = operators[leader].take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the leading operator");
    dead.stop();
    let (new_holder, took) = wait("the standby to take the Lease", TAKEOVER_LIMIT, || {
        lease_holder(&cp).filter(|h| *h != holder)
    });
    eprintln!("{new_holder} took over from {holder} {took:?} after it was killed");
    for (p, what) in pingers {
        no_loss(p, what);
    }

    // The API server goes away for longer than the agents' pod GC grace: the agents keep
    // their pods (from their caches) and the pods keep talking; the leader cannot renew its
    // Lease and exits to restart as a candidate, and its restart (what the Deployment does)
    // leads once the API server is back.
    let outage = pinger(&p1_ns, p2_ip, OUTAGE.as_secs() + 2);
    cp.stop_apiserver();
    std::thread::sleep(OUTAGE);
    for (name, netns) in [("p1", &p1_ns), ("p2", &p2_ns)] {
        assert!(
            has_eth0(netns),
            "{name} was detached while the API server was away"
        );
    }
    for n in ["a", "b"] {
        assert!(
            planet.agent_mut(n).running(),
            "agent {n} exited without the API server:\n{}",
            planet.agent(n).log_tail(20)
        );
    }
    cp.restart_apiserver().expect("the API server back");
    no_loss(outage, "p1 -> p2 while the API server was away");
    let survivor = 1 - leader;
    let mut op = operators[survivor].take().unwrap();
    let exited = op.wait_timeout(LIMIT);
    let log = std::fs::read_to_string(cp.dir().join(format!("operator-{new_holder}.log")))
        .unwrap_or_default();
    assert!(
        exited.is_some() && log.contains("lost leadership"),
        "the leader without an API server should exit to restart as a candidate ({exited:?}):\n{log}"
    );
    operators[survivor] = Some(start_operator(&operator_bin, &cp, &ctl_api, "op-3"));
    let holder = wait_leader(&cp);
    assert_eq!(holder, "op-3", "the restarted operator leads");

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
    let ctl = planet.agent("ctl0");
    wait("p2's member to leave the controller", LIMIT, || {
        let path = format!("/controller/network/{nwid}/member");
        let members = ctl.api_ok("GET", &path, None).ok()?;
        members.get(&p2_address).is_none().then_some(())
    });

    // Once the Pod object is gone (a kubelet would finish the deletion), node b's agent
    // detaches its attachment after the grace period, as a CNI GC would.
    assert!(has_eth0(&p2_ns), "p2 detached while its Pod still existed");
    kubectl(
        &cp,
        &[
            "delete",
            "pod",
            "p2",
            "-n",
            "default",
            "--grace-period=0",
            "--force",
        ],
    );
    // Grace, then the 5 s GC period, plus the agent's pod watch retry backoff after the outage
    // (capped at 4 s, up to twice that with jitter) and scheduling slack.
    let gc_limit = GC_GRACE + Duration::from_secs(5) + Duration::from_secs(15);
    let gone = Instant::now();
    while has_eth0(&p2_ns) {
        assert!(
            gone.elapsed() < gc_limit,
            "p2's attachment not collected {gc_limit:?} after its Pod was gone; agent b:\n{}",
            planet.agent("b").log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "p2 detached by the agent's pod GC {:?} after its Pod was gone",
        gone.elapsed()
    );
    assert!(has_eth0(&p1_ns), "p1 was collected with p2");
    assert!(ping_in(&p1_ns, c_ip, 2).ok, "p1 lost c after p2's GC");

    // The runtime stops both pods (p2's DEL after the GC is a no-op); their attachments go.
    for (name, host, _, obj, netns, _, rt) in pods.iter().rev() {
        rt.run(planet.agent(host).host(), "del", netns, obj);
        assert!(!has_eth0(netns), "eth0 is left in {name} after DEL");
    }
}
