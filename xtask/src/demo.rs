//! `cargo xtask demo`: a local planet of real agents in network namespaces, exercised and
//! summarised.
//!
//! It builds `flatwire-agent`, starts one root, one controller and three hosts (two behind NAT
//! routers of their own), creates a network with tag rules on the controller, joins every host
//! (and, where the agent can attach pods over gRPC, one pod member per host), then measures:
//! the ping matrix, which peers went direct and which are relayed, iperf3 over flatwire next to
//! the raw underlay, and a rule change that blocks TCP port 5201 between two tags and lifts it
//! again. One line per step as it finishes; tables at the end; `--json` writes the figures.
//! Everything is torn down at the end, on error and on Ctrl-C.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use flatwire_tests::netns::Nat;
use flatwire_tests::planet::{
    self, Member, Network, NetworkSpec, PathKind, Planet, PlanetError, PlanetSpec, Profile,
};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{Value, json};

use crate::table::Table;

/// The tag every member carries, and the values of the two sides of the rule.
const ROLE_TAG: u32 = 100;
/// Tag value `alpha`.
const ALPHA: u32 = 1;
/// Tag value `beta`.
const BETA: u32 = 2;
/// The rules while TCP port 5201 is blocked between `alpha` and `beta` (both directions).
const BLOCK_RULES: &str = "tag role id 100 enum 1 alpha enum 2 beta;\n\
    drop ipprotocol tcp dport 5201 tseq role alpha treq role beta;\n\
    drop ipprotocol tcp dport 5201 tseq role beta treq role alpha;\n\
    accept;\n";
/// The rules without the block.
const OPEN_RULES: &str = "tag role id 100 enum 1 alpha enum 2 beta;\naccept;\n";
/// The iperf3 port the rules are about.
const IPERF_PORT: u16 = 5201;
/// Seconds of each throughput measurement.
const IPERF_SECONDS: u32 = 3;

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Build and run the debug agent (quicker to build, slower data path) instead of release.
    #[arg(long)]
    debug: bool,
}

