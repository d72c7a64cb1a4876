//! The operator's part of `cargo xtask bench`: a real etcd + kube-apiserver, the CRDs, one
//! `flatwire-operator` (release build) serving the planet's controller agent, and hosts `a`
//! and `b` as Kubernetes nodes (agents with `--kube-node`), as `tests/tests/k8s_pods.rs`
//! sets them up through [`flatwire_tests::k8s`].
//!
//! It measures how fast the operator reconciles Pods (created at once with one `kubectl
//! create` of a List, bound to the two nodes; there is no kubelet) into controller pod
//! bindings and NetworkMembers into controller members, its resident memory before and at
//! that size, and then, with both hosts joined to the network, the time from `kubectl apply`
//! of a Network whose rules changed to the new config revision held by every host agent.

use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use flatwire_tests::controlplane::ControlPlane;
use flatwire_tests::k8s::{
    self, ControllerApi, NAMESPACE, apply, get, install_crds, kube_node, kubectl, start_operator,
};
use flatwire_tests::planet::{Network, NetworkSpec, Planet, PlanetSpec};
use serde_json::{Value, json};

use super::measure;
use crate::table::Table;

/// How many objects and edits the operator part uses.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Pods created (spread over nodes `a` and `b`).
    pub pods: usize,
    /// NetworkMembers created (random member addresses).
    pub members: usize,
    /// Edits of the Network's rules.
    pub edits: usize,
}

/// What the operator part measured.
#[derive(Debug, Clone, Default)]
pub struct OperatorFigures {
    /// Pods created.
    pub pods: usize,
    /// Seconds `kubectl create` of the Pod List took.
    pub pods_create_s: f64,
    /// Seconds from the start of that `kubectl create` until every pod had its binding.
    pub pods_bound_s: f64,
    /// NetworkMembers created.
    pub members: usize,
    /// Seconds `kubectl create` of the NetworkMember List took.
    pub members_create_s: f64,
    /// Seconds from the start of that `kubectl create` until the controller held them all.
    pub members_done_s: f64,
    /// Operator RSS with its Network and no pods, bytes.
    pub rss_idle: u64,
    /// Operator RSS with every pod bound and every member written, bytes.
    pub rss_loaded: u64,
    /// Operator peak RSS (`VmHWM`) at the end, bytes.
    pub rss_peak: u64,
    /// Per edit: milliseconds from `kubectl apply` to the new revision on every host agent.
    pub rules_ms: Vec<f64>,
}

impl OperatorFigures {
    fn per_s(n: usize, s: f64) -> f64 {
        if s > 0.0 { n as f64 / s } else { 0.0 }
    }

