//! Pod start and stop as a container runtime drives them: the real `flatwire-cni` binary run
//! with the CNI environment and a network config on stdin, for pod namespaces of the harness.
//!
//! The host agent is restarted with an explicit identity pool depth and the bench waits until
//! the pool is full before each batch. A batch is `n` pods started one after the other
//! (sequential) or all at once (concurrent). ADD latency runs from the plugin's start to "IP
//! ready": the plugin printed its result and the address it names is on `eth0` in the pod's
//! namespace (looked up after the result; when it is not there yet, the first time it is seen
//! counts). DEL latency runs to the plugin's exit with `eth0` gone from the namespace. The
//! agent's own view of each ADD is the `took_ms` of its `attached` log line.
//!
//! The plugin only talks to the agent's Unix socket, so it runs in the bench's own network
//! namespace: an `ip netns exec` around it would add its own cost to every figure.

use std::fs::File;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{self, AGENT_PORT, METRICS_PORT, Network, Planet};
use flatwire_tests::process::Proc;
use serde_json::{Value, json};

use super::measure;

/// The agent's identity pool depth gauge.
const POOL_GAUGE: &str = "flatwire_identity_pool_depth";
/// How long the address (after ADD) or the interface (after DEL) may lag behind the plugin.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Pods per batch.
    pub pods: usize,
    /// The agent's identity pool depth (`--identity-pool`).
    pub pool: usize,
    /// How long to wait for the pool to fill before each batch.
    pub pool_wait: Duration,
}

/// Latency percentiles of one kind of operation, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Operations measured.
    pub samples: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of `ms`; `None` when it is empty.
    pub fn of(mut ms: Vec<f64>) -> Option<Self> {
        ms.sort_by(f64::total_cmp);
        let max_ms = *ms.last()?;
        Some(Self {
            samples: ms.len(),
            p50_ms: measure::percentile(&ms, 50.0),
            p99_ms: measure::percentile(&ms, 99.0),
            max_ms,
        })
    }

    /// As JSON.
    pub fn to_json(self) -> Value {
        json!({"samples": self.samples, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
               "max_ms": self.max_ms})
    }
}

/// One batch of pods: attached, then (after both batches) detached.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The machine's 1-minute load average when the batch began (wall times on a busy
    /// machine stretch with it).
    pub load: Option<f64>,
    /// Identities in the pool when the batch began.
    pub pool_before: u64,
    /// Identities in the pool right after its last ADD.
    pub pool_after: u64,
    /// CNI ADD to IP ready.
    pub add: Latency,
    /// The agent's own Attach time (`took_ms` in its log).
    pub agent_attach: Option<Latency>,
    /// From the first ADD's start to the last pod's IP ready, seconds.
    pub add_wall_s: f64,
    /// CNI DEL to the interface gone.
    pub del: Latency,
    /// Failed ADDs and DELs: their messages (the first few) and how many.
    pub failures: Failures,
}

/// Failed operations of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Failures {
    /// How many ADDs failed.
    pub add: usize,
    /// How many DELs failed.
    pub del: usize,
    /// The first few messages.
    pub first: Vec<String>,
}

impl Failures {
    /// How many messages are kept.
    const KEEP: usize = 3;

    fn note(&mut self, messages: &[String]) {
        let room = Self::KEEP.saturating_sub(self.first.len());
        self.first.extend(messages.iter().take(room).cloned());
    }
}

/// Everything the pod runs found.
#[derive(Debug, Clone, PartialEq)]
pub struct PodFigures {
    /// Pods per batch.
    pub pods: usize,
    /// The pool depth the agent ran with.
    pub pool_target: usize,
    /// Pods started one after the other.
    pub sequential: Batch,
    /// Pods started all at once.
    pub concurrent: Batch,
    /// Agent RSS before any pod (pool full, idle), bytes.
    pub rss_idle: u64,
    /// With the sequential batch attached, bytes.
    pub rss_sequential: u64,
    /// With both batches attached, bytes.
    pub rss_all: u64,
    /// After every pod was deleted again, bytes.
    pub rss_after_del: u64,
}

impl Batch {
    fn to_json(&self) -> Value {
        json!({
            "load_average": self.load,
            "pool_before": self.pool_before, "pool_after": self.pool_after,
            "add_to_ip_ready": self.add.to_json(),
            "agent_attach": self.agent_attach.map(Latency::to_json),
            "add_wall_s": self.add_wall_s,
            "del": self.del.to_json(),
            "failed": {"add": self.failures.add, "del": self.failures.del,
                       "first": self.failures.first},
        })
    }
}