/// Runs the demo (needs root).
pub fn run(args: &Args) -> anyhow::Result<()> {
    planet::check_root()?;
    // Until the build is done there is nothing to tear down: Ctrl-C ends cargo and us at once.
    let mut demo = Demo {
        start: Instant::now(),
        steps: Vec::new(),
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    let agent = demo.step("build flatwire-agent", || {
        let p = planet::agent_binary(profile)?;
        let detail = p.display().to_string();
        Ok((p, detail))
    })?;
    let cancel = cancel_on_ctrl_c()?;
    demo.cancel = cancel.clone();
    let spec = PlanetSpec::new(agent)
        .host("h1", None)
        .host("h2", Some(Nat::Masquerade))
        .host("h3", Some(Nat::Masquerade));
    let mut p = demo.step("start 1 root, 1 controller, 3 hosts (2 behind NAT)", || {
        let p = Planet::start_with_cancel(&spec, cancel.clone())?;
        let detail = format!("state and logs in {}", p.dir().display());
        Ok((p, detail))
    })?;
    let outcome = demo.exercise(&mut p);
    // Teardown runs on every path: agents stop by PID, then the namespaces go.
    let t = Instant::now();
    drop(p);
    demo.record("tear down", t, "agents stopped, namespaces deleted".into());
    let report = outcome?;
    report.print(&demo.steps);
    if let Some(path) = &args.json {
        let mut v = report.json();
        v["steps"] = demo
            .steps
            .iter()
            .map(|(n, s)| json!({"name": n, "seconds": s}))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

/// Blocks SIGINT in this thread (and so in every thread and child started later: the agents
/// are stopped by PID instead) and raises the returned flag when one arrives.
fn cancel_on_ctrl_c() -> anyhow::Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.thread_block().context("cannot block SIGINT")?;
    let flag = Arc::new(AtomicBool::new(false));
    let raised = flag.clone();
    std::thread::spawn(move || {
        while set.wait().is_ok() {
            if !raised.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted: tearing the planet down");
            }
        }
    });
    Ok(flag)
}

struct Demo {
    start: Instant,
    steps: Vec<(String, f64)>,
    cancel: Arc<AtomicBool>,
}

/// Everything the summary shows.
struct Report {
    members: Vec<Member>,
    pods: String,
    pings: Vec<(String, String, planet::PingResult)>,
    paths: Vec<(String, String, Option<PathKind>, Option<PathKind>)>,
    overlay_gbps: Option<f64>,
    underlay_gbps: Option<f64>,
    blocked: bool,
    restored: bool,
}

impl Demo {
    /// Runs one step, then prints one line: time since start, name, duration, detail.
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), PlanetError>,
    ) -> anyhow::Result<T> {
        if self.cancel.load(Ordering::SeqCst) {
            anyhow::bail!("interrupted before: {name}");
        }
        let t = Instant::now();
        match f() {
            Ok((v, detail)) => {
                self.record(name, t, detail);
                Ok(v)
            }
            Err(e) => {
                println!(
                    "[{:>6.1}s] {name}: FAILED after {:.1} s",
                    self.start.elapsed().as_secs_f64(),
                    t.elapsed().as_secs_f64()
                );
                Err(anyhow::Error::new(e).context(format!("step {name:?}")))
            }
        }
    }

    fn record(&mut self, name: &str, t: Instant, detail: String) {
        let secs = t.elapsed().as_secs_f64();
        println!(
            "[{:>6.1}s] {name} ({secs:.1} s){}{detail}",
            self.start.elapsed().as_secs_f64(),
            if detail.is_empty() { "" } else { ": " }
        );
        self.steps.push((name.to_owned(), secs));
    }

    fn exercise(&mut self, p: &mut Planet) -> anyhow::Result<Report> {
        let net = self.step("create network with tag rules on the controller", || {
            let mut spec = NetworkSpec::new("demo");
            spec.v6 = planet::V6Mode::Rfc4193;
            let net = p.create_network(&spec)?;
            p.set_rules(&net, OPEN_RULES)?;
            let detail = format!("{} (198.19.0.0/24 and RFC 4193 IPv6)", net.nwid);
            Ok((net, detail))
        })?;
        let roles = [("h1", ALPHA), ("h2", BETA), ("h3", ALPHA)];
        let mut members = self.step("join the hosts (tags h1, h3 alpha; h2 beta)", || {
            let mut ms = Vec::new();
            for (h, role) in roles {
                ms.push(p.join(h, &net, &[(ROLE_TAG, role)])?);
            }
            let detail = ms
                .iter()
                .map(|m| {
                    format!(
                        "{} {}",
                        m.name,
                        m.ipv4.map_or("-".into(), |a| a.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            Ok((ms, detail))
        })?;
        let pods = self.step("attach one pod member per host (gRPC Attach)", || {
            Ok(match attach_pods(p, &net) {
                Ok(pods) => {
                    let n = pods.len();
                    members.extend(pods);
                    (format!("{n} pod members"), format!("{n} attached"))
                }
                Err(PlanetError::Agent { agent, status, .. }) => {
                    let why = format!(
                        "none: {agent} answered {:?}: {}",
                        status.code(),
                        status.message()
                    );
                    (why.clone(), format!("skipped, {why}"))
                }
                Err(e) => return Err(e),
            })
        })?;
        let pings = self.step("ping matrix (IPv4, 3 echoes per pair)", || {
            let r = p.ping_matrix(&members, false)?;
            let ok = r.iter().filter(|(_, _, x)| x.ok).count();
            let detail = format!("{ok}/{} pairs answer", r.len());
            Ok((r, detail))
        })?;
        let paths = self.step("read paths from each agent's /peer", || {
            let hosts: Vec<&Member> = members.iter().filter(|m| m.name == m.agent).collect();
            let mut out = Vec::new();
            for (i, a) in hosts.iter().enumerate() {
                for b in &hosts[i + 1..] {
                    out.push((
                        a.name.clone(),
                        b.name.clone(),
                        p.agent(&a.agent).path_to(&b.address),
                        p.agent(&b.agent).path_to(&a.address),
                    ));
                }
            }
            let direct = out
                .iter()
                .filter(|(_, _, x, y)| *x == Some(PathKind::Direct) && *y == Some(PathKind::Direct))
                .count();
            let detail = format!("{direct}/{} host pairs direct", out.len());
            Ok((out, detail))
        })?;
        let (h1, h2) = (host_member(&members, "h1")?, host_member(&members, "h2")?);
        let (overlay_gbps, underlay_gbps) = self.step(
            "iperf3 h2 -> h1: over flatwire, then the raw underlay",
            || {
                let server = p.agent("h1").host().clone();
                let client = p.agent("h2").host().clone();
                let h1_over = ipv4(h1)?;
                let h1_under = IpAddr::V4(p.agent("h1").underlay());
                let over = p.iperf(&server, &client, h1_over, IPERF_PORT, IPERF_SECONDS)?;
                let under = p.iperf(&server, &client, h1_under, IPERF_PORT, IPERF_SECONDS)?;
                let detail = format!("overlay {}, underlay {}", gbps(over), gbps(under));
                Ok(((over, under), detail))
            },
        )?;
        let blocked = self.step(
            "rules: drop TCP 5201 between alpha and beta (pushed by the controller)",
            || {
                p.set_rules(&net, BLOCK_RULES)?;
                let r = p.iperf(
                    p.agent("h1").host(),
                    p.agent("h2").host(),
                    ipv4(h1)?,
                    IPERF_PORT,
                    1,
                )?;
                let ping = p.ping(h2, ipv4(h1)?, 2).ok;
                let detail = format!(
                    "iperf3 h2 -> h1:5201 {}, ping still {}",
                    if r.is_none() {
                        "blocked"
                    } else {
                        "NOT blocked"
                    },
                    if ping { "answers" } else { "FAILS" }
                );
                Ok((r.is_none(), detail))
            },
        )?;
        let restored = self.step("rules: lift the block", || {
            p.set_rules(&net, OPEN_RULES)?;
            let r = p.iperf(
                p.agent("h1").host(),
                p.agent("h2").host(),
                ipv4(h1)?,
                IPERF_PORT,
                1,
            )?;
            let detail = format!("iperf3 h2 -> h1:5201 {}", gbps(r));
            Ok((r.is_some(), detail))
        })?;
        Ok(Report {
            members,
            pods,
            pings,
            paths,
            overlay_gbps,
            underlay_gbps,
            blocked,
            restored,
        })
    }
}

/// Attaches one pod member per host through the agent's gRPC `Attach`.
fn attach_pods(p: &mut Planet, net: &Network) -> Result<Vec<Member>, PlanetError> {
    p.host_names()
        .iter()
        .map(|h| p.attach_pod(h, net, "pod1"))
        .collect()
}

fn host_member<'a>(members: &'a [Member], name: &str) -> anyhow::Result<&'a Member> {
    members
        .iter()
        .find(|m| m.name == name)
        .with_context(|| format!("no member {name}"))
}

fn ipv4(m: &Member) -> Result<IpAddr, PlanetError> {
    m.ipv4
        .map(IpAddr::V4)
        .ok_or_else(|| PlanetError::Invalid(format!("{} has no IPv4 address", m.name)))
}

fn gbps(v: Option<f64>) -> String {
    v.map_or("no connection".into(), |g| format!("{g:.2} Gbit/s"))
}

fn path_name(k: Option<PathKind>) -> &'static str {
    match k {
        Some(PathKind::Direct) => "direct",
        Some(PathKind::Relayed) => "relayed",
        None => "unknown",
    }
}

