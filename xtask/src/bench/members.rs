//! Agent memory with many attached members: pods (network namespaces of the harness)
//! attached to the flatwire network through the agent's real gRPC `Attach`.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flatwire_api::v1;
use flatwire_api::{AgentClient, ClientOptions};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{self, Planet};
use tonic::transport::Channel;

/// Resident memory of the agent after its first and after its last attached member, and how
/// long each gRPC `Attach` took (to the answer: TAP in the pod, config, addresses set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemberRss {
    /// With one attached member, bytes.
    pub one: u64,
    /// With every member attached, bytes.
    pub all: u64,
    /// How many members were attached.
    pub members: usize,
    /// Attach latency p50, ms.
    pub attach_p50_ms: f64,
    /// Attach latency p99, ms.
    pub attach_p99_ms: f64,
}

impl MemberRss {
    /// Memory per attached member beyond the first, bytes.
    pub fn per_member(&self) -> u64 {
        self.all.saturating_sub(self.one) / (self.members.max(2) as u64 - 1)
    }
}

/// A gRPC client of one agent, on a runtime of its own.
struct Client {
    rt: tokio::runtime::Runtime,
    client: AgentClient<Channel>,
}

impl Client {
    /// Connects to the agent at `socket` and waits (at most 30 s) until it says it can attach.
    fn ready(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = rt.block_on(async {
                let (mut c, _) = flatwire_api::connect_checked(socket, ClientOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let s = c
                    .status(v1::StatusRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if s.ready {
                    Ok(c)
                } else {
                    Err(format!("not ready: {}", s.not_ready_reasons.join("; ")))
                }
            });
            match got {
                Ok(client) => return Ok(Self { rt, client }),
                Err(why) if Instant::now() >= deadline => {
                    bail!("the agent at {} cannot attach: {why}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn attach(&mut self, pod: &Host, nwid: &str) -> Result<v1::AttachResult> {
        let req = v1::AttachRequest {
            key: Some(v1::AttachmentKey {
                network_name: "bench".into(),
                container_id: pod.name().into(),
                ifname: "eth0".into(),
            }),
            netns_path: pod.netns_path(),
            network_id: nwid.into(),
            mode: v1::Mode::Secondary as i32,
            pod: Some(v1::PodRef {
                namespace: "bench".into(),
                name: pod.name().into(),
                uid: format!("uid-{}", pod.name()),
            }),
        };
        let r = self.rt.block_on(self.client.attach(req)).map_err(|s| {
            anyhow::anyhow!("Attach {}: {:?}: {}", pod.name(), s.code(), s.message())
        })?;
        r.into_inner()
            .result
            .with_context(|| format!("Attach {} answered no result", pod.name()))
    }
}

/// Attaches `count` pods to network `nwid` on the agent `agent` (its process `pid`), checks
/// that the first and the last reach `gateway` (the agent's own member) over the overlay,
/// and reads the agent's RSS after the first and after the last.
pub fn attach_many(
    planet: &mut Planet,
    agent: &str,
    pid: u32,
    nwid: &str,
    gateway: IpAddr,
    count: usize,
) -> Result<MemberRss> {
    let mut client = Client::ready(&planet.agent(agent).socket())?;
    let started = Instant::now();
    let mut one = 0;
    let mut pods = Vec::with_capacity(count);
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let pod = planet.topology().host(&format!("pod{i}"))?;
        let t = Instant::now();
        client.attach(&pod, nwid)?;
        took.push(t.elapsed().as_secs_f64() * 1e3);
        if i == 0 {
            one = super::measure::rss(pid)?;
        }
        if (i + 1) % 10 == 0 || i + 1 == count {
            println!(
                "    attached {} of {count} members ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
        pods.push(pod);
    }
    for pod in [pods.first(), pods.last()].into_iter().flatten() {
        let r = planet::ping_in(pod, gateway, 3);
        if !r.ok {
            bail!(
                "attached member {} does not reach {gateway}: {}",
                pod.name(),
                r.output
            );
        }
    }
    // Let the members' first config exchanges and the TAP queues settle.
    std::thread::sleep(Duration::from_secs(2));
    took.sort_by(f64::total_cmp);
    Ok(MemberRss {
        one,
        all: super::measure::rss(pid)?,
        members: count,
        attach_p50_ms: super::measure::percentile(&took, 50.0),
        attach_p99_ms: super::measure::percentile(&took, 99.0),
    })
}