    /// Rules latency p50 and p99, ms (None before any edit).
    fn rules(&self) -> Option<(f64, f64)> {
        let mut v = self.rules_ms.clone();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| (measure::percentile(&v, 50.0), measure::percentile(&v, 99.0)))
    }

    /// The summary table.
    pub fn table(&self) -> Table {
        let mib = |b: u64| format!("{:.1}", b as f64 / (1024.0 * 1024.0));
        let mut t = Table::new(&["operator", "value"]);
        t.row(&[
            "pods created (kubectl create of a List), s",
            &format!("{} in {:.2}", self.pods, self.pods_create_s),
        ]);
        t.row(&[
            "pods bound (from create start), s",
            &format!("{:.2}", self.pods_bound_s),
        ]);
        t.row(&[
            "reconcile throughput, pods/s",
            &format!("{:.0}", Self::per_s(self.pods, self.pods_bound_s)),
        ]);
        t.row(&[
            "NetworkMembers created, s",
            &format!("{} in {:.2}", self.members, self.members_create_s),
        ]);
        t.row(&[
            "members written (from create start), s",
            &format!("{:.2}", self.members_done_s),
        ]);
        t.row(&[
            "reconcile throughput, members/s",
            &format!("{:.0}", Self::per_s(self.members, self.members_done_s)),
        ]);
        t.row(&[
            "operator RSS idle -> loaded (peak), MiB",
            &format!(
                "{} -> {} ({})",
                mib(self.rss_idle),
                mib(self.rss_loaded),
                mib(self.rss_peak)
            ),
        ]);
        let rules = self.rules().map_or("-".into(), |(p50, p99)| {
            format!("{p50:.0} / {p99:.0} ({} edits)", self.rules_ms.len())
        });
        t.row(&["Network edit to rules on every agent p50 / p99, ms", &rules]);
        t
    }

    /// The same figures as JSON.
    pub fn to_json(&self) -> Value {
        let rules = self.rules();
        json!({
            "pods": self.pods,
            "pods_create_s": self.pods_create_s,
            "pods_bound_s": self.pods_bound_s,
            "pods_per_s": Self::per_s(self.pods, self.pods_bound_s),
            "network_members": self.members,
            "members_create_s": self.members_create_s,
            "members_done_s": self.members_done_s,
            "members_per_s": Self::per_s(self.members, self.members_done_s),
            "rss_idle_bytes": self.rss_idle,
            "rss_loaded_bytes": self.rss_loaded,
            "rss_peak_bytes": self.rss_peak,
            "rules_latency_ms": {
                "p50": rules.map(|r| r.0),
                "p99": rules.map(|r| r.1),
                "samples": self.rules_ms,
            },
        })
    }
}

/// The benchmark Network (number 9): a pool, a `role` tag from the pods' label, `rules`.
fn network(rules: &str) -> Value {
    json!({
        "apiVersion": "flatwire.io/v1alpha1", "kind": "Network",
        "metadata": {"name": "bench"},
        "spec": {
            "number": 9,
            "ipAssignmentPools": [{"ipRangeStart": "198.19.0.10", "ipRangeEnd": "198.19.15.250"}],
            "routes": [{"target": "198.19.0.0/20"}],
            "v4AssignMode": ["pool"],
            "tags": [{
                "name": "role", "id": 100, "enum": {"web": 1, "db": 2},
                "podLabel": "role", "default": 1,
            }],
            "rules": rules,
            "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]},
        },
    })
}

/// The rules of edit `i`: a different port each time, so each edit is a new config.
fn rules(i: usize) -> String {
    format!(
        "drop ipprotocol tcp dport {} tseq role web treq role db;\naccept;\n",
        6000 + i
    )
}

/// `n` distinct member addresses (10 hex digits, first byte neither 0 nor 0xff) from a
/// xorshift seeded with the clock.
fn addresses(n: usize) -> Vec<String> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1;
    let mut out = std::collections::BTreeSet::new();
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let a = 0x01_0000_0000 + x % (0xfe_ffff_ffff - 0x01_0000_0000);
        out.insert(format!("{a:010x}"));
    }
    out.into_iter().collect()
}

/// `kubectl create -f` of `items` as one List (written to `name` in the control plane's
/// directory); its wall time.
fn create_list(cp: &ControlPlane, name: &str, items: Vec<Value>) -> Result<Duration> {
    let file = cp.dir().join(name);
    std::fs::write(
        &file,
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )?;
    let path = file.to_str().context("a UTF-8 path")?;
    let start = Instant::now();
    cp.kubectl_run(&["create", "-f", path])
        .map_err(|e| anyhow!("kubectl create: {e}"))?;
    Ok(start.elapsed())
}

/// Polls `count` every `period` until it reaches `want`, printing progress every 2 s; the
/// time since `start`. Fails after `limit`.
fn wait_count(
    what: &str,
    want: usize,
    start: Instant,
    period: Duration,
    limit: Duration,
    mut count: impl FnMut() -> usize,
) -> Result<Duration> {
    let mut shown = Instant::now();
    loop {
        let n = count();
        if n >= want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: {n} of {want} after {limit:?}");
        }
        if shown.elapsed() >= Duration::from_secs(2) {
            println!(
                "    {what}: {n}/{want} after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            shown = Instant::now();
        }
        std::thread::sleep(period);
    }
}

