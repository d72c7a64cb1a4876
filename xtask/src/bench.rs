//! `cargo xtask bench`: throughput, round trips, CPU and memory of flatwire against the raw
//! underlay and kernel VXLAN, measured in one run between the same two namespaces; then pod
//! start and stop latency through the real CNI plugin and the agent memory per pod.
//!
//! A planet of real agents (a root, a controller and hosts `a` and `b`, release build) runs
//! in network namespaces on one bridged underlay. Between `a` and `b` the bench measures, over
//! (1) the underlay veths, (2) a kernel VXLAN on them and (3) the flatwire network the hosts
//! join: `iperf3` TCP with one and four streams, and `ping` round trips (p50, p99). Around the
//! flatwire runs it reads the agents' CPU time (`/proc/<pid>/stat`, also of the data-plane
//! threads), their drop counters and the kernel's UDP and TAP drop counters; after them, their
//! resident memory. Pod pairs on different data-plane threads show how traffic spreads over
//! them (see [`spread`]). Then host `b` starts and stops pods through `flatwire-cni` (see [`pods`];
//! `--only-pods` skips the link runs). Last, a Kubernetes control plane with the operator
//! measures reconcile throughput, operator memory and rules latency (see [`operator`];
//! `--only-operator` runs only that part; `--only-link` skips it and the pods). Missed targets
//! are printed as MISSED; only a failure to measure makes the command fail.

mod measure;
mod operator;
mod pods;
mod report;
mod spread;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{
    self, Member, Network, NetworkSpec, PathKind, Planet, PlanetSpec, Profile,
};

use measure::{Counters, Cpu};
use report::{CpuPerGb, FLATWIRE, Figures, LINKS, Losses, UNDERLAY, VXLAN};
use serde_json::{Value, json};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of each `iperf3` run (six runs in all).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=60))]
    seconds: u32,
    /// Echo requests of each `ping` run (10 ms apart).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=5000))]
    pings: u32,
    /// Pods per batch started on host `b` through `flatwire-cni` ADD and stopped with DEL:
    /// one batch one after the other, one all at once (0: skip).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(0..=100))]
    pods: u16,
    /// The identity pool depth (`--identity-pool`) host `b` runs with for the pod batches;
    /// each batch starts once the pool is full.
    #[arg(long, value_name = "N", default_value_t = 128)]
    identity_pool: usize,
    /// Seconds to wait for the identity pool to fill before each pod batch.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pool_wait: u64,
    /// Quick mode: only the pod batches (skips the underlay, VXLAN and flatwire link runs and
    /// the operator part).
    #[arg(long, conflicts_with = "only_operator")]
    only_pods: bool,
    /// Quick mode: only the operator part (control plane, operator, Pods, NetworkMembers,
    /// Network rule edits).
    #[arg(long)]
    only_operator: bool,
    /// Quick mode: only the link runs (underlay, VXLAN, flatwire) and the pod pairs on
    /// data-plane threads (skips the pod batches and the operator part).
    #[arg(long, conflicts_with_all = ["only_pods", "only_operator"])]
    only_link: bool,
    /// Pods the operator reconciles (spread over two nodes; the bench Network's pool holds
    /// about 4,000 addresses).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=3000))]
    operator_pods: u32,
    /// NetworkMembers the operator reconciles.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    operator_members: u32,
    /// Edits of a Network's rules timed until every agent holds them.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    operator_edits: u32,
    /// Also write the figures, targets and failures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// The `iperf3` port (in the hosts' own namespaces).
const IPERF_PORT: u16 = 5201;
/// The VXLAN device made in both hosts.
const VXLAN_DEV: &str = "vxbench";
/// The VXLAN's addresses (test range; the flatwire network uses 198.19.0.0/24).
const VXLAN_ADDRS: [&str; 2] = ["198.19.250.1/24", "198.19.250.2/24"];
/// VXLAN's usual MTU over a 1500-byte underlay (50 bytes of encapsulation).
const VXLAN_MTU: &str = "1450";

