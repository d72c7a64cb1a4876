//! A VL2 node: a std UDP socket and `std::time` around a sans-I/O [`Node`], running as a
//! network controller, a network member (no TAP: it logs what it was configured with), a
//! root, or any mix of them.
//!
//! ```text
//! vl2-node --identity FILE --bind IP:PORT --planet FILE [--root] [--commands FILE]
//!          [--controller DIR [--networks FILE] [--network NUM [--name NAME] [--public]
//!              [--pool START-END]... [--route CIDR]... [--rules FILE]
//!              [--member ADDR[,TAG=VALUE][,CAP]...]...]]
//!          [--join NWID]...
//! ```
//!
//! * `--identity FILE`: the identity in secret text form; generated and written if missing.
//! * `--planet FILE`: a serialized planet (the `planet` file ZeroTier One reads).
//! * `--root`: serve as a root of that planet (relay, WHOIS, multicast LIKE/GATHER).
//! * `--controller DIR`: answer NETWORK_CONFIG_REQUESTs for networks `<our address>______`
//!   from the JSON-file store in `DIR` (`network/<nwid>.json`, `network/<nwid>/member/…`, the
//!   same JSON as ZeroTier One's `controller.d`).
//! * `--networks FILE`: networks (and members) to create or update in the store at start,
//!   a JSON array of [`NetSpec`] objects:
//!   `{"number":"f1a7e0","name":"..","private":true,"pools":[["10.1.0.10","10.1.0.99"]],
//!   "routes":["10.1.0.0/24"],"rulesSource":"...","broadcast":true,"multicastLimit":32,
//!   "members":[{"address":"..","authorized":true,"tags":{"role":"web"},"capabilities":["admin"]}]}`.
//!   `rulesSource` is compiled with `flatwire_vl2::rules::compiler` (tags and capabilities
//!   included); member tags and capabilities are given by name (values by enum name or
//!   number).
//! * `--network NUM` and the flags after it: the same for one network from the command line.
//! * `--join NWID`: join that network as a member.
//! * `--commands FILE`: lines appended to this file are run once each: `join NWID`,
//!   `leave NWID`, `arp NWID IPV4` (a broadcast ARP request as if from a TAP), `authorize NWID ADDR`, `deauthorize NWID ADDR` (the controller pushes the
//!   member a fresh config, or a revocation, at once).
//!
//! Everything is written to stdout, one line per event, `kind key=value ...`: `address`,
//! `bound`, `role`, `peer-up`, `hello`, `controller`, `request`, `network`, `config`, `ip`,
//! `route`, `tag`, `capability`, `rules`, `frame`, `arp-reply`, `command`, `drops`, `net-drops`.
//! As a member it answers ARP requests for its own addresses (it has no TAP).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_vl1::node::MAX_DATAGRAM_LEN;
use flatwire_vl1::{Address, Event, Identity, LocalSocket, Node, NodeConfig, Verb, World};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    Controller, ControllerStore, FileStore, Member, Network as NetworkJson, Pool, RequestOutcome,
    RouteJson, config_payloads, refusal_payload,
};
use flatwire_vl2::member::{
    DropReason, MemberOptions, Network, NetworkEvent, Output, Status, Upstream,
};
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::rules::encode_rules;
use flatwire_vl2::verbs::{ConfigRequest, CredentialsPayload};
use serde::Deserialize;

/// A network the controller creates (or updates) at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct NetSpec {
    /// The 24-bit network number in hex (the network ID is our address followed by it).
    number: String,
    name: String,
    private: Option<bool>,
    pools: Vec<(String, String)>,
    routes: Vec<String>,
    rules_source: Option<String>,
    broadcast: Option<bool>,
    multicast_limit: Option<i64>,
    members: Vec<MemberSpec>,
}

/// A member of a [`NetSpec`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct MemberSpec {
    address: String,
    authorized: Option<bool>,
    /// Tag name (or numeric id) to value (enum name or number).
    tags: BTreeMap<String, serde_json::Value>,
    /// Capability names (or numeric ids).
    capabilities: Vec<serde_json::Value>,
    ip_assignments: Vec<String>,
}

struct Args {
    identity: PathBuf,
    bind: SocketAddr,
    planet: PathBuf,
    root: bool,
    commands: Option<PathBuf>,
    controller: Option<PathBuf>,
    networks: Vec<NetSpec>,
    join: Vec<NetworkId>,
}