/// `/proc/<pid>/status` field `VmHWM` (peak RSS), bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmHWM")?.parse()?;
    Ok(kb * 1024)
}

/// Runs the operator part with the release `agent` and `operator` binaries. The harness
/// helpers panic when a real part fails; a panic here is returned as an error after the
/// guards (control plane, planet, operator) tore everything down.
pub fn run(agent: &Path, operator: &Path, opt: Options) -> Result<OperatorFigures> {
    match catch_unwind(AssertUnwindSafe(|| measure_all(agent, operator, opt))) {
        Ok(r) => r,
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".into());
            Err(anyhow!(why))
        }
    }
}

fn measure_all(agent: &Path, operator: &Path, opt: Options) -> Result<OperatorFigures> {
    let mut fig = OperatorFigures {
        pods: opt.pods,
        members: opt.members,
        ..OperatorFigures::default()
    };
    println!("==> start etcd + kube-apiserver, install the CRDs");
    let cp = ControlPlane::start().map_err(|e| anyhow!("control plane: {e}"))?;
    install_crds(&cp);
    kubectl(&cp, &["create", "namespace", NAMESPACE]);
    kubectl(
        &cp,
        &["create", "serviceaccount", "default", "-n", "default"],
    );
    println!("==> start a planet: root0, ctl0, hosts a and b as Kubernetes nodes");
    let mut planet = Planet::start(
        &PlanetSpec::new(agent.to_owned())
            .host("a", None)
            .host("b", None),
    )?;
    let _bridges: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| kube_node(&cp, &mut planet, n, &[]))
        .collect();
    let ctl_api = ControllerApi::expose(&planet, "ctl0");
    println!("==> start flatwire-operator ({})", operator.display());
    let op = start_operator(operator, &cp, &ctl_api, "op-bench");
    let pid = op.pid();

    apply(&cp, network(&rules(0)));
    let (nwid, _) = k8s::wait("the Network's ID", Duration::from_secs(60), || {
        get(&cp, &["network", "bench"])["status"]["networkId"]
            .as_str()
            .map(str::to_owned)
    });
    let net = Network {
        nwid: nwid.clone(),
        spec: NetworkSpec::new("bench"),
    };
    let ctl = planet.agent("ctl0");
    let listed = |what: &str| {
        let (code, v) = ctl.api("GET", &format!("/controller/network/{nwid}/{what}"), None);
        if code == 200 {
            v.as_object().cloned().unwrap_or_default()
        } else {
            serde_json::Map::new()
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    fig.rss_idle = measure::rss(pid)?;
    println!(
        "    network {nwid}; operator RSS {:.1} MiB",
        fig.rss_idle as f64 / (1024.0 * 1024.0)
    );

    println!(
        "==> {} Pods on nodes a and b (one kubectl create)",
        opt.pods
    );
    let pods: Vec<Value> = (0..opt.pods)
        .map(|i| {
            let (node, role) = if i % 2 == 0 {
                ("a", "web")
            } else {
                ("b", "db")
            };
            k8s::pod(
                "default",
                &format!("bench-{i}"),
                node,
                json!({"role": role}),
            )
        })
        .collect();
    let start = Instant::now();
    fig.pods_create_s = create_list(&cp, "bench-pods.json", pods)?.as_secs_f64();
    println!("    created in {:.2} s", fig.pods_create_s);
    let limit = Duration::from_secs(600);
    let bound = wait_count(
        "pods bound",
        opt.pods,
        start,
        Duration::from_millis(200),
        limit,
        || listed("pod").len(),
    )?;
    fig.pods_bound_s = bound.as_secs_f64();
    println!("    every pod bound after {:.2} s", fig.pods_bound_s);

    println!("==> {} NetworkMembers (one kubectl create)", opt.members);
    let addrs = addresses(opt.members);
    let members: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({
                "apiVersion": "flatwire.io/v1alpha1", "kind": "NetworkMember",
                "metadata": {"name": format!("bench-{a}")},
                "spec": {"network": "bench", "address": a, "authorized": true},
            })
        })
        .collect();
    let start = Instant::now();
    fig.members_create_s = create_list(&cp, "bench-members.json", members)?.as_secs_f64();
    println!("    created in {:.2} s", fig.members_create_s);
    let done = wait_count(
        "members written",
        opt.members,
        start,
        Duration::from_millis(200),
        limit,
        || {
            let m = listed("member");
            addrs.iter().filter(|a| m.contains_key(*a)).count()
        },
    )?;
    fig.members_done_s = done.as_secs_f64();
    println!("    every member written after {:.2} s", fig.members_done_s);
    std::thread::sleep(Duration::from_secs(2));
    fig.rss_loaded = measure::rss(pid)?;
    fig.rss_peak = peak_rss(pid)?;
    println!(
        "    operator RSS {:.1} MiB (peak {:.1} MiB)",
        fig.rss_loaded as f64 / (1024.0 * 1024.0),
        fig.rss_peak as f64 / (1024.0 * 1024.0)
    );

    println!("==> hosts a and b join the network (authorized as the pods' nodes)");
    for host in ["a", "b"] {
        planet
            .agent(host)
            .api_ok("POST", &format!("/network/{nwid}"), Some(&json!({})))?;
    }
    for host in ["a", "b"] {
        planet.wait_member(host, &net)?;
    }

    println!(
        "==> {} edits of the Network's rules (kubectl apply) until both agents hold them",
        opt.edits
    );
    let revision = || {
        let (code, v) = ctl.api("GET", &format!("/controller/network/{nwid}"), None);
        (code == 200).then(|| v["revision"].as_u64()).flatten()
    };
    let mut line = String::new();
    for i in 1..=opt.edits {
        let before = revision().context("the controller's network revision")?;
        let start = Instant::now();
        apply(&cp, network(&rules(i)));
        let mut new = None;
        while new.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("edit {i}: the controller's revision stayed {before} for 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
            new = revision().filter(|r| *r > before);
        }
        let new = new.unwrap_or(before);
        planet.wait_revision(&net, new)?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        fig.rules_ms.push(ms);
        let _ = write!(line, " {ms:.0}");
        if i % 10 == 0 || i == opt.edits {
            println!("    edits to {i}, ms:{line}");
            line.clear();
        }
    }
    println!("==> stop the operator, the planet and the control plane");
    drop(op);
    drop(planet);
    drop(cp);
    Ok(fig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_valid_member_addresses() {
        let a = addresses(500);
        assert_eq!(a.len(), 500);
        for addr in &a {
            assert_eq!(addr.len(), 10, "{addr}");
            let v = u64::from_str_radix(addr, 16).unwrap();
            assert!(v >> 32 != 0 && v >> 32 != 0xff, "{addr}");
        }
        assert_eq!(
            a.iter().collect::<std::collections::BTreeSet<_>>().len(),
            500
        );
    }

    #[test]
    fn figures_give_rates_percentiles_and_json() {
        let f = OperatorFigures {
            pods: 1000,
            pods_bound_s: 20.0,
            members: 100,
            members_done_s: 4.0,
            rules_ms: (1..=20).map(|i| f64::from(i) * 10.0).collect(),
            ..OperatorFigures::default()
        };
        assert_eq!(f.rules(), Some((100.0, 200.0)));
        let j = f.to_json();
        assert_eq!(j["pods_per_s"], 50.0);
        assert_eq!(j["members_per_s"], 25.0);
        assert_eq!(j["rules_latency_ms"]["p99"], 200.0);
        assert!(f.table().render().contains("100 / 200 (20 edits)"));
        assert_eq!(
            OperatorFigures::default().to_json()["rules_latency_ms"]["p50"],
            Value::Null
        );
    }
}
