//! A planet of real `flatwire-agent` processes in network namespaces: roots (listed in a planet
//! file of our own, never ZeroTier's), network controllers and host agents, each host optionally
//! behind a NAT router of its own (MASQUERADE or symmetric `--random-fully`).
//!
//! Everything is driven through the agents' real interfaces: the ZeroTier-shaped HTTP API on
//! each namespace's loopback (controller networks and members, joins, `/peer`), Prometheus
//! metrics, and `ping`/`iperf3` over the overlay. The layout (underlay `198.18.0.0/15`, overlay
//! pools from `198.19.0.0/16` and `fd00::/8` only):
//!
//! ```text
//!   switch "wan" 198.18.0.0/24: root0 .1, root1 .2, ctl0 .5, ctl1 .6, public host n .(10+n),
//!                               access router of NATed host n .(100+n)
//!   access router n .129 --- 198.18.(128+n).128/25 --- .130 edge router n
//!   edge router n .1 --- 198.18.(128+n).0/25 --- .2 NAT router n (its public address)
//!   NAT router n .1 --- 198.18.(n+1).0/24 --- .2 host n
//! ```
//!
//! Two routers (access and edge) stand between every NAT and the wan, so a datagram sent with
//! TTL 2 (NAT traversal's port-opening datagram) dies before it reaches a NAT it was not sent
//! through, whether it comes from behind another NAT or from a host on the wan, as on the
//! internet. With one router in between, a wan host's datagram would arrive (TTL 1) and leave
//! an unreplied conntrack entry that steals the NAT's preserved port.
//!
//! Dropping the [`Planet`] (also while panicking) stops every agent and `iperf3` by PID, then
//! the [`Topology`] deletes the namespaces. Waits give up after their deadline with an error
//! that names what was awaited and carries the agent's last log lines; a cancel flag
//! ([`Planet::set_cancel`]) ends waits early, e.g. on Ctrl-C.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_vl1::{Identity, Root, World, WorldType};
use serde_json::{Value, json};

use crate::HarnessError;
use crate::netns::{Host, Nat, Topology, run_checked};
use crate::process::Proc;

/// The UDP port of every agent (and the TCP port of its HTTP API, on loopback).
pub const AGENT_PORT: u16 = 9993;
/// The loopback TCP port of every agent's metrics.
pub const METRICS_PORT: u16 = 9994;
/// How long an agent may take to come online (identity generation, HELLO to a root).
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a member may take to get its addresses after joining.
const JOIN_LIMIT: Duration = Duration::from_secs(20);
/// Poll interval of every wait.
const POLL: Duration = Duration::from_millis(100);

/// Why a planet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanetError {
    /// The namespace harness failed.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// Something did not happen in time.
    #[error("timed out after {waited:?} waiting for {what}{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// The last observation and log lines, if any.
        detail: String,
    },
    /// An agent process ended.
    #[error("agent {agent} exited ({status}); last log lines:\n{log}")]
    AgentExited {
        /// The agent's name.
        agent: String,
        /// Its exit status.
        status: String,
        /// The tail of its log.
        log: String,
    },
    /// An HTTP API call got an unexpected answer.
    #[error("{agent}: {method} {path} answered {status}: {body}")]
    Api {
        /// The agent asked.
        agent: String,
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The HTTP status (0: no answer).
        status: u16,
        /// The body.
        body: String,
    },
    /// The agent binary could not be built or found.
    #[error("cannot build flatwire-agent: {0}")]
    Build(String),
    /// A request made no sense (unknown name, bad rules source, ...).
    #[error("{0}")]
    Invalid(String),
    /// The agent refused a gRPC call (`Attach`: `UNAVAILABLE` while the agent cannot attach
    /// members) or could not be reached.
    #[error("{agent} refused {call}: {status}")]
    Agent {
        /// The agent asked.
        agent: String,
        /// The call (`Attach`, `Detach`).
        call: &'static str,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// The cancel flag was raised.
    #[error("interrupted")]
    Interrupted,
}

/// Fails unless we run as root (namespaces, TAP devices and iptables need it).
pub fn check_root() -> Result<(), PlanetError> {
    if nix::unistd::Uid::effective().is_root() {
        Ok(())
    } else {
        Err(PlanetError::Invalid(
            "a planet needs root: network namespaces, TAP devices and iptables (run with sudo)"
                .into(),
        ))
    }
}

/// Which agent profile to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `cargo build` (the tests).
    Debug,
    /// `cargo build --release` (the demo's throughput figures).
    Release,
}

/// Builds `flatwire-agent` with cargo (a no-op when it is up to date) and returns its path;
/// `FLATWIRE_AGENT_BIN` overrides. Cargo's progress goes to stderr.
pub fn agent_binary(profile: Profile) -> Result<PathBuf, PlanetError> {
    if let Some(p) = std::env::var_os("FLATWIRE_AGENT_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(PlanetError::Build(format!(
                "FLATWIRE_AGENT_BIN={} is not a file",
                p.display()
            )))
        };
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static BUILT_RELEASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = match profile {
        Profile::Debug => &BUILT,
        Profile::Release => &BUILT_RELEASE,
    };
    cell.get_or_init(|| build_agent(profile))
        .clone()
        .map_err(PlanetError::Build)
}

fn build_agent(profile: Profile) -> Result<PathBuf, String> {
    let mut args = vec!["-p", "flatwire-agent", "--bin", "flatwire-agent"];
    if profile == Profile::Release {
        args.push("--release");
    }
    crate::process::cargo_build(&args, "flatwire-agent")
}

/// What an agent does in the planet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A root of the planet (`--root`).
    Root,
    /// A network controller (`--controller`).
    Controller,
    /// A host that joins networks.
    Host,
}

/// One running (or stopped) `flatwire-agent` and its namespace.
#[derive(Debug)]
pub struct Agent {
    name: String,
    role: Role,
    host: Host,
    home: PathBuf,
    underlay: Ipv4Addr,
    underlay_if: String,
    args: Vec<String>,
    address: String,
    token: String,
    proc: Option<Proc>,
}