fn usage() -> ! {
    eprintln!(
        "usage: vl2-node --identity FILE --bind IP:PORT --planet FILE [--root] \
         [--commands FILE] [--controller DIR [--networks FILE] [--network NUM [--name NAME] \
         [--public] [--pool START-END]... [--route CIDR]... [--rules FILE] \
         [--member ADDR[,TAG=VALUE][,CAP]...]...]] [--join NWID]..."
    );
    std::process::exit(2)
}

fn parse_member_flag(v: &str) -> MemberSpec {
    let mut parts = v.split(',');
    let mut m = MemberSpec {
        address: parts.next().unwrap_or_default().to_owned(),
        authorized: Some(true),
        ..MemberSpec::default()
    };
    for p in parts {
        match p.split_once('=') {
            Some((k, val)) => {
                let val = val
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| serde_json::Value::from(val));
                m.tags.insert(k.to_owned(), val);
            }
            None => m.capabilities.push(serde_json::Value::from(p)),
        }
    }
    m
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut identity, mut bind, mut planet) = (None, None, None);
    let mut a = Args {
        identity: PathBuf::new(),
        bind: "0.0.0.0:9993".parse().map_err(|e| format!("{e}"))?,
        planet: PathBuf::new(),
        root: false,
        commands: None,
        controller: None,
        networks: Vec::new(),
        join: Vec::new(),
    };
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        let cur = |a: &mut Args| -> Result<usize, String> {
            a.networks
                .len()
                .checked_sub(1)
                .ok_or_else(|| "network flags come after --network NUM".to_owned())
        };
        match arg.as_str() {
            "--identity" => identity = Some(PathBuf::from(val()?)),
            "--bind" => bind = Some(val()?.parse().map_err(|e| format!("--bind: {e}"))?),
            "--planet" => planet = Some(PathBuf::from(val()?)),
            "--root" => a.root = true,
            "--commands" => a.commands = Some(PathBuf::from(val()?)),
            "--controller" => a.controller = Some(PathBuf::from(val()?)),
            "--networks" => {
                let p = val()?;
                let text = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
                let specs: Vec<NetSpec> =
                    serde_json::from_str(&text).map_err(|e| format!("{p}: {e}"))?;
                a.networks.extend(specs);
            }
            "--network" => a.networks.push(NetSpec {
                number: val()?,
                ..NetSpec::default()
            }),
            "--name" => {
                let v = val()?;
                let i = cur(&mut a)?;
                a.networks[i].name = v;
            }
            "--public" => {
                let i = cur(&mut a)?;
                a.networks[i].private = Some(false);
            }
            "--pool" => {
                let v = val()?;
                let (s, e) = v.split_once('-').ok_or("--pool wants START-END")?;
                let i = cur(&mut a)?;
                a.networks[i].pools.push((s.to_owned(), e.to_owned()));
            }
            "--route" => {
                let v = val()?;
                let i = cur(&mut a)?;
                a.networks[i].routes.push(v);
            }
            "--rules" => {
                let p = val()?;
                let text = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
                let i = cur(&mut a)?;
                a.networks[i].rules_source = Some(text);
            }
            "--member" => {
                let v = val()?;
                let i = cur(&mut a)?;
                a.networks[i].members.push(parse_member_flag(&v));
            }
            "--join" => a
                .join
                .push(val()?.parse().map_err(|_| "--join wants a network ID")?),
            "-h" | "--help" => usage(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.identity = identity.ok_or("--identity is required")?;
    a.bind = bind.unwrap_or(a.bind);
    a.planet = planet.ok_or("--planet is required")?;
    if !a.networks.is_empty() && a.controller.is_none() {
        return Err("networks need --controller DIR".into());
    }
    Ok(a)
}

fn load_identity(path: &PathBuf) -> Result<Identity, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = Identity::from_str(text.trim()).map_err(|e| format!("{e}"))?;
            if !id.has_secret() || !id.locally_validate() {
                return Err(format!("{}: not a valid secret identity", path.display()));
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Identity::generate(&AtomicBool::new(false)).map_err(|e| format!("{e}"))?;
            let secret = id.to_secret_string().ok_or("no secret")?;
            std::fs::write(path, secret).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Milliseconds on a monotonic clock that starts at the wall-clock time of launch.
struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        Self {
            start: Instant::now(),
            epoch_ms,
        }
    }
    fn now(&self) -> u64 {
        self.epoch_ms + self.start.elapsed().as_millis() as u64
    }
}

fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads complete lines appended to the commands file since the last call.
struct Commands {
    path: PathBuf,
    done: usize,
}

impl Commands {
    fn poll(&mut self) -> Vec<String> {
        let Ok(f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        let mut reader = std::io::BufReader::new(f);
        let (mut n, mut line) = (0, String::new());
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !line.ends_with('\n') {
                break;
            }
            if n >= self.done {
                lines.push(line.trim().to_owned());
            }
            n += 1;
            line.clear();
        }
        self.done = self.done.max(n);
        lines
    }
}

/// The member drop counters logged on `net-drops` lines.
const NET_DROPS: [DropReason; 13] = [
    DropReason::NoConfig,
    DropReason::Malformed,
    DropReason::NotMember,
    DropReason::RulesOutbound,
    DropReason::RulesInbound,
    DropReason::NotBridge,
    DropReason::MulticastDisabled,
    DropReason::BadMac,
    DropReason::BadCredential,
    DropReason::RateLimited,
    DropReason::BadChunk,
    DropReason::BadConfig,
    DropReason::TooBig,
];

fn status_name(s: Status) -> &'static str {
    match s {
        Status::RequestingConfiguration => "REQUESTING_CONFIGURATION",
        Status::Ok => "OK",
        Status::AccessDenied => "ACCESS_DENIED",
        Status::NotFound => "NOT_FOUND",
        Status::PortError => "PORT_ERROR",
        Status::ClientTooOld => "CLIENT_TOO_OLD",
        Status::AuthenticationRequired => "AUTHENTICATION_REQUIRED",
    }
}

/// Logs a member's config, one line per fact.
fn log_config(nwid: NetworkId, c: &NetworkConfig) {
    let ips: Vec<String> = c
        .static_ips
        .iter()
        .map(|a| format!("{}/{}", a.ip, a.port))
        .collect();
    let tags: Vec<String> = c
        .tags
        .iter()
        .map(|t| format!("{}={}", t.id, t.value))
        .collect();
    let caps: Vec<String> = c.capabilities.iter().map(|x| x.id.to_string()).collect();
    say(format_args!(
        "config nwid={nwid} name={} private={} rev={} mtu={} ips={} rules={} tags={} caps={} \
         com={}",
        c.name.escape_debug(),
        c.private,
        c.revision,
        c.mtu,
        ips.join(","),
        c.rules.len(),
        tags.join(","),
        caps.join(","),
        c.com.is_some()
    ));
    for ip in &ips {
        say(format_args!("ip nwid={nwid} addr={ip}"));
    }
    for r in &c.routes {
        say(format_args!(
            "route nwid={nwid} target={}/{} via={}",
            r.target.ip,
            r.target.port,
            r.via.map_or("-".to_owned(), |v| v.ip.to_string())
        ));
    }
    for t in &c.tags {
        say(format_args!(
            "tag nwid={nwid} id={} value={} to={}",
            t.id, t.value, t.issued_to
        ));
    }
    for cap in &c.capabilities {
        let mut b = Vec::new();
        encode_rules(&cap.rules, &mut b);
        say(format_args!(
            "capability nwid={nwid} id={} rules={} hex={}",
            cap.id,
            cap.rules.len(),
            hex(&b)
        ));
    }
    let mut b = Vec::new();
    encode_rules(&c.rules, &mut b);
    say(format_args!(
        "rules nwid={nwid} count={} hex={}",
        c.rules.len(),
        hex(&b)
    ));
}

/// Resolves a tag or capability given by name (through the compiled definitions) or id.
fn name_or_id(v: &serde_json::Value, by_name: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok().or_else(|| match &by_name[s.as_str()] {
            serde_json::Value::Number(n) => n.as_u64(),
            o => o["id"].as_u64(),
        }),
        _ => None,
    }
}