impl PodFigures {
    /// Agent memory per attached pod: the RSS growth from idle to both batches attached,
    /// divided by the pods attached, bytes.
    pub fn per_pod(&self) -> u64 {
        self.rss_all.saturating_sub(self.rss_idle) / (2 * self.pods.max(1) as u64)
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "pods_per_batch": self.pods,
            "identity_pool_depth": self.pool_target,
            "sequential": self.sequential.to_json(),
            "concurrent": self.concurrent.to_json(),
            "rss_bytes": {
                "idle": self.rss_idle, "sequential_attached": self.rss_sequential,
                "all_attached": self.rss_all, "after_del": self.rss_after_del,
            },
            "per_pod_bytes": self.per_pod(),
        })
    }
}

/// The plugin and the config a runtime would hand it.
struct Plugin {
    bin: PathBuf,
    conf: String,
}

impl Plugin {
    /// Runs `command` for `pod` as a runtime does; returns its stdout (the CNI result).
    fn run(&self, command: &str, pod: &Host) -> Result<String> {
        let dir = self.bin.parent().unwrap_or(Path::new("/"));
        let mut child = Command::new(&self.bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod.ns())
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", dir)
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE=bench;K8S_POD_NAME={0};K8S_POD_UID=uid-{0}",
                    pod.name()
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that fails early may not read its config; its exit status says why.
            let _ = stdin.write_all(self.conf.as_bytes());
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "flatwire-cni {command} {} ({}): {} {}",
                pod.name(),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// ADD to IP ready, milliseconds.
    fn add(&self, pod: &Host) -> Result<f64> {
        let start = Instant::now();
        let result = self.run("ADD", pod)?;
        let took = start.elapsed();
        let v: Value = serde_json::from_str(&result).context("ADD printed no JSON result")?;
        let addr = v["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("ADD {}: no address in {v}", pod.name()))?
            .to_owned();
        let ready = until(took, start, || {
            let out = ip_in(pod, &["-o", "addr", "show", "dev", "eth0"])?;
            Ok(out.contains(&format!(" {addr} ")))
        })
        .with_context(|| format!("{addr} on eth0 of {}", pod.name()))?;
        Ok(ready.as_secs_f64() * 1e3)
    }

    /// DEL to the interface gone, milliseconds.
    fn del(&self, pod: &Host) -> Result<f64> {
        let start = Instant::now();
        self.run("DEL", pod)?;
        let took = start.elapsed();
        let gone = until(took, start, || {
            Ok(ip_in(pod, &["-o", "link", "show", "dev", "eth0"]).is_err())
        })
        .with_context(|| format!("eth0 of {} to go away", pod.name()))?;
        Ok(gone.as_secs_f64() * 1e3)
    }
}

/// `took` when `done` holds right away, else the time since `start` when it first holds
/// (polled for at most [`SETTLE_LIMIT`]).
fn until(
    took: Duration,
    start: Instant,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    if done()? {
        return Ok(took);
    }
    while start.elapsed() < took + SETTLE_LIMIT {
        std::thread::sleep(Duration::from_millis(2));
        if done()? {
            return Ok(start.elapsed());
        }
    }
    bail!("not seen within {SETTLE_LIMIT:?} after the plugin returned")
}

/// `ip -n <pod> args` (a plain `setns`, cheaper than `ip netns exec`); stdout, or an error
/// when it fails.
fn ip_in(pod: &Host, args: &[&str]) -> Result<String> {
    let out =
        flatwire_tests::netns::run_checked(Command::new("ip").arg("-n").arg(pod.ns()).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What one batch of operations gave.
struct Outcomes {
    /// Milliseconds per pod in `pods` order; a failed operation counts as infinitely slow.
    ms: Vec<f64>,
    /// The failures' messages.
    failures: Vec<String>,
    /// From the start of the first to the end of the last.
    wall: Duration,
}

/// Runs `op` on each pod, one after the other (`concurrent`: all at once, released together),
/// printing progress. A failed operation does not stop the others.
fn batch(
    pods: &[Host],
    concurrent: bool,
    what: &str,
    op: impl Fn(&Host) -> Result<f64> + Sync,
) -> Outcomes {
    let n = pods.len();
    let mut out = Outcomes {
        ms: vec![f64::INFINITY; n],
        failures: Vec::new(),
        wall: Duration::ZERO,
    };
    let mut record = |done: usize, i: usize, r: Result<f64>, started: Instant| {
        match r {
            Ok(ms) => out.ms[i] = ms,
            Err(e) => out.failures.push(format!("{e:#}")),
        }
        if done.is_multiple_of(10) || done == n {
            println!(
                "    {what}: {done} of {n} ({:.1} s, {} failed)",
                started.elapsed().as_secs_f64(),
                out.failures.len()
            );
        }
    };
    let started = if concurrent {
        let gate = Barrier::new(n + 1);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            for (i, pod) in pods.iter().enumerate() {
                let (gate, tx, op) = (&gate, tx.clone(), &op);
                s.spawn(move || {
                    gate.wait();
                    // The receiver outlives every sender; a send cannot fail.
                    let _ = tx.send((i, op(pod)));
                });
            }
            drop(tx);
            gate.wait();
            let started = Instant::now();
            for (done, (i, r)) in rx.iter().enumerate() {
                record(done + 1, i, r, started);
            }
            started
        })
    } else {
        let started = Instant::now();
        for (i, pod) in pods.iter().enumerate() {
            record(i + 1, i, op(pod), started);
        }
        started
    };
    out.wall = started.elapsed();
    out
}

/// The pool depth agent `name` reports.
fn pool_depth(planet: &Planet, name: &str) -> Result<u64> {
    let text = planet.agent(name).metrics()?;
    let v = planet::sample(&text, POOL_GAUGE).with_context(|| format!("no {POOL_GAUGE}"))?;
    Ok(v as u64)
}

/// Waits (at most `limit`, printing progress) until agent `name`'s pool holds `target`
/// identities; returns the depth reached.
fn fill_pool(planet: &Planet, name: &str, target: usize, limit: Duration) -> Result<u64> {
    let start = Instant::now();
    let mut shown = Instant::now();
    loop {
        let depth = pool_depth(planet, name)?;
        if depth >= target as u64 {
            println!(
                "    identity pool full: {depth} of {target} ({:.0} s)",
                start.elapsed().as_secs_f64()
            );
            return Ok(depth);
        }
        if start.elapsed() >= limit {
            println!(
                "    identity pool still at {depth} of {target} after {limit:?}; measuring anyway"
            );
            return Ok(depth);
        }
        if shown.elapsed() >= Duration::from_secs(10) {
            println!(
                "    identity pool: {depth} of {target} ({:.0} s)",
                start.elapsed().as_secs_f64()
            );
            shown = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Restarts host agent `name` with the same state and flags as the planet gives it plus
/// `--identity-pool pool`; waits until it is back on `net`. The returned process is the agent.
fn restart_with_pool(
    planet: &mut Planet,
    agent: &Path,
    name: &str,
    net: &Network,
    pool: usize,
) -> Result<Proc> {
    planet.stop_agent(name);
    let a = planet.agent(name);
    let log = File::options()
        .create(true)
        .append(true)
        .open(a.home().join("agent.log"))?;
    let mut cmd = a.host().command(agent);
    cmd.arg("--home")
        .arg(a.home())
        .arg("--socket")
        .arg(a.socket())
        .args(["--port", &AGENT_PORT.to_string()])
        .args(["--metrics-listen", &format!("127.0.0.1:{METRICS_PORT}")])
        .arg("--planet")
        .arg(planet.dir().join("planet"))
        .args(["--identity-pool", &pool.to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let proc = Proc::spawn(&format!("agent {name} (identity pool {pool})"), &mut cmd)?;
    planet.wait_member(name, net)?;
    Ok(proc)
}

/// The `took_ms` of the `attached` lines of an agent log (colours, if any, removed).
fn agent_attach_ms(log: &str) -> Vec<f64> {
    attached_field_ms(log, "took_ms")
}

/// The phases of the agent's Attach its `attached` lines report, as (field, name).
const PHASES: [(&str, &str); 4] = [
    ("identity_ms", "identity"),
    ("tap_ms", "TAP and member"),
    ("config_ms", "config wait"),
    ("link_and_record_ms", "link and record"),
];

/// The values of `field` (`name=<ms>`) of the `attached` lines of an agent log.
fn attached_field_ms(log: &str, field: &str) -> Vec<f64> {
    let prefix = format!("{field}=");
    log.lines()
        .filter(|l| l.contains(" attached "))
        .filter_map(|l| {
            let v = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix(prefix.as_str()))?;
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Where the agent's Attach time went: p50 / p99 per phase, for people.
fn phases(log: &str) -> String {
    PHASES
        .iter()
        .filter_map(|(field, name)| {
            let l = Latency::of(attached_field_ms(log, field))?;
            Some(format!("{name} {:.0}/{:.0}", l.p50_ms, l.p99_ms))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agent log of `name` from byte `from` on, and its length.
fn log_since(planet: &Planet, name: &str, from: usize) -> (String, usize) {
    let text =
        std::fs::read_to_string(planet.agent(name).home().join("agent.log")).unwrap_or_default();
    let tail = text.get(from..).unwrap_or_default().to_owned();
    (tail, text.len())
}

/// Restarts host agent `name` (a member of `net`, reachable at `gateway` over it) with the
/// pool depth of `opt`, then attaches a sequential and a concurrent batch of pods through
/// `plugin` (the `flatwire-cni` binary), checks the first and last pod reach `gateway`, and
/// deletes them all again.
pub fn run(
    planet: &mut Planet,
    agent: &Path,
    plugin: PathBuf,
    name: &str,
    net: &Network,
    gateway: IpAddr,
    opt: Options,
) -> Result<PodFigures> {
    println!(
        "    restarting agent {name} with --identity-pool {}",
        opt.pool
    );
    let _agent = restart_with_pool(planet, agent, name, net, opt.pool)?;
    let pid = measure::agent_pid(planet.agent(name).host())?;
    let plugin = Plugin {
        bin: plugin,
        conf: json!({
            "cniVersion": "1.1.0", "name": "bench", "type": "flatwire-cni",
            "network": net.nwid, "mode": "secondary",
            "agentSocket": planet.agent(name).socket(),
        })
        .to_string(),
    };
    // Per batch: its pods, one whose ADD worked, its figures.
    let mut batches: Vec<(Vec<Host>, Option<Host>, Batch)> = Vec::new();
    let mut rss = Vec::new();
    for concurrent in [false, true] {
        let kind = if concurrent {
            "concurrent"
        } else {
            "sequential"
        };
        let pool_before = fill_pool(planet, name, opt.pool, opt.pool_wait)?;
        if batches.is_empty() {
            settle(pid);
            rss.push(measure::rss(pid)?);
        }
        let pods = (0..opt.pods)
            .map(|i| planet.topology().host(&format!("{}{i}", &kind[..3])))
            .collect::<Result<Vec<Host>, _>>()?;
        let (_, log_at) = log_since(planet, name, 0);
        let load = measure::load_average();
        let add = batch(&pods, concurrent, &format!("{kind} ADD"), |p| plugin.add(p));
        let pool_after = pool_depth(planet, name)?;
        let (log, _) = log_since(planet, name, log_at);
        let agent_attach = Latency::of(agent_attach_ms(&log));
        println!("    agent Attach phases p50/p99, ms: {}", phases(&log));
        let mut failures = Failures {
            add: add.failures.len(),
            ..Failures::default()
        };
        failures.note(&add.failures);
        // A pod whose ADD worked, to check it reaches the gateway.
        let attached = pods.iter().zip(&add.ms).find(|(_, ms)| ms.is_finite());
        let attached = attached.map(|(p, _)| p.clone());
        let lat = Latency::of(add.ms).context("no pods")?;
        println!(
            "    {kind} ADD to IP ready: p50 {} ms, p99 {} ms, {} failed (agent: {}); pool \
             {pool_before} -> {pool_after}",
            ms(lat.p50_ms),
            ms(lat.p99_ms),
            failures.add,
            agent_attach.map_or("-".into(), |a| format!(
                "p50 {:.0} ms, p99 {:.0} ms",
                a.p50_ms, a.p99_ms
            )),
        );
        // Let the members' first config exchanges and the TAP queues settle.
        std::thread::sleep(Duration::from_secs(2));
        rss.push(measure::rss(pid)?);
        let b = Batch {
            load,
            pool_before,
            pool_after,
            add: lat,
            agent_attach,
            add_wall_s: add.wall.as_secs_f64(),
            del: lat,
            failures,
        };
        batches.push((pods, attached, b));
    }
    for pod in batches.iter().filter_map(|(_, a, _)| a.as_ref()) {
        let r = planet::ping_in(pod, gateway, 3);
        if !r.ok {
            bail!("pod {} does not reach {gateway}: {}", pod.name(), r.output);
        }
    }
    for (i, (pods, _, b)) in batches.iter_mut().enumerate() {
        let (kind, concurrent) = if i == 0 {
            ("sequential", false)
        } else {
            ("concurrent", true)
        };
        let del = batch(pods, concurrent, &format!("{kind} DEL"), |p| plugin.del(p));
        b.failures.del = del.failures.len();
        b.failures.note(&del.failures);
        b.del = Latency::of(del.ms).context("no pods")?;
        println!(
            "    {kind} DEL: p50 {} ms, p99 {} ms, {} failed",
            ms(b.del.p50_ms),
            ms(b.del.p99_ms),
            b.failures.del
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    Ok(PodFigures {
        pods: opt.pods,
        pool_target: opt.pool,
        sequential: batches[0].2.clone(),
        concurrent: batches[1].2.clone(),
        rss_idle: rss[0],
        rss_sequential: rss[1],
        rss_all: rss[2],
        rss_after_del: measure::rss(pid)?,
    })
}

/// Milliseconds for people: a failed operation (infinitely slow) shows as `failed`.
pub fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "failed".into()
    }
}

/// Waits until the agent is idle (its pool refill done), saying so when it is not.
fn settle(pid: u32) {
    if let Err(busy) = measure::settle(&[pid], Duration::from_secs(60)) {
        println!("    agent still uses {busy:.0}% of a core; measuring anyway");
    }
}

#[cfg(test)]
impl PodFigures {
    /// Figures of `pods` pods per batch whose ADD p99 is `seq_p99` (sequential) and
    /// `conc_p99` (concurrent) ms, RSS growing from 10 to 30 MiB.
    pub(crate) fn example(pods: usize, seq_p99: f64, conc_p99: f64) -> Self {
        let batch = |p99: f64| {
            let lat = Latency::of(vec![1.0, p99]).expect("samples");
            Batch {
                load: Some(1.0),
                pool_before: 128,
                pool_after: 28,
                add: lat,
                agent_attach: None,
                add_wall_s: 1.0,
                del: lat,
                failures: Failures::default(),
            }
        };
        Self {
            pods,
            pool_target: 128,
            sequential: batch(seq_p99),
            concurrent: batch(conc_p99),
            rss_idle: 10 << 20,
            rss_sequential: 20 << 20,
            rss_all: 30 << 20,
            rss_after_del: 12 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_times_come_from_the_attached_lines() {
        let log = "2026-11-22T22:00:00.1Z  INFO flatwire_agent::attach: attached member=a1b2c3d4e5 \
                   nwid=1 took_ms=75\n\
                   2026-11-22T22:00:00.2Z  INFO flatwire_agent::attach: detached member=a1b2c3d4e5\n\
                   2026-11-22T22:00:00.3Z  INFO flatwire_agent::attach: attached took_ms=12\n";
        assert_eq!(agent_attach_ms(log), vec![75.0, 12.0]);
        let phased = "INFO flatwire_agent::attach: attached took_ms=30 identity_ms=1 tap_ms=4 \
                      config_ms=20 link_and_record_ms=5\n";
        assert_eq!(attached_field_ms(phased, "config_ms"), vec![20.0]);
        assert_eq!(
            phases(phased),
            "identity 1/1, TAP and member 4/4, config wait 20/20, link and record 5/5"
        );
        let l = Latency::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            (l.samples, l.p50_ms, l.p99_ms, l.max_ms),
            (3, 2.0, 3.0, 3.0)
        );
        assert!(Latency::of(Vec::new()).is_none());
    }

    #[test]
    fn memory_per_pod_counts_both_batches() {
        let f = PodFigures::example(100, 75.0, 400.0);
        assert_eq!(f.per_pod(), (20 << 20) / 200);
        let j = f.to_json();
        assert_eq!(j["per_pod_bytes"], (20 << 20) / 200);
        assert_eq!(j["concurrent"]["add_to_ip_ready"]["p99_ms"], 400.0);
        assert!(j["sequential"]["agent_attach"].is_null());
    }
}
