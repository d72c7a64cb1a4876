//! How flatwire traffic spreads over an agent's data-plane threads.
//!
//! Pods are attached on hosts `a` and `b` (through the agents' gRPC `Attach`, as the CNI
//! plugin does) until each host has a pod on its first two data-plane threads; the thread of
//! a pod follows from its address ([`shard_of`]). Then `iperf3` runs four TCP streams between
//! one pod pair (one thread per agent carries them all), and two pairs on different threads
//! at once with two streams each, reading each data-plane thread's CPU time around both runs.
//! The pods are detached again at the end (gRPC `Detach`), so the parts after this one find
//! the agents as before.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flatwire_agent::shard::shard_of;
use flatwire_tests::planet::{Member, Network, Planet, Tcp};
use flatwire_vl1::Address;

use super::measure;

/// Most pods attached per host while looking for one on each thread.
const MAX_PODS: usize = 8;
/// The `iperf3` port in the pods' namespaces.
const PORT: u16 = 5201;

/// CPU seconds per data-plane thread, by thread name.
pub type ThreadCpu = Vec<(String, f64)>;

/// The data-plane threads' CPU seconds during one run.
#[derive(Debug, Clone)]
pub struct RunCpu {
    /// Of the sender's agent.
    pub sender: ThreadCpu,
    /// Of the receiver's agent.
    pub receiver: ThreadCpu,
}

/// The figures of the spread runs.
#[derive(Debug, Clone)]
pub struct Spread {
    /// Data-plane threads of each agent.
    pub threads: usize,
    /// Four streams between one pod pair.
    pub one_pair: Tcp,
    /// Two streams each between two pod pairs on different threads, summed.
    pub two_pairs: Tcp,
    /// The data-plane threads' CPU during each run: one pair, two pairs.
    pub cpu: [RunCpu; 2],
}

/// The data-plane threads agent `name` runs, from its per-thread metric.
fn thread_count(planet: &Planet, name: &str) -> Result<usize> {
    let text = planet.agent(name).metrics()?;
    let n = text
        .lines()
        .filter(|l| l.starts_with("flatwire_dataplane_identities{"))
        .count();
    if n == 0 {
        bail!("agent {name} publishes no flatwire_dataplane_identities");
    }
    Ok(n)
}

/// Attaches pods on `host` until there is one on thread 0 and one on thread 1; `attached`
/// gets every pod attached.
fn pods_on_two_threads(
    planet: &mut Planet,
    net: &Network,
    host: &str,
    threads: usize,
    attached: &mut Vec<Member>,
) -> Result<[Member; 2]> {
    let host_address: Address = planet.agent(host).address().parse()?;
    let mut found: [Option<Member>; 2] = [None, None];
    for i in 0..MAX_PODS {
        let name = format!("t{i}");
        let pod = planet
            .attach_pod(host, net, &name)
            .with_context(|| format!("attaching pod {name} on {host}"))?;
        attached.push(pod.clone());
        let address: Address = pod.address.parse()?;
        let thread = shard_of(address, host_address, threads);
        println!(
            "    pod {} on {host}: address {address}, thread {thread}",
            pod.name
        );
        if let Some(slot) = found.get_mut(thread).filter(|s| s.is_none()) {
            *slot = Some(pod);
        }
        if let [Some(p0), Some(p1)] = &found {
            return Ok([p0.clone(), p1.clone()]);
        }
    }
    bail!("{MAX_PODS} pods on {host} did not cover two data-plane threads")
}

/// CPU seconds per data-plane thread of `pids` (sender, receiver) between `before` and now.
fn cpu_since(pids: [u32; 2], before: &[ThreadCpu; 2]) -> Result<RunCpu> {
    let delta = |pid: u32, before: &[(String, f64)]| -> Result<ThreadCpu> {
        Ok(measure::dataplane_threads(pid)?
            .into_iter()
            .map(|(name, s)| {
                let was = before.iter().find(|(n, _)| *n == name).map_or(0.0, |b| b.1);
                (name, s - was)
            })
            .collect())
    };
    Ok(RunCpu {
        sender: delta(pids[0], &before[0])?,
        receiver: delta(pids[1], &before[1])?,
    })
}