/// Creates or updates the networks and members of `specs` in the store.
fn apply_specs(
    store: &mut FileStore,
    me: Address,
    specs: &[NetSpec],
    now: i64,
) -> Result<(), String> {
    for s in specs {
        let number = u32::from_str_radix(&s.number, 16)
            .ok()
            .filter(|n| *n <= 0xff_ffff)
            .ok_or_else(|| format!("bad network number {:?}", s.number))?;
        let nwid = NetworkId::new(me, number);
        let mut n = store
            .get_network(nwid)
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| NetworkJson::new(nwid, now));
        n.name = s.name.clone();
        n.private = s.private.unwrap_or(true);
        n.enable_broadcast = s.broadcast.unwrap_or(true);
        n.multicast_limit = s.multicast_limit.unwrap_or(32);
        n.ip_assignment_pools = s
            .pools
            .iter()
            .map(|(a, b)| Pool {
                ip_range_start: a.clone(),
                ip_range_end: b.clone(),
            })
            .collect();
        n.routes = s
            .routes
            .iter()
            .map(|r| RouteJson {
                target: r.clone(),
                via: None,
            })
            .collect();
        n.v4_assign_mode.zt = !s.pools.is_empty();
        let mut by_name = (serde_json::Value::Null, serde_json::Value::Null);
        if let Some(src) = &s.rules_source {
            let compiled = compile(src).map_err(|e| format!("rules of {nwid}: {e}"))?;
            let cli = compiled.to_cli_json().to_value();
            n.rules = cli["config"]["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            n.tags = cli["config"]["tags"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            n.capabilities = cli["config"]["capabilities"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            n.rules_source = src.clone();
            by_name = (cli["tagsByName"].clone(), cli["capabilitiesByName"].clone());
        }
        store.put_network(&mut n).map_err(|e| e.to_string())?;
        say(format_args!(
            "network-created nwid={nwid} rules={} tags={} capabilities={}",
            n.rules.len(),
            n.tags.len(),
            n.capabilities.len()
        ));
        for ms in &s.members {
            let a: Address = ms
                .address
                .parse()
                .map_err(|_| format!("bad member address {:?}", ms.address))?;
            let mut m = store
                .get_member(nwid, a)
                .map_err(|e| e.to_string())?
                .unwrap_or_else(|| Member::new(nwid, a, now));
            m.authorized = ms.authorized.unwrap_or(true);
            if m.authorized && m.last_authorized_time == 0 {
                m.last_authorized_time = now;
            }
            let mut tags = Vec::new();
            for (k, v) in &ms.tags {
                let def = &by_name.0[k.as_str()];
                let id = k
                    .parse::<u64>()
                    .ok()
                    .or_else(|| def["id"].as_u64())
                    .ok_or_else(|| format!("unknown tag {k}"))?;
                let value = name_or_id(v, &def["enums"])
                    .or_else(|| name_or_id(v, &def["flags"]))
                    .ok_or_else(|| format!("bad value {v} of tag {k}"))?;
                tags.push((id, value));
            }
            tags.sort();
            m.tags = tags;
            m.capabilities = ms
                .capabilities
                .iter()
                .map(|c| name_or_id(c, &by_name.1).ok_or_else(|| format!("unknown cap {c}")))
                .collect::<Result<_, _>>()?;
            m.capabilities.sort();
            if !ms.ip_assignments.is_empty() {
                m.ip_assignments = ms.ip_assignments.clone();
            }
            store.put_member(&mut m).map_err(|e| e.to_string())?;
            say(format_args!(
                "member-created nwid={nwid} member={a} authorized={} tags={:?} capabilities={:?}",
                m.authorized, m.tags, m.capabilities
            ));
        }
    }
    Ok(())
}

struct Ctl {
    ctl: Controller<FileStore>,
    upstream: Upstream,
    rng: u64,
}