impl Agent {
    /// The name given in the spec (`root0`, `ctl0`, or the host's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The namespace it runs in.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Its state directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Its ZeroTier address (10 hex digits).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its own underlay address (behind a NAT: the private one).
    pub fn underlay(&self) -> Ipv4Addr {
        self.underlay
    }

    /// Whether its process runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_status().is_none())
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.home.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn start(&mut self, binary: &Path) -> Result<(), PlanetError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.home.join("agent.log"))
            .map_err(|e| HarnessError::Io(format!("log of {}", self.name), e))?;
        let mut cmd = self.host.command(binary);
        cmd.arg("--home")
            .arg(&self.home)
            .arg("--socket")
            .arg(self.socket())
            .args(["--port", &AGENT_PORT.to_string()])
            .args(["--metrics-listen", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.proc = Some(Proc::spawn(&format!("agent {}", self.name), &mut cmd)?);
        Ok(())
    }

    /// The gRPC API socket.
    pub fn socket(&self) -> PathBuf {
        self.home.join("agent.sock")
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    fn check_alive(&mut self) -> Result<(), PlanetError> {
        match self.proc.as_mut().map(Proc::try_status) {
            Some(None) => Ok(()),
            Some(Some(status)) => Err(PlanetError::AgentExited {
                agent: self.name.clone(),
                status: status.to_string(),
                log: self.log_tail(20),
            }),
            None => Err(PlanetError::AgentExited {
                agent: self.name.clone(),
                status: "stopped".into(),
                log: self.log_tail(20),
            }),
        }
    }

    /// Calls its HTTP API: `(status, body)`; status 0 when nothing answered.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{AGENT_PORT}{path}");
        let auth = format!("X-ZT1-Auth: {}", self.token);
        let data = body.map(Value::to_string);
        let mut cmd = self.host.command("curl");
        cmd.args([
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "-H",
            &auth,
        ]);
        if let Some(d) = &data {
            cmd.args(["--data-binary", d]);
        }
        cmd.arg(&url);
        let Ok(out) = cmd.stdin(Stdio::null()).output() else {
            return (0, Value::Null);
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    /// Calls its HTTP API and wants a 200.
    pub fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, PlanetError> {
        match self.api(method, path, body) {
            (200, v) => Ok(v),
            (status, v) => Err(PlanetError::Api {
                agent: self.name.clone(),
                method: method.to_owned(),
                path: path.to_owned(),
                status,
                body: v.to_string(),
            }),
        }
    }

    /// Its metrics in the text exposition format, scraped inside its namespace.
    pub fn metrics(&self) -> Result<String, PlanetError> {
        let out = self.host.run(
            "curl",
            &[
                "-s",
                "-m",
                "5",
                &format!("http://127.0.0.1:{METRICS_PORT}/metrics"),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Packets received on its underlay interface (the kernel's counter): what reaches a root,
    /// relayed traffic included. (Packets, not bytes: VL1 compresses payloads.)
    pub fn underlay_rx_packets(&self) -> Result<u64, PlanetError> {
        let out = self.host.run(
            "ip",
            &["-j", "-s", "link", "show", "dev", &self.underlay_if],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| PlanetError::Invalid(format!("ip -j -s link: {e}")))?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .ok_or_else(|| PlanetError::Invalid(format!("no rx packet counter in {v}")))
    }

    /// How it reaches the peer `address` now: `None` when it does not know the peer.
    pub fn path_to(&self, address: &str) -> Option<PathKind> {
        match self.api("GET", &format!("/peer/{address}"), None) {
            (200, v) => Some(if v["paths"].as_array().is_some_and(|p| !p.is_empty()) {
                PathKind::Direct
            } else {
                PathKind::Relayed
            }),
            _ => None,
        }
    }
}

/// How a peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Over a confirmed direct path.
    Direct,
    /// Through a root.
    Relayed,
}

/// One host of a [`PlanetSpec`].
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Name (letters, digits, `-`).
    pub name: String,
    /// The NAT router in front of it, if any.
    pub nat: Option<Nat>,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct PlanetSpec {
    /// Number of roots (1 or 2).
    pub roots: usize,
    /// Number of controllers (1 or 2).
    pub controllers: usize,
    /// The hosts.
    pub hosts: Vec<HostSpec>,
    /// The agent binary.
    pub agent: PathBuf,
}

impl PlanetSpec {
    /// One root, one controller, no hosts yet, this agent binary.
    pub fn new(agent: PathBuf) -> Self {
        Self {
            roots: 1,
            controllers: 1,
            hosts: Vec::new(),
            agent,
        }
    }

    /// Adds a host, behind its own NAT router when `nat` is given.
    pub fn host(mut self, name: &str, nat: Option<Nat>) -> Self {
        self.hosts.push(HostSpec {
            name: name.to_owned(),
            nat,
        });
        self
    }

    /// Sets the number of roots.
    pub fn roots(mut self, n: usize) -> Self {
        self.roots = n;
        self
    }

    /// Sets the number of controllers.
    pub fn controllers(mut self, n: usize) -> Self {
        self.controllers = n;
        self
    }
}

/// IPv6 addressing of a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6Mode {
    /// None.
    Off,
    /// ZeroTier's RFC 4193 addresses (`fd` + network ID + member address, /88).
    Rfc4193,
    /// An assignment pool in `fd00:f1a7:<subnet>::/64`.
    Pool,
}

/// A network to create on a controller.
#[derive(Debug, Clone)]
pub struct NetworkSpec {
    /// Its name.
    pub name: String,
    /// Which controller (index) runs it.
    pub controller: usize,
    /// The low 24 bits of the network ID.
    pub number: u32,
    /// IPv4 pool `198.19.<subnet>.10 - .250` in `198.19.<subnet>.0/24`, and the IPv6 pool's
    /// subnet.
    pub subnet: u8,
    /// IPv6 addressing.
    pub v6: V6Mode,
}

impl NetworkSpec {
    /// An IPv4 network on controller 0 with number 1 and subnet 0.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            controller: 0,
            number: 1,
            subnet: 0,
            v6: V6Mode::Off,
        }
    }

    fn body(&self) -> Value {
        let s = self.subnet;
        let mut pools = vec![json!({
            "ipRangeStart": format!("198.19.{s}.10"), "ipRangeEnd": format!("198.19.{s}.250")
        })];
        let mut routes = vec![json!({"target": format!("198.19.{s}.0/24"), "via": null})];
        if self.v6 == V6Mode::Pool {
            pools.push(json!({
                "ipRangeStart": format!("fd00:f1a7:{s:x}::10"),
                "ipRangeEnd": format!("fd00:f1a7:{s:x}::ff")
            }));
            routes.push(json!({"target": format!("fd00:f1a7:{s:x}::/64"), "via": null}));
        }
        json!({
            "name": self.name, "private": true, "mtu": 2800,
            "ipAssignmentPools": pools, "routes": routes,
            "v4AssignMode": {"zt": true},
            "v6AssignMode": {
                "zt": self.v6 == V6Mode::Pool, "rfc4193": self.v6 == V6Mode::Rfc4193,
                "6plane": false
            }
        })
    }
}

/// A network created on a controller.
#[derive(Debug, Clone)]
pub struct Network {
    /// Its ID, 16 hex digits.
    pub nwid: String,
    /// What it was created from.
    pub spec: NetworkSpec,
}

/// A member of a network: where its interface lives and its addresses.
#[derive(Debug, Clone)]
pub struct Member {
    /// A display name (the host's name).
    pub name: String,
    /// The agent that runs it (its name).
    pub agent: String,
    /// Its ZeroTier address.
    pub address: String,
    /// The network ID.
    pub nwid: String,
    /// The namespace its interface lives in.
    pub ns: Host,
    /// Its interface.
    pub dev: String,
    /// Its IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Its IPv6 address (pool or RFC 4193).
    pub ipv6: Option<Ipv6Addr>,
}

impl Member {
    /// Its address of the given family.
    pub fn ip(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.ipv6.map(IpAddr::V6)
        } else {
            self.ipv4.map(IpAddr::V4)
        }
    }
}

/// One `ping` run.
#[derive(Debug, Clone)]
pub struct PingResult {
    /// Whether any reply came.
    pub ok: bool,
    /// Average round trip, ms.
    pub rtt_ms: Option<f64>,
    /// What ping printed.
    pub output: String,
}

/// The running planet; see the module docs.
#[derive(Debug)]
pub struct Planet {
    // Field order is drop order: agents and servers stop before the namespaces go, and the
    // namespaces go before their state directories.
    agents: Vec<Agent>,
    topo: Topology,
    dir: tempfile::TempDir,
    binary: PathBuf,
    cancel: Arc<AtomicBool>,
}

impl Planet {
    /// A planet whose hosts `a` and `b` sit behind NATs of kind `nat`, both joined to one
    /// network; returns once `a` pings `b` (through whatever path), with both members.
    pub fn pair_behind(agent: PathBuf, nat: Nat) -> Result<(Self, Member, Member), PlanetError> {
        let p = Planet::start(
            &PlanetSpec::new(agent)
                .host("a", Some(nat))
                .host("b", Some(nat)),
        )?;
        let net = p.create_network(&NetworkSpec::new("pair"))?;
        let a = p.join("a", &net, &[])?;
        let b = p.join("b", &net, &[])?;
        let to_b = b
            .ipv4
            .ok_or_else(|| PlanetError::Invalid("b has no IPv4 address".into()))?;
        p.wait_ping(&a, to_b.into(), Duration::from_secs(10))?;
        Ok((p, a, b))
    }

    /// Builds the topology, writes the planet file, starts the roots, then the controllers and
    /// hosts, and waits until every agent is online.
    pub fn start(spec: &PlanetSpec) -> Result<Self, PlanetError> {
        Self::start_with_cancel(spec, Arc::new(AtomicBool::new(false)))
    }

    /// [`Planet::start`], giving up early when `cancel` is raised.
    pub fn start_with_cancel(
        spec: &PlanetSpec,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, PlanetError> {
        if !(1..=2).contains(&spec.roots) || !(1..=2).contains(&spec.controllers) {
            return Err(PlanetError::Invalid(
                "a planet has 1 or 2 roots and 1 or 2 controllers".into(),
            ));
        }
        if !spec.agent.is_file() {
            return Err(PlanetError::Build(format!(
                "{} is not a file",
                spec.agent.display()
            )));
        }
        let mut topo = Topology::new()?;
        let dir = tempfile::Builder::new()
            .prefix("flatwire-planet-")
            .tempdir()
            .map_err(|e| HarnessError::Io("temporary directory".into(), e))?;
        let mut wan = topo.switch("wan")?;
        let add = |name: &str,
                   role: Role,
                   host: Host,
                   underlay: Ipv4Addr,
                   underlay_if: String|
         -> Result<Agent, PlanetError> {
            let home = dir.path().join(name);
            std::fs::create_dir_all(&home)
                .map_err(|e| HarnessError::Io(home.display().to_string(), e))?;
            Ok(Agent {
                name: name.to_owned(),
                role,
                host,
                home,
                underlay,
                underlay_if,
                args: Vec::new(),
                address: String::new(),
                token: String::new(),
                proc: None,
            })
        };
        let mut agents = Vec::new();
        let mut public_nets: Vec<(String, String)> = Vec::new();
        let mut access_routers: Vec<(Host, String)> = Vec::new();
        for i in 0..spec.roots {
            let name = format!("root{i}");
            let host = topo.host(&name)?;
            let ip = Ipv4Addr::new(198, 18, 0, 1 + i as u8);
            let ifname = topo.plug(&mut wan, &host, &format!("{ip}/24"))?;
            agents.push(add(&name, Role::Root, host, ip, ifname)?);
        }
        for i in 0..spec.controllers {
            let name = format!("ctl{i}");
            let host = topo.host(&name)?;
            let ip = Ipv4Addr::new(198, 18, 0, 5 + i as u8);
            let ifname = topo.plug(&mut wan, &host, &format!("{ip}/24"))?;
            agents.push(add(&name, Role::Controller, host, ip, ifname)?);
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            let n = u8::try_from(i).map_err(|_| PlanetError::Invalid("too many hosts".into()))?;
            if n > 80 {
                return Err(PlanetError::Invalid("at most 80 hosts".into()));
            }
            let host = topo.host(&h.name)?;
            let agent = match h.nat {
                None => {
                    let ip = Ipv4Addr::new(198, 18, 0, 10 + n);
                    let ifname = topo.plug(&mut wan, &host, &format!("{ip}/24"))?;
                    add(&h.name, Role::Host, host, ip, ifname)?
                }
                Some(nat) => {
                    // host --- NAT router --- edge router --- access router --- wan. Two
                    // hops between the NAT and anyone else, as on the internet: NAT traversal
                    // sends its port-opening datagram with TTL 2, which must die before it
                    // reaches a NAT, also when a host on the wan sends it (see the module
                    // documentation).
                    let access = topo.host(&format!("isp-{}", h.name))?;
                    let access_ip = format!("198.18.0.{}", 100 + n);
                    topo.plug(&mut wan, &access, &format!("{access_ip}/24"))?;
                    forwarding(&access)?;
                    access_routers.push((access.clone(), access_ip.clone()));
                    let edge = topo.host(&format!("edge-{}", h.name))?;
                    topo.link(
                        &access,
                        &format!("198.18.{}.129/25", 128 + n),
                        &edge,
                        &format!("198.18.{}.130/25", 128 + n),
                    )?;
                    forwarding(&edge)?;
                    topo.route(&edge, "default", &format!("198.18.{}.129", 128 + n))?;
                    topo.route(
                        &access,
                        &format!("198.18.{}.0/25", 128 + n),
                        &format!("198.18.{}.130", 128 + n),
                    )?;
                    let router = topo.host(&format!("nat-{}", h.name))?;
                    let public = format!("198.18.{}.0/24", 128 + n);
                    let (_, wan_if) = topo.link(
                        &edge,
                        &format!("198.18.{}.1/25", 128 + n),
                        &router,
                        &format!("198.18.{}.2/25", 128 + n),
                    )?;
                    topo.route(&router, "default", &format!("198.18.{}.1", 128 + n))?;
                    public_nets.push((public, access_ip));
                    let ip = Ipv4Addr::new(198, 18, n + 1, 2);
                    let (lan_if, host_if) = topo.link(
                        &router,
                        &format!("198.18.{}.1/24", n + 1),
                        &host,
                        &format!("{ip}/24"),
                    )?;
                    topo.nat_router(&router, &lan_if, &wan_if, nat)?;
                    topo.route(&host, "default", &format!("198.18.{}.1", n + 1))?;
                    add(&h.name, Role::Host, host, ip, host_if)?
                }
            };
            agents.push(agent);
        }
        // Everything on the wan reaches the NATs' public sides through their access routers.
        let mut on_wan: Vec<(Host, String)> = agents
            .iter()
            .filter(|a| a.underlay.octets()[2] == 0)
            .map(|a| (a.host.clone(), a.underlay.to_string()))
            .collect();
        on_wan.extend(access_routers);
        for (h, own) in &on_wan {
            for (net, via) in public_nets.iter().filter(|(_, via)| via != own) {
                topo.route(h, net, via)?;
            }
        }
        // The roots' identities are made here so the planet file can name them.
        let key = flatwire_vl1::identity::generate_key_pair()
            .map_err(|e| PlanetError::Invalid(format!("planet signing key: {e}")))?;
        let mut roots = Vec::new();
        for a in agents.iter_mut().filter(|a| a.role == Role::Root) {
            let id = Identity::generate(&AtomicBool::new(false))
                .map_err(|e| PlanetError::Invalid(format!("root identity: {e}")))?;
            store_identity(&a.home, &id)?;
            a.address = id.address().to_string();
            roots.push(Root {
                identity: id.to_public(),
                stable_endpoints: vec![(IpAddr::V4(a.underlay), AGENT_PORT).into()],
            });
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let world = World::create(WorldType::Planet, 0x00f1_a7e2, now, key.0, roots, &key.1)
            .map_err(|e| PlanetError::Invalid(format!("planet: {e}")))?;
        let planet_file = dir.path().join("planet");
        std::fs::write(&planet_file, world.serialize(false))
            .map_err(|e| HarnessError::Io(planet_file.display().to_string(), e))?;
        for a in &mut agents {
            a.args = vec!["--planet".into(), planet_file.display().to_string()];
            // Roots and controllers attach no pods; hosts attach a few (more are generated
            // on demand), so the pools do not load the machine.
            let (role, pool) = match a.role {
                Role::Root => (Some("--root"), "0"),
                Role::Controller => (Some("--controller"), "0"),
                Role::Host => (None, "4"),
            };
            a.args.extend(role.map(str::to_owned));
            a.args
                .extend(["--identity-pool".to_owned(), pool.to_owned()]);
        }
        let mut planet = Self {
            agents,
            topo,
            dir,
            binary: spec.agent.clone(),
            cancel,
        };

        // Roots first: the others say HELLO at once and would otherwise retry only after 5 s.
        let (roots, others): (Vec<usize>, Vec<usize>) =
            (0..planet.agents.len()).partition(|i| planet.agents[*i].role == Role::Root);
        for i in &roots {
            let bin = planet.binary.clone();
            planet.agents[*i].start(&bin)?;
        }
        for i in &roots {
            planet.wait_api(*i)?;
        }
        for i in &others {
            let bin = planet.binary.clone();
            planet.agents[*i].start(&bin)?;
        }
        for i in 0..planet.agents.len() {
            planet.wait_online(i)?;
        }
        Ok(planet)
    }

    /// Sets the flag that ends every wait early with [`PlanetError::Interrupted`].
    pub fn set_cancel(&mut self, cancel: Arc<AtomicBool>) {
        self.cancel = cancel;
    }

    /// The directory holding every agent's state and log (`<dir>/<name>/agent.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The topology (to add namespaces, e.g. for pods).
    pub fn topology(&mut self) -> &mut Topology {
        &mut self.topo
    }

    /// Every agent.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The agent called `name`; panics with the known names if there is none.
    pub fn agent(&self, name: &str) -> &Agent {
        &self.agents[self.index(name)]
    }

    /// The agent called `name`, mutably.
    pub fn agent_mut(&mut self, name: &str) -> &mut Agent {
        let i = self.index(name);
        &mut self.agents[i]
    }

    fn index(&self, name: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.name == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.agents.iter().map(|a| a.name.as_str()).collect();
                panic!("no agent {name:?} in this planet (agents: {names:?})")
            })
    }

    /// The names of the hosts, in spec order.
    pub fn host_names(&self) -> Vec<String> {
        self.agents
            .iter()
            .filter(|a| a.role == Role::Host)
            .map(|a| a.name.clone())
            .collect()
    }

    fn check_cancel(&self) -> Result<(), PlanetError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(PlanetError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Polls `probe` every 100 ms until it returns `Some` (at most `limit`); `what` names the
    /// wait in the timeout error. Ends early when `probe` fails or the cancel flag rises.
    pub fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut() -> Result<Option<T>, PlanetError>,
    ) -> Result<T, PlanetError> {
        let start = Instant::now();
        loop {
            self.check_cancel()?;
            if let Some(v) = probe()? {
                return Ok(v);
            }
            if start.elapsed() >= limit {
                return Err(PlanetError::Timeout {
                    what: what.to_owned(),
                    waited: limit,
                    detail: String::new(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn timeout(&self, agent: usize, what: String, waited: Duration, last: &str) -> PlanetError {
        let a = &self.agents[agent];
        PlanetError::Timeout {
            what,
            waited,
            detail: format!(
                "; last answer: {last}\nlog of {}:\n{}",
                a.name,
                a.log_tail(20)
            ),
        }
    }

    /// Waits until the agent's HTTP API answers (its token file exists by then).
    fn wait_api(&mut self, i: usize) -> Result<(), PlanetError> {
        let start = Instant::now();
        loop {
            self.check_cancel()?;
            self.agents[i].check_alive()?;
            let a = &mut self.agents[i];
            if a.token.is_empty()
                && let Ok(t) = std::fs::read_to_string(a.home.join("authtoken.secret"))
            {
                a.token = t.trim().to_owned();
            }
            if !a.token.is_empty()
                && let (200, v) = a.api("GET", "/status", None)
            {
                if let Some(addr) = v["address"].as_str() {
                    a.address = addr.to_owned();
                }
                return Ok(());
            }
            if start.elapsed() > START_LIMIT {
                let what = format!("the HTTP API of {}", self.agents[i].name);
                return Err(self.timeout(i, what, START_LIMIT, "none"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the agent's API answers and `/status` says online (a root answered).
    fn wait_online(&mut self, i: usize) -> Result<(), PlanetError> {
        self.wait_api(i)?;
        let start = Instant::now();
        loop {
            self.check_cancel()?;
            self.agents[i].check_alive()?;
            let (code, v) = self.agents[i].api("GET", "/status", None);
            if code == 200 && v["online"] == true {
                return Ok(());
            }
            if start.elapsed() > START_LIMIT {
                let what = format!("{} to come online", self.agents[i].name);
                return Err(self.timeout(i, what, START_LIMIT, &format!("{code} {v}")));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops the agent `name` (SIGTERM, then SIGKILL after 3 s).
    pub fn stop_agent(&mut self, name: &str) {
        self.agent_mut(name).stop();
    }

    /// Starts the stopped agent `name` again with the same state and flags; returns once its
    /// HTTP API answers (not waiting for a root).
    pub fn start_agent(&mut self, name: &str) -> Result<(), PlanetError> {
        let i = self.index(name);
        let bin = self.binary.clone();
        self.agents[i].start(&bin)?;
        self.wait_api(i)
    }

    /// Adds command-line flags to agent `name`, used from its next start (e.g. after
    /// [`Planet::stop_agent`]).
    pub fn add_agent_args(&mut self, name: &str, args: &[&str]) {
        self.agent_mut(name)
            .args
            .extend(args.iter().map(|a| (*a).to_owned()));
    }

    /// Creates `spec` on its controller through the HTTP API.
    pub fn create_network(&self, spec: &NetworkSpec) -> Result<Network, PlanetError> {
        let ctl = self.controller(spec.controller)?;
        let nwid = format!("{}{:06x}", ctl.address, spec.number & 0xff_ffff);
        ctl.api_ok(
            "POST",
            &format!("/controller/network/{nwid}"),
            Some(&spec.body()),
        )?;
        Ok(Network {
            nwid,
            spec: spec.clone(),
        })
    }

    fn controller(&self, i: usize) -> Result<&Agent, PlanetError> {
        self.agents
            .iter()
            .filter(|a| a.role == Role::Controller)
            .nth(i)
            .ok_or_else(|| PlanetError::Invalid(format!("no controller {i}")))
    }

    /// Sets the network's rules from rule-language source (compiled with flatwire-vl2's
    /// compiler, the same output as ZeroTier's): base rules, capabilities and tags.
    pub fn set_rules(&self, net: &Network, source: &str) -> Result<(), PlanetError> {
        let compiled = flatwire_vl2::rules::compiler::compile(source)
            .map_err(|e| PlanetError::Invalid(format!("rules source: {e}")))?;
        let cli = compiled.to_cli_json().to_value();
        let body = json!({
            "rules": cli["config"]["rules"],
            "capabilities": cli["config"]["capabilities"],
            "tags": cli["config"]["tags"],
        });
        let stored = self.controller(net.spec.controller)?.api_ok(
            "POST",
            &format!("/controller/network/{}", net.nwid),
            Some(&body),
        )?;
        let revision = stored["revision"].as_u64().unwrap_or(0);
        self.wait_revision(net, revision)
    }

    /// Waits until every host agent that has joined `net` holds a config of at least
    /// `revision` (the controller pushes changes to members it heard from recently).
    pub fn wait_revision(&self, net: &Network, revision: u64) -> Result<(), PlanetError> {
        let path = format!("/network/{}", net.nwid);
        for agent in self.agents.iter().filter(|a| a.role() == Role::Host) {
            let start = Instant::now();
            loop {
                self.check_cancel()?;
                let (code, v) = agent.api("GET", &path, None);
                if code != 200 || v["netconfRevision"].as_u64().unwrap_or(0) >= revision {
                    break;
                }
                let limit = Duration::from_secs(5);
                if start.elapsed() > limit {
                    return Err(PlanetError::Timeout {
                        what: format!(
                            "config revision {revision} of {} on {}",
                            net.nwid,
                            agent.name()
                        ),
                        waited: limit,
                        detail: format!("; it holds revision {}", v["netconfRevision"]),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Authorizes (or deauthorizes) member `address` on the controller, with these tags
    /// (`[id, value]` pairs).
    pub fn authorize(
        &self,
        net: &Network,
        address: &str,
        authorized: bool,
        tags: &[(u32, u32)],
    ) -> Result<(), PlanetError> {
        let mut body = json!({ "authorized": authorized });
        if !tags.is_empty() {
            body["tags"] = tags.iter().map(|(i, v)| json!([i, v])).collect();
        }
        self.controller(net.spec.controller)?.api_ok(
            "POST",
            &format!("/controller/network/{}/member/{address}", net.nwid),
            Some(&body),
        )?;
        Ok(())
    }

    /// Authorizes the host agent `name` with `tags`, joins it to `net` through its HTTP API and
    /// waits until its interface carries the addresses the network assigns.
    pub fn join(
        &self,
        name: &str,
        net: &Network,
        tags: &[(u32, u32)],
    ) -> Result<Member, PlanetError> {
        let agent = self.agent(name);
        self.authorize(net, &agent.address, true, tags)?;
        agent.api_ok("POST", &format!("/network/{}", net.nwid), Some(&json!({})))?;
        self.wait_member(name, net)
    }

    /// Waits until the host agent `name`'s member of `net` has its addresses on its TAP (after
    /// a join or a restart).
    pub fn wait_member(&self, name: &str, net: &Network) -> Result<Member, PlanetError> {
        let i = self.index(name);
        let agent = &self.agents[i];
        let path = format!("/network/{}", net.nwid);
        let want_v6 = net.spec.v6 != V6Mode::Off;
        let start = Instant::now();
        let last = loop {
            self.check_cancel()?;
            let (code, v) = agent.api("GET", &path, None);
            if code == 200 {
                let dev = v["portDeviceName"].as_str().unwrap_or_default().to_owned();
                let addrs: Vec<IpAddr> = v["assignedAddresses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str()?.split('/').next()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let ipv4 = addrs.iter().find_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                });
                let ipv6 = addrs.iter().find_map(|a| match a {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                });
                let on_dev = !dev.is_empty() && {
                    let shown = agent
                        .host
                        .run("ip", &["-o", "addr", "show", "dev", &dev])
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    addrs.iter().all(|a| shown.contains(&format!(" {a}/")))
                        && !shown.contains("tentative")
                };
                if ipv4.is_some() && (ipv6.is_some() || !want_v6) && on_dev {
                    return Ok(Member {
                        name: agent.name.clone(),
                        agent: agent.name.clone(),
                        address: agent.address.clone(),
                        nwid: net.nwid.clone(),
                        ns: agent.host.clone(),
                        dev,
                        ipv4,
                        ipv6,
                    });
                }
            }
            if start.elapsed() > JOIN_LIMIT {
                break format!("{code} {v}");
            }
            std::thread::sleep(POLL);
        };
        let what = format!("{name} to get its addresses in {}", net.nwid);
        Err(self.timeout(i, what, JOIN_LIMIT, &last))
    }

    /// Attaches a pod member to `net` through host agent `host`'s gRPC `Attach` (as the CNI
    /// plugin does): a new namespace `<host>-<pod>` gets the member's `eth0`; the member is
    /// authorized on the controller by the address its MAC carries, then this waits for its
    /// IPv4 address. [`PlanetError::Agent`] when the agent refuses (e.g. `UNAVAILABLE`).
    pub fn attach_pod(
        &mut self,
        host: &str,
        net: &Network,
        pod: &str,
    ) -> Result<Member, PlanetError> {
        use flatwire_api::v1;
        let ns = self.topo.host(&format!("{host}-{pod}"))?;
        let req = v1::AttachRequest {
            key: Some(pod_key(&ns)),
            netns_path: ns.netns_path(),
            network_id: net.nwid.clone(),
            mode: v1::Mode::Secondary.into(),
            pod: Some(v1::PodRef {
                namespace: "planet".into(),
                name: pod.to_owned(),
                uid: ns.ns().to_owned(),
            }),
            ..Default::default()
        };
        let result = self
            .agent_call(host, "Attach", |mut client| async move {
                client.attach(req).await
            })?
            .result
            .ok_or_else(|| PlanetError::Invalid("Attach answered without a result".into()))?;
        let nwid: flatwire_vl2::NetworkId = net
            .nwid
            .parse()
            .map_err(|e| PlanetError::Invalid(format!("network ID {}: {e}", net.nwid)))?;
        let address = result
            .mac
            .parse::<flatwire_vl2::Mac>()
            .ok()
            .and_then(|m| m.to_address(nwid))
            .ok_or_else(|| PlanetError::Invalid(format!("Attach gave MAC {:?}", result.mac)))?
            .to_string();
        self.authorize(net, &address, true, &[])?;
        let ipv4 = self.wait(
            &format!("pod {pod} on {host} to get an IPv4 address"),
            JOIN_LIMIT,
            || {
                let out = ns.run("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                Ok(text
                    .split_whitespace()
                    .skip_while(|w| *w != "inet")
                    .nth(1)
                    .and_then(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok()))
            },
        )?;
        Ok(Member {
            name: format!("{host}/{pod}"),
            agent: host.to_owned(),
            address,
            nwid: net.nwid.clone(),
            ns,
            dev: "eth0".into(),
            ipv4: Some(ipv4),
            ipv6: None,
        })
    }

    /// Detaches `pod` (of [`Planet::attach_pod`]) from its host agent (gRPC `Detach`, as the
    /// CNI plugin's DEL does); whether there was an attachment to remove.
    pub fn detach_pod(&self, pod: &Member) -> Result<bool, PlanetError> {
        let req = flatwire_api::v1::DetachRequest {
            key: Some(pod_key(&pod.ns)),
            netns_path: pod.ns.netns_path(),
        };
        let r = self.agent_call(&pod.agent, "Detach", |mut client| async move {
            client.detach(req).await
        })?;
        Ok(r.removed)
    }

    /// Makes one gRPC call (`what`) to host agent `host` over its Unix socket;
    /// [`PlanetError::Agent`] when it cannot be reached or refuses.
    fn agent_call<T, F, Fut>(
        &self,
        host: &str,
        what: &'static str,
        call: F,
    ) -> Result<T, PlanetError>
    where
        F: FnOnce(flatwire_api::AgentClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let socket = self.agent(host).socket();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::Io("tokio runtime".into(), e))?;
        rt.block_on(async {
            let client = flatwire_api::connect(&socket, flatwire_api::ClientOptions::default())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            call(client).await
        })
        .map(tonic::Response::into_inner)
        .map_err(|status| PlanetError::Agent {
            agent: host.to_owned(),
            call: what,
            status: Box::new(status),
        })
    }

    /// Pings `to` from `from`'s namespace: up to `count` echoes 0.2 s apart, at most
    /// `count` seconds in all.
    pub fn ping(&self, from: &Member, to: IpAddr, count: u32) -> PingResult {
        ping_in(&from.ns, to, count)
    }

    /// Pings `to` from `from` once a second-fraction until a reply comes (at most `limit`);
    /// returns how long it took.
    pub fn wait_ping(
        &self,
        from: &Member,
        to: IpAddr,
        limit: Duration,
    ) -> Result<Duration, PlanetError> {
        let start = Instant::now();
        loop {
            self.check_cancel()?;
            let r = ping_in(&from.ns, to, 1);
            if r.ok {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                return Err(PlanetError::Timeout {
                    what: format!("a ping reply from {to} to {}", from.name),
                    waited: limit,
                    detail: format!("; last ping:\n{}", r.output),
                });
            }
        }
    }

    /// Pings every ordered pair of `members` (IPv6 when `v6`): `(from, to, result)`.
    pub fn ping_matrix(
        &self,
        members: &[Member],
        v6: bool,
    ) -> Result<Vec<(String, String, PingResult)>, PlanetError> {
        let mut out = Vec::new();
        for a in members {
            for b in members.iter().filter(|b| b.name != a.name) {
                self.check_cancel()?;
                let ip = b
                    .ip(v6)
                    .ok_or_else(|| PlanetError::Invalid(format!("{} has no address", b.name)))?;
                out.push((a.name.clone(), b.name.clone(), self.ping(a, ip, 3)));
            }
        }
        Ok(out)
    }

    /// Waits until agent `from` reaches peer `to` (an address) the way `want` says.
    pub fn wait_path(
        &self,
        from: &str,
        to: &str,
        want: PathKind,
        limit: Duration,
    ) -> Result<Duration, PlanetError> {
        let a = self.agent(from);
        let start = Instant::now();
        let found = self.wait(&format!("{from} to reach {to} {want:?}"), limit, || {
            Ok((a.path_to(to) == Some(want)).then_some(()))
        });
        match found {
            Ok(()) => Ok(start.elapsed()),
            Err(PlanetError::Timeout { what, waited, .. }) => {
                let (_, peers) = a.api("GET", "/peer", None);
                Err(PlanetError::Timeout {
                    what,
                    waited,
                    detail: format!("; /peer of {from}: {peers}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Floods 300 pings of 1000 bytes, 5 ms apart, from `from` to `to` and counts the packets
    /// root agent `root` received meanwhile (600 when it relays both directions); the ping
    /// summary and that count.
    pub fn flood(
        &self,
        from: &Member,
        to: IpAddr,
        root: &str,
    ) -> Result<(String, u64), PlanetError> {
        let root = self.agent(root);
        let before = root.underlay_rx_packets()?;
        let target = to.to_string();
        let out = from.ns.run(
            "ping",
            &[
                "-n", "-q", "-c", "300", "-i", "0.005", "-s", "1000", &target,
            ],
        )?;
        let grown = root.underlay_rx_packets()?.saturating_sub(before);
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), grown))
    }

    /// Measures TCP throughput with `iperf3` for `seconds`: server in `server`'s namespace on
    /// `port`, client in `client`'s namespace connecting to `to`. `None` when the client
    /// could not connect (within 2 s) or got no result.
    pub fn iperf(
        &self,
        server: &Host,
        client: &Host,
        to: IpAddr,
        port: u16,
        seconds: u32,
    ) -> Result<Option<f64>, PlanetError> {
        Ok(self
            .iperf_report(server, client, to, port, 1, seconds)?
            .ok()
            .map(|t| t.gbps))
    }

    /// Runs `iperf3` with `streams` parallel TCP streams for `seconds` (server in `server` on
    /// `port`, client in `client` sending to `to`); the client's report, or why it has none
    /// (it could not connect within 2 s, or iperf3 reported an error).
    pub fn iperf_report(
        &self,
        server: &Host,
        client: &Host,
        to: IpAddr,
        port: u16,
        streams: u32,
        seconds: u32,
    ) -> Result<Result<Tcp, String>, PlanetError> {
        let port_s = port.to_string();
        let mut cmd = server.command("iperf3");
        cmd.args(["-s", "-1", "-p", &port_s])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut srv = Proc::spawn(&format!("iperf3 server in {}", server.name()), &mut cmd)?;
        self.wait(
            &format!("iperf3 to listen in {}", server.name()),
            Duration::from_secs(5),
            || {
                if let Some(s) = srv.try_status() {
                    return Err(PlanetError::Invalid(format!("iperf3 server exited: {s}")));
                }
                let out = server.run("ss", &["-Hltn", &format!("sport = :{port}")])?;
                Ok((!out.stdout.is_empty()).then_some(()))
            },
        )?;
        // A flow cut off mid-run (e.g. by a rule taking effect) can leave the iperf3 client
        // spinning for good: it gets `seconds` plus 10 s, then it is ended by PID.
        let report_file = tempfile::NamedTempFile::new()
            .map_err(|e| HarnessError::Io("iperf3 report file".into(), e))?;
        let stdout = report_file
            .reopen()
            .map_err(|e| HarnessError::Io("iperf3 report file".into(), e))?;
        let mut cmd = client.command("iperf3");
        cmd.args(["-c", &to.to_string(), "-p", &port_s, "-J"])
            .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
            .args(["--connect-timeout", "2000"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null());
        let mut cli = Proc::spawn("iperf3 client", &mut cmd)?;
        let limit = Duration::from_secs(u64::from(seconds) + 10);
        let finished = cli.wait_timeout(limit);
        cli.stop();
        srv.stop();
        let Some(status) = finished else {
            return Ok(Err(format!(
                "iperf3 -c {to} did not finish within {limit:?}"
            )));
        };
        let stdout = std::fs::read(report_file.path())
            .map_err(|e| HarnessError::Io("iperf3 report".into(), e))?;
        let report = serde_json::from_slice::<Value>(&stdout)
            .map_err(|e| format!("iperf3 -c {to} printed no JSON ({e}, {status})"))
            .and_then(|v| parse_iperf(&v));
        Ok(report)
    }
}

/// The attachment key of a pod of [`Planet::attach_pod`] living in namespace `ns`.
fn pod_key(ns: &Host) -> flatwire_api::v1::AttachmentKey {
    flatwire_api::v1::AttachmentKey {
        network_name: "planet".into(),
        container_id: ns.ns().to_owned(),
        ifname: "eth0".into(),
    }
}

/// One `iperf3` run: what the receiver got and what the sender had to resend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tcp {
    /// Goodput at the receiver, Gbit/s.
    pub gbps: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
    /// TCP retransmissions at the sender.
    pub retransmits: u64,
}

/// The figures of an `iperf3 -J` client report, or its error.
pub fn parse_iperf(v: &Value) -> Result<Tcp, String> {
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    let end = &v["end"];
    let (Some(bps), Some(bytes)) = (
        end["sum_received"]["bits_per_second"].as_f64(),
        end["sum_received"]["bytes"].as_u64(),
    ) else {
        return Err("no end.sum_received in the iperf3 report".into());
    };
    Ok(Tcp {
        gbps: bps / 1e9,
        bytes,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Turns on IPv4 forwarding in `host` (a plain router).
fn forwarding(host: &Host) -> Result<(), HarnessError> {
    host.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .map(drop)
}

/// Pings `to` from namespace `ns`: up to `count` echoes 0.2 s apart within `count` seconds.
pub fn ping_in(ns: &Host, to: IpAddr, count: u32) -> PingResult {
    let count_s = count.max(1).to_string();
    let mut cmd = ns.command("ping");
    if to.is_ipv6() {
        cmd.arg("-6");
    }
    cmd.args(["-n", "-c", &count_s, "-i", "0.2", "-W", "1", "-w", &count_s])
        .arg(to.to_string());
    match run_checked(&mut cmd) {
        Ok(o) => {
            let output = String::from_utf8_lossy(&o.stdout).into_owned();
            PingResult {
                ok: true,
                rtt_ms: rtt_avg(&output),
                output,
            }
        }
        Err(e) => PingResult {
            ok: false,
            rtt_ms: None,
            output: e.to_string(),
        },
    }
}

/// The average of ping's `rtt min/avg/max/mdev` line.
fn rtt_avg(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    line.split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// The value of the sample whose name-and-labels part is exactly `series` in a metrics text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Stores an identity as the agent keeps its own (`identity.secret` 0600, `identity.public`).
fn store_identity(home: &Path, id: &Identity) -> Result<(), PlanetError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let secret = id
        .to_secret_string()
        .ok_or_else(|| PlanetError::Invalid("identity without a secret".into()))?;
    let io = |p: &Path, e| HarnessError::Io(p.display().to_string(), e);
    let path = home.join("identity.secret");
    let mut f = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes())
        .map_err(|e| io(&path, e))?;
    let path = home.join("identity.public");
    std::fs::write(&path, format!("{id}\n")).map_err(|e| io(&path, e))?;
    Ok(())
}

/// Renders ping results as lines `from -> to: ok rtt` (for failure messages).
pub fn describe_pings(results: &[(String, String, PingResult)]) -> String {
    let mut s = String::new();
    for (a, b, r) in results {
        let _ = writeln!(
            s,
            "{a} -> {b}: {} {}",
            if r.ok { "ok" } else { "FAIL" },
            r.rtt_ms.map_or("-".into(), |x| format!("{x:.2} ms"))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_and_samples_parse() {
        let out = "3 packets transmitted, 3 received, 0% packet loss, time 402ms\n\
                   rtt min/avg/max/mdev = 0.061/0.083/0.114/0.022 ms\n";
        assert_eq!(rtt_avg(out), Some(0.083));
        assert_eq!(rtt_avg("100% packet loss"), None);
        let m = "flatwire_peers 3\nflatwire_paths{kind=\"direct\"} 2\n";
        assert_eq!(sample(m, "flatwire_paths{kind=\"direct\"}"), Some(2.0));
        assert_eq!(sample(m, "flatwire_peer"), None);
    }

    #[test]
    fn network_bodies_use_the_test_ranges_only() {
        let mut spec = NetworkSpec::new("n");
        spec.subnet = 3;
        spec.v6 = V6Mode::Pool;
        let b = spec.body();
        assert_eq!(b["ipAssignmentPools"][0]["ipRangeStart"], "198.19.3.10");
        assert_eq!(b["ipAssignmentPools"][1]["ipRangeEnd"], "fd00:f1a7:3::ff");
        assert_eq!(b["v6AssignMode"]["6plane"], false, "6plane is fc00::/8");
    }
}