/// Runs the bench and prints the figures and targets; see the module docs.
pub fn run(args: &Args) -> Result<()> {
    planet::check_root()?;
    for tool in ["ip", "iperf3", "ping", "curl"] {
        flatwire_tests::tools::bin(tool)?;
    }
    println!("==> build flatwire-agent (release)");
    let agent = planet::agent_binary(Profile::Release)?;
    if args.only_operator {
        let result = run_operator(args, &agent);
        return finish_operator(
            &result,
            args.json.as_deref(),
            Value::Object(Default::default()),
        );
    }
    let plugin = if args.pods > 0 && !args.only_link {
        println!("==> build flatwire-cni (release)");
        let build = ["-p", "flatwire-cni", "--bin", "flatwire-cni", "--release"];
        Some(
            flatwire_tests::process::cargo_build(&build, "flatwire-cni")
                .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    println!(
        "==> start a planet: root0, ctl0, hosts a and b ({})",
        agent.display()
    );
    let mut planet = Planet::start(
        &PlanetSpec::new(agent.clone())
            .host("a", None)
            .host("b", None),
    )?;
    let mut fig = Figures {
        only_pods: args.only_pods,
        ..Figures::default()
    };
    let (a, b) = (
        planet.agent("a").host().clone(),
        planet.agent("b").host().clone(),
    );
    let (a_ip, b_ip) = (planet.agent("a").underlay(), planet.agent("b").underlay());
    let all_pids = planet
        .agents()
        .iter()
        .map(|a| measure::agent_pid(a.host()))
        .collect::<Result<Vec<u32>>>()?;
    settle(&all_pids);
    let hosts = Pair {
        client: &a,
        server: &b,
    };

    if !args.only_pods {
        println!("==> underlay: {a_ip} -> {b_ip} (veth, bridge, veth)");
        measure_link(&planet, &mut fig, UNDERLAY, hosts, b_ip.into(), args, None);

        wakeup_echoes(&mut fig, args.pings);

        println!("==> kernel VXLAN (no encryption, MTU {VXLAN_MTU}) over the same veths");
        match vxlan(&mut planet, hosts, [a_ip.into(), b_ip.into()]) {
            Ok(to) => measure_link(&planet, &mut fig, VXLAN, hosts, to, args, None),
            Err(e) => fig.failures.push(format!("vxlan setup: {e:#}")),
        }
    }

    println!("==> flatwire: network on ctl0, a and b join it");
    settle(&all_pids);
    let overlay = match join(&mut planet) {
        Ok(o) => Some(o),
        Err(e) => {
            fig.failures.push(format!("flatwire: {e:#}"));
            None
        }
    };
    if let (false, Some(o)) = (args.only_pods, &overlay) {
        if let Err(e) = flatwire(&mut planet, &mut fig, hosts, args, o) {
            fig.failures.push(format!("flatwire: {e:#}"));
        }
        println!(
            "==> data-plane threads: pod pairs on a and b, one pair, then two on different threads"
        );
        let pids = [measure::agent_pid(&a)?, measure::agent_pid(&b)?];
        fig.spread = spread::run(&mut planet, &o.net, pids, args.seconds).map_err(|e| {
            let why = format!("{e:#}");
            fig.failures.push(format!("data-plane threads: {why}"));
            why
        });
    }

    fig.pods = match (plugin, overlay) {
        (None, _) if args.only_link => Err("skipped (--only-link)".into()),
        (None, _) => Err("skipped (--pods 0)".into()),
        (_, None) => Err("no flatwire network to attach to".into()),
        (Some(plugin), Some(o)) => {
            let opt = pods::Options {
                pods: usize::from(args.pods),
                pool: args.identity_pool,
                pool_wait: Duration::from_secs(args.pool_wait),
            };
            println!(
                "==> {} pods on b through flatwire-cni: one after the other, then all at once",
                opt.pods
            );
            let gateway = o.to;
            pods::run(&mut planet, &agent, plugin, "b", &o.net, gateway, opt).map_err(|e| {
                let why = format!("{e:#}");
                fig.failures.push(format!("pods: {why}"));
                why
            })
        }
    };
    println!("==> stop the planet");
    drop(planet);
    // `--only-pods` and `--only-link` skip the operator part.
    let op = (!args.only_pods && !args.only_link).then(|| run_operator(args, &agent));

    println!();
    if !args.only_pods {
        fig.figures_table().print();
        println!();
    }
    fig.pods_table().print();
    if let Ok(p) = &fig.pods {
        for (kind, b) in [("sequential", &p.sequential), ("concurrent", &p.concurrent)] {
            for f in &b.failures.first {
                println!("{kind} pod failure: {f}");
            }
        }
    }
    println!();
    fig.targets_table().print();
    let missed: Vec<&str> = fig
        .outcomes()
        .iter()
        .filter(|o| o.met == Some(false))
        .map(|o| o.name)
        .collect();
    if !missed.is_empty() {
        println!("MISSED: {}", missed.join("; "));
    }
    println!();
    let op_failed = op
        .as_ref()
        .is_some_and(|op| finish_operator(op, None, Value::Null).is_err());
    if let Some(path) = &args.json {
        let mut json = fig.to_json();
        if let Some(op) = &op {
            json["operator"] = op
                .as_ref()
                .map_or(Value::Null, operator::OperatorFigures::to_json);
            json["operator_missing"] = op.as_ref().err().map_or(Value::Null, |e| json!(e));
        }
        write_json(path, &json)?;
    }
    if !fig.failures.is_empty() || op_failed {
        for f in &fig.failures {
            eprintln!("not measured: {f}");
        }
        bail!(
            "{} measurements failed",
            fig.failures.len() + usize::from(op_failed)
        );
    }
    Ok(())
}

/// Builds the operator (release) and runs the operator part with `agent`; `Err` says why
/// it is missing.
fn run_operator(args: &Args, agent: &Path) -> Result<operator::OperatorFigures, String> {
    println!("==> build flatwire-operator (release)");
    let build = [
        "-p",
        "flatwire-operator",
        "--bin",
        "flatwire-operator",
        "--release",
    ];
    let bin = flatwire_tests::process::cargo_build(&build, "flatwire-operator")?;
    let opt = operator::Options {
        pods: args.operator_pods as usize,
        members: args.operator_members as usize,
        edits: args.operator_edits as usize,
    };
    operator::run(agent, &bin, opt).map_err(|e| format!("{e:#}"))
}

/// Prints the operator table (or why it is missing); with `json`, writes `base` with the
/// operator figures added. Fails when the part was not measured.
fn finish_operator(
    op: &Result<operator::OperatorFigures, String>,
    json: Option<&Path>,
    mut base: Value,
) -> Result<()> {
    match op {
        Ok(f) => f.table().print(),
        Err(why) => eprintln!("not measured: operator: {why}"),
    }
    if let Some(path) = json {
        base["operator"] = op
            .as_ref()
            .map_or(Value::Null, operator::OperatorFigures::to_json);
        base["operator_missing"] = op.as_ref().err().map_or(Value::Null, |e| json!(e));
        write_json(path, &base)?;
    }
    match op {
        Ok(_) => Ok(()),
        Err(_) => bail!("the operator part was not measured"),
    }
}

/// Writes `json` pretty-printed to `path`.
fn write_json(path: &Path, json: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(json)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Measures the wake-up echo ([`measure::wakeup_echo`]) with both threads on one CPU and,
/// where the bench may use two, on two.
fn wakeup_echoes(fig: &mut Figures, pings: u32) {
    println!("==> two sleeping threads waking each other (UDP echo on loopback)");
    let cpus = measure::allowed_cpus();
    let Some(&c0) = cpus.first() else {
        fig.failures
            .push("wake-up echo: no CPU in this process's affinity mask".into());
        return;
    };
    let pairs = [Some([c0, c0]), cpus.get(1).map(|&c1| [c0, c1])];
    for (i, (cpus, name)) in pairs
        .into_iter()
        .zip(["on one CPU", "on two CPUs"])
        .enumerate()
    {
        let Some(cpus) = cpus else {
            println!("    wake-up echo {name}: not measured, the bench may use one CPU only");
            continue;
        };
        match measure::wakeup_echo(pings, cpus) {
            Ok(r) => {
                println!(
                    "    wake-up echo {name}: p50 {:.0} us, p99 {:.0} us",
                    r.p50_us, r.p99_us
                );
                fig.wakeup_echo[i] = Some(r);
            }
            Err(e) => fig.failures.push(format!("wake-up echo {name}: {e:#}")),
        }
    }
}

/// The two hosts: `iperf3`'s client (the sender) and server (the receiver).
#[derive(Debug, Clone, Copy)]
struct Pair<'a> {
    client: &'a Host,
    server: &'a Host,
}

/// CPU time the agents used and bytes they moved over the flatwire TCP runs.
#[derive(Debug, Default)]
struct CpuTally {
    sender: Cpu,
    receiver: Cpu,
    bytes: u64,
}

impl CpuTally {
    fn per_gb(c: Cpu, bytes: u64) -> Option<CpuPerGb> {
        let gb = bytes as f64 / 1e9;
        (gb > 0.0).then(|| CpuPerGb {
            process: c.process / gb,
            dataplane: c.dataplane / gb,
        })
    }
}

/// One and four TCP streams, then ping, from `hosts.client` to `to`; with `agents`
/// (sender and receiver agent PIDs) also their CPU time around each TCP run.
fn measure_link(
    planet: &Planet,
    fig: &mut Figures,
    link: usize,
    hosts: Pair<'_>,
    to: IpAddr,
    args: &Args,
    mut agents: Option<([u32; 2], &mut CpuTally)>,
) {
    let name = LINKS[link];
    fig.links[link].load = measure::load_average();
    if let Some(l) = fig.links[link].load {
        println!("    machine load average: {l:.1}");
    }
    for streams in [1, 4] {
        let before = agents
            .as_ref()
            .map(|(p, _)| (measure::cpu(p[0]), measure::cpu(p[1])));
        let r = measure::iperf(
            planet,
            hosts.server,
            hosts.client,
            to,
            streams,
            args.seconds,
            IPERF_PORT,
        );
        let after = agents
            .as_ref()
            .map(|(p, _)| (measure::cpu(p[0]), measure::cpu(p[1])));
        match r {
            Ok(t) => {
                println!(
                    "    {name} TCP x{streams}: {:.2} Gbit/s, {} retransmits",
                    t.gbps, t.retransmits
                );
                if let (Some((_, tally)), Some((Ok(s0), Ok(r0))), Some((Ok(s1), Ok(r1)))) =
                    (agents.as_mut(), before, after)
                {
                    let (s, r) = (s1 - s0, r1 - r0);
                    println!(
                        "    agent CPU: sender {:.2} s (dp {:.2} s), receiver {:.2} s (dp {:.2} s)",
                        s.process, s.dataplane, r.process, r.dataplane
                    );
                    tally.sender = tally.sender + s;
                    tally.receiver = tally.receiver + r;
                    tally.bytes += t.bytes;
                }
                if streams == 1 {
                    fig.links[link].tcp1 = Some(t);
                } else {
                    fig.links[link].tcp4 = Some(t);
                }
            }
            Err(e) => fig.failures.push(format!("{name} TCP x{streams}: {e:#}")),
        }
    }
    match measure::ping(hosts.client, to, args.pings) {
        Ok(r) => {
            println!(
                "    {name} RTT: p50 {:.0} us, p99 {:.0} us ({} of {} replies)",
                r.p50_us, r.p99_us, r.samples, r.sent
            );
            fig.links[link].rtt = Some(r);
        }
        Err(e) => fig.failures.push(format!("{name} ping: {e:#}")),
    }
}

/// Makes a VXLAN between the hosts (`underlay`: their addresses); returns the server's
/// VXLAN address.
fn vxlan(planet: &mut Planet, hosts: Pair<'_>, underlay: [IpAddr; 2]) -> Result<IpAddr> {
    let ends = [(hosts.client, 0, 1), (hosts.server, 1, 0)];
    for (host, local, remote) in ends {
        let (local, remote) = (underlay[local].to_string(), underlay[remote].to_string());
        host.run(
            "ip",
            &[
                "link", "add", VXLAN_DEV, "mtu", VXLAN_MTU, "type", "vxlan", "id", "4242", "local",
                &local, "remote", &remote, "dstport", "4789",
            ],
        )?;
        host.run("ip", &["link", "set", VXLAN_DEV, "up"])?;
    }
    for ((host, _, _), addr) in ends.iter().zip(VXLAN_ADDRS) {
        planet.topology().address(host, VXLAN_DEV, addr)?;
    }
    let to = VXLAN_ADDRS[1].split('/').next().unwrap_or_default();
    Ok(to.parse()?)
}

/// The flatwire network both hosts joined.
struct Overlay {
    net: Network,
    /// Host `a`'s member.
    ma: Member,
    /// Host `b`'s member.
    mb: Member,
    /// `b`'s overlay address.
    to: IpAddr,
}

/// Creates the network, joins both hosts and waits until `a` pings `b` over it.
fn join(planet: &mut Planet) -> Result<Overlay> {
    let net = planet.create_network(&NetworkSpec::new("bench"))?;
    let ma = planet.join("a", &net, &[])?;
    let mb = planet.join("b", &net, &[])?;
    let to = IpAddr::V4(mb.ipv4.context("b got no IPv4 address")?);
    // Peers learn each other from the first frames.
    planet.wait_ping(&ma, to, Duration::from_secs(10))?;
    Ok(Overlay { net, ma, mb, to })
}

/// Waits for a direct path between the hosts, then measures the network and collects the
/// agents' CPU, drops and memory.
fn flatwire(
    planet: &mut Planet,
    fig: &mut Figures,
    hosts: Pair<'_>,
    args: &Args,
    o: &Overlay,
) -> Result<()> {
    let (ma, mb, to) = (&o.ma, &o.mb, o.to);
    let b_address = planet.agent("b").address().to_owned();
    planet.wait_path("a", &b_address, PathKind::Direct, Duration::from_secs(15))?;
    let link = ma.ns.run("ip", &["-j", "link", "show", "dev", &ma.dev])?;
    let link: serde_json::Value = serde_json::from_slice(&link.stdout)?;
    fig.flatwire_mtu = link[0]["mtu"].as_u64().and_then(|m| u32::try_from(m).ok());
    println!(
        "    {} {} -> {} {} over {} (MTU {}), direct path",
        ma.name,
        ma.ipv4.map_or("-".into(), |a| a.to_string()),
        mb.name,
        to,
        ma.dev,
        fig.flatwire_mtu.map_or("?".into(), |m| m.to_string())
    );

    let pids = [
        measure::agent_pid(hosts.client)?,
        measure::agent_pid(hosts.server)?,
    ];
    let metrics = |name: &str| -> Result<_> { Ok(measure::drops(&planet.agent(name).metrics()?)) };
    let drops_before = [metrics("a")?, metrics("b")?];
    let counters_before = [
        Counters::read(hosts.client, &ma.dev)?,
        Counters::read(hosts.server, &mb.dev)?,
    ];
    let mut tally = CpuTally::default();
    measure_link(
        planet,
        fig,
        FLATWIRE,
        hosts,
        to,
        args,
        Some((pids, &mut tally)),
    );
    fig.sender_cpu = CpuTally::per_gb(tally.sender, tally.bytes);
    fig.receiver_cpu = CpuTally::per_gb(tally.receiver, tally.bytes);
    // The agents publish their drop counters once a second.
    std::thread::sleep(Duration::from_millis(1100));
    let drops_after = [metrics("a")?, metrics("b")?];
    let losses = Losses {
        agent_drops: ["sender", "receiver"]
            .iter()
            .zip(drops_before.iter().zip(&drops_after))
            .map(|(who, (b, a))| ((*who).to_owned(), measure::drops_since(b, a)))
            .collect(),
        sender: Counters::read(hosts.client, &ma.dev)?.since(&counters_before[0]),
        receiver: Counters::read(hosts.server, &mb.dev)?.since(&counters_before[1]),
    };
    println!(
        "    losses: agent drops {:?}; sender {:?}; receiver {:?}",
        losses.agent_drops, losses.sender, losses.receiver
    );
    fig.losses = Some(losses);
    for (name, pid) in ["a", "b"].iter().zip(pids) {
        let rss = measure::rss(pid)?;
        println!(
            "    agent {name} RSS: {:.1} MiB",
            rss as f64 / (1024.0 * 1024.0)
        );
        fig.rss_one.push(((*name).to_owned(), rss));
    }
    Ok(())
}

/// Waits for the agents to go idle (they fill identity pools after start), printing how it
/// went; measuring while they are busy would skew every figure, so it says so when they stay
/// busy.
fn settle(pids: &[u32]) {
    println!("    waiting for the agents to go idle (identity pools filled)");
    match measure::settle(pids, Duration::from_secs(300)) {
        Ok(t) => println!("    agents idle after {:.0} s", t.as_secs_f64()),
        Err(busy) => {
            println!("    agents still use {busy:.0}% of a core after 300 s; measuring anyway")
        }
    }
}