impl Ctl {
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

/// Everything the node runs besides VL1.
struct Roles {
    me: Address,
    ctl: Option<Ctl>,
    upstream: Option<Upstream>,
    nets: Vec<Network>,
    roots: Vec<Address>,
    seed: u64,
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    (t ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

impl Roles {
    fn join(&mut self, nwid: NetworkId, now: u64) {
        if self.nets.iter().any(|n| n.id() == nwid) {
            return;
        }
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut n = Network::join(
            self.me,
            nwid,
            MemberOptions {
                seed: self.seed,
                ..MemberOptions::default()
            },
            now as i64,
        );
        n.set_upstreams(self.roots.clone());
        say(format_args!("joined nwid={nwid} mac={}", n.mac()));
        self.nets.push(n);
    }

    /// Handles one VL2 packet; returns what to send.
    #[allow(clippy::too_many_arguments)]
    fn packet(
        &mut self,
        node: &Node,
        now: u64,
        from: Address,
        verb: Verb,
        packet_id: u64,
        payload: &[u8],
        sends: &mut Vec<(Address, Verb, Vec<u8>)>,
    ) {
        let me = self.me;
        let lookup = |a: Address| node.peer_identity(me, a).cloned();
        if verb == Verb::NETWORK_CONFIG_REQUEST
            && let Some(c) = self.ctl.as_mut()
        {
            let Ok(req) = ConfigRequest::decode(payload) else {
                say(format_args!("request-malformed from={from}"));
                return;
            };
            if req.nwid.controller() == me {
                let Some(who) = lookup(from) else {
                    say(format_args!("request-unknown-peer from={from}"));
                    return;
                };
                let mut rng = c.rng;
                let mut random = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let out = c.ctl.handle_request(
                    req.nwid,
                    &who,
                    &req.metadata_dictionary(),
                    packet_id,
                    now as i64,
                    &mut random,
                );
                c.rng = rng;
                match out {
                    Ok(RequestOutcome::Config(cfg)) => {
                        let upd = c.random() | 1;
                        match config_payloads(c.ctl.identity(), &cfg, Some(packet_id), upd) {
                            Ok(p) => {
                                say(format_args!(
                                    "request nwid={} from={from} outcome=config chunks={} ips={}",
                                    req.nwid,
                                    p.len(),
                                    cfg.static_ips
                                        .iter()
                                        .map(|a| format!("{}/{}", a.ip, a.port))
                                        .collect::<Vec<_>>()
                                        .join(",")
                                ));
                                for (v, p) in p {
                                    sends.push((from, v, p));
                                }
                            }
                            Err(e) => say(format_args!("request-error nwid={} {e}", req.nwid)),
                        }
                    }
                    Ok(RequestOutcome::Refuse(r)) => {
                        say(format_args!(
                            "request nwid={} from={from} outcome=refused code={:?}",
                            req.nwid, r
                        ));
                        sends.push((from, Verb::ERROR, refusal_payload(packet_id, r, req.nwid)));
                    }
                    Ok(RequestOutcome::Ignore) => say(format_args!(
                        "request nwid={} from={from} outcome=ignored",
                        req.nwid
                    )),
                    Err(e) => say(format_args!("request-error nwid={} {e}", req.nwid)),
                }
                return;
            }
        }
        for n in &mut self.nets {
            n.handle_packet(now as i64, from, verb, packet_id, payload, &lookup);
        }
        if matches!(verb, Verb::MULTICAST_LIKE | Verb::MULTICAST_GATHER) {
            let reply = if let Some(Ctl { ctl, upstream, .. }) = self.ctl.as_mut() {
                let store = ctl.store();
                let authorized = |n: NetworkId, a: Address| {
                    store
                        .get_member(n, a)
                        .ok()
                        .flatten()
                        .is_some_and(|m| m.authorized)
                };
                upstream.handle_packet(now as i64, from, verb, packet_id, payload, &authorized)
            } else if let Some(u) = self.upstream.as_mut() {
                u.handle_packet(now as i64, from, verb, packet_id, payload, &|_, _| true)
            } else {
                None
            };
            if let Some(p) = reply {
                sends.push((from, Verb::OK, p));
            }
        }
    }

    fn command(&mut self, now: u64, line: &str, sends: &mut Vec<(Address, Verb, Vec<u8>)>) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let r: Result<(), String> = match w.as_slice() {
            ["join", nwid] => nwid
                .parse()
                .map(|n| self.join(n, now))
                .map_err(|_| "bad network id".into()),
            ["leave", nwid] => match nwid.parse::<NetworkId>() {
                Ok(n) => {
                    self.nets.retain_mut(|x| {
                        if x.id() == n {
                            x.leave();
                        }
                        x.id() != n
                    });
                    Ok(())
                }
                Err(_) => Err("bad network id".into()),
            },
            ["arp", nwid, ip] => match (nwid.parse::<NetworkId>(), ip.parse::<Ipv4Addr>()) {
                (Ok(nwid), Ok(ip)) => match self.nets.iter_mut().find(|n| n.id() == nwid) {
                    Some(n) => arp_request(n, ip)
                        .map(|f| n.handle_tap_frame(now as i64, &f))
                        .ok_or_else(|| "no IPv4 address on that network yet".into()),
                    None => Err("not joined".into()),
                },
                _ => Err("arp wants NWID IPV4".into()),
            },
            [verb @ ("authorize" | "deauthorize"), nwid, addr] => {
                self.authorize(now, nwid, addr, *verb == "authorize", sends)
            }
            _ => Err("unparsed".into()),
        };
        match r {
            Ok(()) => say(format_args!("command ok {}", line.escape_debug())),
            Err(e) => say(format_args!("command error={e} {}", line.escape_debug())),
        }
    }

    fn authorize(
        &mut self,
        now: u64,
        nwid: &str,
        addr: &str,
        yes: bool,
        sends: &mut Vec<(Address, Verb, Vec<u8>)>,
    ) -> Result<(), String> {
        let c = self.ctl.as_mut().ok_or("not a controller")?;
        let nwid: NetworkId = nwid.parse().map_err(|_| "bad network id")?;
        let a: Address = addr.parse().map_err(|_| "bad address")?;
        let now = now as i64;
        let store = c.ctl.store_mut();
        let mut m = store
            .get_member(nwid, a)
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| Member::new(nwid, a, now));
        m.authorized = yes;
        if yes {
            m.last_authorized_time = now;
        } else {
            m.last_deauthorized_time = now;
        }
        store.put_member(&mut m).map_err(|e| e.to_string())?;
        if !yes {
            let rev = c
                .ctl
                .revoke(nwid, a, (c.rng as u32) | 1, now)
                .map_err(|e| e.to_string())?;
            let mut push = Vec::new();
            CredentialsPayload::revocation(rev).encode(&mut push);
            // As 1.x does: to every member (it pushes to the online ones), so that they cut
            // the revoked member off at once (and propagate it further).
            let members = c
                .ctl
                .store()
                .list_members(nwid)
                .map_err(|e| e.to_string())?;
            say(format_args!(
                "revoke nwid={nwid} member={a} pushed-to={}",
                members.len()
            ));
            for to in members {
                sends.push((to, Verb::NETWORK_CREDENTIALS, push.clone()));
            }
            return Ok(());
        }
        // Push the fresh config at once (as 1.x does on a member change), when the member
        // has told us its identity before.
        let Some(id) = m
            .identity
            .as_deref()
            .and_then(|s| Identity::from_str(s).ok())
        else {
            return Ok(());
        };
        let mut rng = c.rng;
        let mut random = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let out = c.ctl.handle_request(
            nwid,
            &id,
            &flatwire_vl2::dictionary::Dictionary::default(),
            0,
            now,
            &mut random,
        );
        c.rng = rng;
        if let Ok(RequestOutcome::Config(cfg)) = out {
            let upd = c.random() | 1;
            let p =
                config_payloads(c.ctl.identity(), &cfg, None, upd).map_err(|e| e.to_string())?;
            say(format_args!(
                "push nwid={nwid} to={a} chunks={} ips={}",
                p.len(),
                cfg.static_ips
                    .iter()
                    .map(|x| format!("{}/{}", x.ip, x.port))
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            for (v, p) in p {
                sends.push((a, v, p));
            }
        }
        Ok(())
    }

    fn drain_outputs(&mut self, now: u64, sends: &mut Vec<(Address, Verb, Vec<u8>)>) {
        for n in &mut self.nets {
            let nwid = n.id();
            while let Some(o) = n.poll_output() {
                match o {
                    Output::Send { to, verb, payload } => sends.push((to, verb, payload)),
                    Output::Deliver(f) => {
                        say(format_args!(
                            "frame nwid={nwid} len={} src={} ethertype={:02x}{:02x}{}",
                            f.len(),
                            f.get(6..12).map(mac_text).unwrap_or_default(),
                            f.get(12).copied().unwrap_or(0),
                            f.get(13).copied().unwrap_or(0),
                            ip_summary(&f)
                        ));
                        if let Some(reply) = arp_reply(n, &f) {
                            say(format_args!(
                                "arp-reply nwid={nwid} to={}",
                                mac_text(&reply[..6])
                            ));
                            n.handle_tap_frame(now as i64, &reply);
                        }
                    }
                    Output::Event(NetworkEvent::StatusChanged(s)) => say(format_args!(
                        "network nwid={nwid} status={}",
                        status_name(s)
                    )),
                    Output::Event(NetworkEvent::ConfigChanged) => {
                        if let Some(c) = n.config() {
                            log_config(nwid, c);
                        }
                    }
                    Output::Event(NetworkEvent::PeerRevoked(a)) => {
                        say(format_args!("peer-revoked nwid={nwid} peer={a}"))
                    }
                }
            }
        }
    }
}

fn mac_text(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// ` op=` for ARP, ` proto= src-ip= dst-ip= [dport=]` for IPv4.
fn ip_summary(f: &[u8]) -> String {
    match f.get(12..14) {
        Some([0x08, 0x06]) if f.len() >= 42 => format!(
            " arp-op={} spa={} tpa={}",
            f[21],
            Ipv4Addr::new(f[28], f[29], f[30], f[31]),
            Ipv4Addr::new(f[38], f[39], f[40], f[41])
        ),
        Some([0x08, 0x00]) if f.len() >= 34 => {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let proto = f[23];
            let mut s = format!(
                " proto={proto} src-ip={} dst-ip={}",
                Ipv4Addr::new(f[26], f[27], f[28], f[29]),
                Ipv4Addr::new(f[30], f[31], f[32], f[33])
            );
            if matches!(proto, 6 | 17)
                && let Some(p) = f.get(14 + ihl + 2..14 + ihl + 4)
            {
                s.push_str(&format!(" dport={}", u16::from_be_bytes([p[0], p[1]])));
            }
            s
        }
        _ => String::new(),
    }
}

/// Our first IPv4 address on `n`.
fn own_ipv4(n: &Network) -> Option<Ipv4Addr> {
    n.config()?.static_ips.iter().find_map(|a| match a.ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    })
}

/// A broadcast ARP request from us for `target` (what a TAP would emit before the first
/// packet to it).
fn arp_request(n: &Network, target: Ipv4Addr) -> Option<Vec<u8>> {
    let (mac, spa) = (n.mac().0, own_ipv4(n)?);
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    Some(f)
}

/// The ARP reply a host stack would give to `f` when it asks for one of our addresses (the
/// node has no TAP; this is enough for a peer to resolve us).
fn arp_reply(n: &Network, f: &[u8]) -> Option<Vec<u8>> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[14..22] != [0, 1, 8, 0, 6, 4, 0, 1] {
        return None;
    }
    let cfg = n.config()?;
    let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
    if !cfg.static_ips.iter().any(|a| a.ip == IpAddr::V4(tpa)) {
        return None;
    }
    let mac = n.mac().0;
    let mut r = f[22..28].to_vec();
    r.extend_from_slice(&mac);
    r.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&tpa.octets());
    r.extend_from_slice(&f[22..32]);
    Some(r)
}

fn log_event(e: &Event) {
    match e {
        Event::PeerLearned { peer, via, .. } => match via {
            Some(root) => say(format_args!("peer-up peer={peer} via=whois:{root}")),
            None => say(format_args!("peer-up peer={peer} via=hello")),
        },
        Event::HelloReceived {
            peer,
            addr,
            hops,
            software: (ma, mi, rev),
            ..
        } => say(format_args!(
            "hello peer={peer} from={addr} hops={hops} version={ma}.{mi}.{rev}"
        )),
        Event::Packet {
            from,
            verb,
            payload,
            ..
        } => {
            // OK and ERROR: the verb they answer (and the error code).
            let re = match *verb {
                Verb::OK if !payload.is_empty() => format!(" re={}", Verb(payload[0]).name()),
                Verb::ERROR if payload.len() >= 10 => {
                    format!(" re={} code={}", Verb(payload[0]).name(), payload[9])
                }
                _ => String::new(),
            };
            say(format_args!(
                "packet from={from} verb={} len={}{re}",
                verb.name(),
                payload.len()
            ))
        }
        Event::Latency { peer, ms, .. } => say(format_args!("latency peer={peer} ms={ms}")),
        _ => {}
    }
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("vl2-node: {e}");
        usage()
    });
    if let Err(e) = run(args) {
        eprintln!("vl2-node: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let identity = load_identity(&args.identity)?;
    let me = identity.address();
    let planet_bytes =
        std::fs::read(&args.planet).map_err(|e| format!("{}: {e}", args.planet.display()))?;
    let (planet, _) = World::parse(&planet_bytes).map_err(|e| format!("planet: {e}"))?;
    if args.root && !planet.roots.iter().any(|r| r.identity == identity) {
        return Err(format!(
            "--root: {me} is not a root of planet {}",
            planet.id
        ));
    }
    let socket = UdpSocket::bind(args.bind).map_err(|e| format!("bind {}: {e}", args.bind))?;
    let mut node = Node::new(NodeConfig::new(planet.clone()), vec![identity.clone()])
        .map_err(|e| e.to_string())?;
    let clock = Clock::new();
    say(format_args!("address {me}"));
    say(format_args!(
        "bound {}",
        socket.local_addr().map_err(|e| e.to_string())?
    ));
    say(format_args!(
        "role {} planet={}",
        if node.is_root() { "root" } else { "leaf" },
        planet.id
    ));
    let mut roles = Roles {
        me,
        ctl: None,
        upstream: args.root.then(|| Upstream::new(seed())),
        nets: Vec::new(),
        roots: planet
            .roots
            .iter()
            .map(|r| r.identity.address())
            .filter(|a| *a != me)
            .collect(),
        seed: seed(),
    };
    if let Some(dir) = &args.controller {
        let mut store = FileStore::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        apply_specs(&mut store, me, &args.networks, clock.now() as i64)?;
        roles.ctl = Some(Ctl {
            ctl: Controller::new(identity.clone(), store),
            upstream: Upstream::new(seed()),
            rng: seed(),
        });
        say(format_args!("controller dir={}", dir.display()));
    }
    for nwid in &args.join {
        roles.join(*nwid, clock.now());
    }

    let mut commands = args.commands.map(|path| Commands { path, done: 0 });
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut out = vec![0u8; MAX_DATAGRAM_LEN];
    let mut next_report = 0u64;
    let mut last_drops = String::new();
    let trace = std::env::var_os("FLATWIRE_VL2_TRACE").is_some();
    let mut last_net_drops: BTreeMap<NetworkId, String> = BTreeMap::new();
    let mut sends: Vec<(Address, Verb, Vec<u8>)> = Vec::new();
    loop {
        let now = clock.now();
        if now >= node.poll_timeout() {
            node.handle_timeout(now);
        }
        for n in &mut roles.nets {
            if now as i64 >= n.poll_timeout() {
                n.handle_timeout(now as i64);
            }
        }
        if let Some(u) = roles.upstream.as_mut() {
            u.expire(now as i64);
        }
        if let Some(c) = commands.as_mut() {
            for line in c.poll() {
                roles.command(now, &line, &mut sends);
            }
        }
        while let Some(e) = node.poll_event() {
            log_event(&e);
            if let Event::Packet {
                from,
                verb,
                packet_id,
                payload,
                ..
            } = e
            {
                roles.packet(&node, now, from, verb, packet_id, &payload, &mut sends);
            }
        }
        roles.drain_outputs(now, &mut sends);
        for (to, verb, p) in sends.drain(..) {
            if trace {
                say(format_args!(
                    "send to={to} verb={} len={}",
                    verb.name(),
                    p.len()
                ));
            }
            if let Err(e) = node.send(now, me, to, verb, &p) {
                say(format_args!(
                    "send-error to={to} verb={} error={e}",
                    verb.name()
                ));
            }
        }
        if now >= next_report {
            next_report = now + 1000;
            let mut d: Vec<_> = node
                .drops()
                .iter()
                .map(|(r, n)| format!("{r:?}={n}"))
                .collect();
            d.sort();
            let drops = d.join(" ");
            if drops != last_drops {
                say(format_args!("drops {drops}"));
                last_drops = drops;
            }
            for n in &roles.nets {
                let d: Vec<String> = NET_DROPS
                    .iter()
                    .filter(|r| n.drop_count(**r) > 0)
                    .map(|r| format!("{r:?}={}", n.drop_count(*r)))
                    .collect();
                let line = format!("net-drops nwid={} {}", n.id(), d.join(" "));
                if !d.is_empty() && last_net_drops.get(&n.id()) != Some(&line) {
                    say(format_args!("{line}"));
                    last_net_drops.insert(n.id(), line);
                }
            }
        }
        while let Some(t) = node.poll_transmit(&mut out) {
            let r = match t.ttl {
                Some(ttl) if t.to.is_ipv4() => {
                    let old = socket.ttl().unwrap_or(64);
                    let _ = socket.set_ttl(u32::from(ttl));
                    let r = socket.send_to(&out[..t.len], t.to);
                    let _ = socket.set_ttl(old);
                    r
                }
                _ => socket.send_to(&out[..t.len], t.to),
            };
            if let Err(e) = r {
                say(format_args!("send-error to={} error={e}", t.to));
            }
        }
        let now = clock.now();
        let mut wake = node.poll_timeout().min(next_report);
        for n in &roles.nets {
            wake = wake.min(n.poll_timeout().max(0) as u64);
        }
        let wake = wake.saturating_sub(now).clamp(1, 100);
        socket
            .set_read_timeout(Some(Duration::from_millis(wake)))
            .map_err(|e| e.to_string())?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => node.handle_datagram(clock.now(), LocalSocket(0), from, &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
}