fn snapshot(pids: [u32; 2]) -> Result<[ThreadCpu; 2]> {
    Ok([
        measure::dataplane_threads(pids[0])?,
        measure::dataplane_threads(pids[1])?,
    ])
}

fn ipv4(m: &Member) -> Result<IpAddr> {
    Ok(IpAddr::V4(
        m.ipv4
            .with_context(|| format!("pod {} has no IPv4", m.name))?,
    ))
}

/// Runs the spread part between hosts `a` (sender) and `b` on network `net` (`pids`: their
/// agents), then detaches the pods it attached.
pub fn run(planet: &mut Planet, net: &Network, pids: [u32; 2], seconds: u32) -> Result<Spread> {
    let mut attached = Vec::new();
    let r = measure_spread(planet, net, pids, seconds, &mut attached);
    for pod in &attached {
        match planet.detach_pod(pod) {
            Ok(true) => {}
            Ok(false) => println!("    pod {} was no longer attached", pod.name),
            Err(e) => println!("    detaching pod {}: {e}", pod.name),
        }
    }
    r
}

fn measure_spread(
    planet: &mut Planet,
    net: &Network,
    pids: [u32; 2],
    seconds: u32,
    attached: &mut Vec<Member>,
) -> Result<Spread> {
    let threads = thread_count(planet, "a")?;
    if threads < 2 || threads != thread_count(planet, "b")? {
        bail!("the agents run {threads} data-plane thread(s): nothing to spread over");
    }
    let senders = pods_on_two_threads(planet, net, "a", threads, attached)?;
    let receivers = pods_on_two_threads(planet, net, "b", threads, attached)?;
    for (s, r) in senders.iter().zip(&receivers) {
        planet.wait_ping(s, ipv4(r)?, Duration::from_secs(10))?;
    }
    let planet = &*planet;
    let iperf = |pair: usize, streams: u32| -> Result<Tcp> {
        let (s, r) = (&senders[pair], &receivers[pair]);
        measure::iperf(planet, &r.ns, &s.ns, ipv4(r)?, streams, seconds, PORT)
    };
    let before = snapshot(pids)?;
    let one_pair = iperf(0, 4)?;
    let cpu_one = cpu_since(pids, &before)?;
    println!("    1 pair, 4 streams: {:.2} Gbit/s", one_pair.gbps);
    let before = snapshot(pids)?;
    let (r0, r1) = std::thread::scope(|s| {
        let t = s.spawn(|| iperf(1, 2));
        let r0 = iperf(0, 2);
        (r0, t.join())
    });
    let cpu_two = cpu_since(pids, &before)?;
    let (r0, r1) = (
        r0?,
        r1.map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??,
    );
    let two_pairs = Tcp {
        gbps: r0.gbps + r1.gbps,
        bytes: r0.bytes + r1.bytes,
        retransmits: r0.retransmits + r1.retransmits,
    };
    println!(
        "    2 pairs on 2 threads, 2 + 2 streams: {:.2} + {:.2} = {:.2} Gbit/s",
        r0.gbps, r1.gbps, two_pairs.gbps
    );
    for (what, c) in [("1 pair", &cpu_one), ("2 pairs", &cpu_two)] {
        println!(
            "    data-plane CPU, {what}: sender {}; receiver {}",
            describe(&c.sender),
            describe(&c.receiver)
        );
    }
    Ok(Spread {
        threads,
        one_pair,
        two_pairs,
        cpu: [cpu_one, cpu_two],
    })
}

/// `flatwire-dp 3.1 s, flatwire-dp1 0.0 s`.
fn describe(cpu: &[(String, f64)]) -> String {
    cpu.iter()
        .map(|(n, s)| format!("{n} {s:.1} s"))
        .collect::<Vec<_>>()
        .join(", ")
}