impl Report {
    fn print(&self, steps: &[(String, f64)]) {
        println!("\nmembers ({})", self.pods);
        let mut t = Table::new(&["member", "host", "address", "ip"]);
        for m in &self.members {
            let ip = m.ipv4.map_or("-".into(), |a| a.to_string());
            t.row(&[&m.name, &m.agent, &m.address, &ip]);
        }
        t.print();

        println!("\nping matrix (avg RTT, ms; row pings column)");
        let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        let header: Vec<&str> = std::iter::once("from \\ to")
            .chain(names.iter().copied())
            .collect();
        let mut t = Table::new(&header);
        for a in &names {
            let cells: Vec<String> = std::iter::once((*a).to_owned())
                .chain(names.iter().map(|b| {
                    self.pings.iter().find(|(x, y, _)| x == a && y == b).map_or(
                        "-".into(),
                        |(_, _, r)| match (r.ok, r.rtt_ms) {
                            (true, Some(ms)) => format!("{ms:.2}"),
                            (true, None) => "ok".into(),
                            (false, _) => "FAIL".into(),
                        },
                    )
                }))
                .collect();
            t.row(&cells.iter().map(String::as_str).collect::<Vec<_>>());
        }
        t.print();

        println!("\npaths between hosts (as each side's /peer reports it)");
        let mut t = Table::new(&["a", "b", "a sees b", "b sees a"]);
        for (a, b, x, y) in &self.paths {
            t.row(&[a, b, path_name(*x), path_name(*y)]);
        }
        t.print();

        println!("\nthroughput h2 -> h1 (iperf3, {IPERF_SECONDS} s, TCP)");
        let mut t = Table::new(&["path", "Gbit/s"]);
        t.row(&["flatwire overlay", &gbps(self.overlay_gbps)]);
        t.row(&["raw underlay", &gbps(self.underlay_gbps)]);
        t.print();

        println!("\nrules (drop TCP 5201 between tags alpha and beta)");
        let mut t = Table::new(&["check", "result"]);
        t.row(&["iperf3 to 5201 blocked", yes(self.blocked)]);
        t.row(&["iperf3 to 5201 restored", yes(self.restored)]);
        t.print();

        println!("\nsteps");
        let mut t = Table::new(&["step", "seconds"]);
        for (n, s) in steps {
            t.row(&[n, &format!("{s:.1}")]);
        }
        t.print();
    }

    fn json(&self) -> Value {
        json!({
            "members": self.members.iter().map(|m| json!({
                "name": m.name, "host": m.agent, "address": m.address,
                "ip": m.ipv4.map(|a| a.to_string()),
            })).collect::<Vec<_>>(),
            "ping": self.pings.iter().map(|(a, b, r)| json!({
                "from": a, "to": b, "ok": r.ok, "rtt_ms": r.rtt_ms,
            })).collect::<Vec<_>>(),
            "paths": self.paths.iter().map(|(a, b, x, y)| json!({
                "a": a, "b": b,
                "direct": *x == Some(PathKind::Direct) && *y == Some(PathKind::Direct),
            })).collect::<Vec<_>>(),
            "iperf": {"overlay_gbps": self.overlay_gbps, "underlay_gbps": self.underlay_gbps},
            "rules": {"blocked": self.blocked, "restored": self.restored},
        })
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}
