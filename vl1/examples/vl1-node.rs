//! A minimal VL1 node: a std UDP socket and `std::time` around the sans-I/O [`Node`].
//!
//! ```text
//! vl1-node --identity FILE --bind IP:PORT --planet FILE [--root] [--commands FILE]
//!          [--echo ADDR]... [--message ADDR:TYPE:TEXT]... [--interval-ms N]
//!          [--trusted IP/PREFIX=ID]...
//! ```
//!
//! * `--identity FILE`: the identity in secret text form; generated and written if missing.
//! * `--planet FILE`: a serialized planet (the `planet` file ZeroTier One reads).
//! * `--root`: serve as a root of that planet (our identity must be one of its roots).
//! * `--echo ADDR` / `--message ADDR:TYPE:TEXT`: send an ECHO / a USER_MESSAGE of numeric
//!   type `TYPE` to that peer every `--interval-ms` (default 1000).
//! * `--trusted IP/PREFIX=ID`: a trusted physical network (suite 2, no crypto) with that
//!   decimal trusted path ID; repeatable.
//! * `--commands FILE`: lines appended to this file are run once each:
//!   `echo ADDR TEXT`, `msg ADDR TYPE TEXT`, `msghex ADDR TYPE HEX`, `whois ADDR`, `push ADDR IP:PORT[,IP:PORT...]`
//!   (PUSH_DIRECT_PATHS).
//!
//! Everything it does is written to stdout, one event per line, `kind key=value ...`, so a
//! test can follow it: `address`, `bound`, `role`, `peer-up`, `hello`, `path`, `latency`,
//! `echo-in`, `echo-reply`, `user-message`, `packet`, `external-address`,
//! `identity-collision`, `stats`, `drops`. Text payloads are printed with Rust's
//! `escape_debug`, so each event stays on one line.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_vl1::node::{MAX_DATAGRAM_LEN, TrustedPath};
use flatwire_vl1::{Address, Event, Identity, LocalSocket, Node, NodeConfig, Verb, World};

struct Args {
    identity: PathBuf,
    bind: SocketAddr,
    planet: PathBuf,
    root: bool,
    commands: Option<PathBuf>,
    echo: Vec<Address>,
    message: Vec<(Address, u64, String)>,
    interval_ms: u64,
    trusted: Vec<TrustedPath>,
}

fn usage() -> ! {
    eprintln!(
        "usage: vl1-node --identity FILE --bind IP:PORT --planet FILE [--root] \
         [--commands FILE] [--echo ADDR]... [--message ADDR:TYPE:TEXT]... [--interval-ms N] \
         [--trusted IP/PREFIX=ID]..."
    );
    std::process::exit(2)
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
        echo: Vec::new(),
        message: Vec::new(),
        interval_ms: 1000,
        trusted: Vec::new(),
    };
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--identity" => identity = Some(PathBuf::from(val()?)),
            "--bind" => bind = Some(val()?.parse().map_err(|e| format!("--bind: {e}"))?),
            "--planet" => planet = Some(PathBuf::from(val()?)),
            "--root" => a.root = true,
            "--commands" => a.commands = Some(PathBuf::from(val()?)),
            "--echo" => a
                .echo
                .push(val()?.parse().map_err(|e| format!("--echo: {e}"))?),
            "--message" => {
                let v = val()?;
                let mut parts = v.splitn(3, ':');
                let (Some(to), Some(ty), Some(text)) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err("--message wants ADDR:TYPE:TEXT".into());
                };
                a.message.push((
                    to.parse().map_err(|e| format!("--message address: {e}"))?,
                    ty.parse().map_err(|e| format!("--message type: {e}"))?,
                    text.to_owned(),
                ));
            }
            "--interval-ms" => a.interval_ms = val()?.parse().map_err(|e| format!("{e}"))?,
            "--trusted" => {
                let v = val()?;
                let parsed = v.split_once('=').and_then(|(net, id)| {
                    let (ip, len) = net.split_once('/')?;
                    Some(TrustedPath {
                        network: ip.parse().ok()?,
                        prefix_len: len.parse().ok()?,
                        id: id.parse().ok()?,
                    })
                });
                a.trusted
                    .push(parsed.ok_or("--trusted wants IP/PREFIX=ID (decimal ID)")?);
            }
            "-h" | "--help" => usage(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.identity = identity.ok_or("--identity is required")?;
    a.bind = bind.unwrap_or(a.bind);
    a.planet = planet.ok_or("--planet is required")?;
    Ok(a)
}

fn load_identity(path: &PathBuf) -> Result<Identity, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = Identity::from_str(text.trim()).map_err(|e| format!("{e}"))?;
            if !id.has_secret() {
                return Err(format!("{} has no secret key", path.display()));
            }
            if !id.locally_validate() {
                return Err(format!("{} does not validate", path.display()));
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Identity::generate(&AtomicBool::new(false)).map_err(|e| format!("{e}"))?;
            let secret = id
                .to_secret_string()
                .ok_or("generated identity lacks a secret")?;
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn user_message(ty: u64, text: &str) -> Vec<u8> {
    let mut p = ty.to_be_bytes().to_vec();
    p.extend_from_slice(text.as_bytes());
    p
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
        let mut n = 0;
        let mut line = String::new();
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

fn run_command(node: &mut Node, now: u64, me: Address, line: &str) {
    let mut w = line.splitn(4, ' ');
    let r = match (w.next(), w.next(), w.next(), w.next()) {
        (Some("echo"), Some(to), text, rest) => to.parse::<Address>().ok().map(|to| {
            let mut payload = text.unwrap_or("").to_owned();
            if let Some(r) = rest {
                payload.push(' ');
                payload.push_str(r);
            }
            node.send(now, me, to, Verb::ECHO, payload.as_bytes())
        }),
        (Some("whois"), Some(addr), None, None) => addr
            .parse::<Address>()
            .ok()
            .map(|a| node.request_identity(now, me, a)),
        (Some("push"), Some(to), Some(addrs), None) => {
            let addrs: Result<Vec<SocketAddr>, _> = addrs.split(',').map(str::parse).collect();
            match (to.parse::<Address>(), addrs) {
                (Ok(to), Ok(addrs)) => Some(node.push_direct_paths(now, me, to, &addrs)),
                _ => None,
            }
        }
        (Some("msghex"), Some(to), Some(ty), Some(h)) => {
            match (to.parse::<Address>(), ty.parse::<u64>(), unhex(h)) {
                (Ok(to), Ok(ty), Some(data)) => {
                    let mut p = ty.to_be_bytes().to_vec();
                    p.extend_from_slice(&data);
                    Some(node.send(now, me, to, Verb::USER_MESSAGE, &p))
                }
                _ => None,
            }
        }
        (Some("msg"), Some(to), Some(ty), text) => {
            match (to.parse::<Address>(), ty.parse::<u64>()) {
                (Ok(to), Ok(ty)) => Some(node.send(
                    now,
                    me,
                    to,
                    Verb::USER_MESSAGE,
                    &user_message(ty, text.unwrap_or("")),
                )),
                _ => None,
            }
        }
        _ => None,
    };
    match r {
        Some(Ok(())) => say(format_args!("command ok {}", text(line.as_bytes()))),
        Some(Err(e)) => say(format_args!("command error={e} {}", text(line.as_bytes()))),
        None => say(format_args!("command unparsed {}", text(line.as_bytes()))),
    }
}

fn log_event(e: Event) {
    match e {
        Event::PeerLearned { peer, via, .. } => match via {
            Some(root) => say(format_args!("peer-up peer={peer} via=whois:{root}")),
            None => say(format_args!("peer-up peer={peer} via=hello")),
        },
        Event::HelloReceived {
            peer,
            addr,
            hops,
            protocol_version,
            software: (ma, mi, rev),
            ..
        } => say(format_args!(
            "hello peer={peer} from={addr} hops={hops} proto={protocol_version} \
             version={ma}.{mi}.{rev}"
        )),
        Event::PathLearned { peer, addr, .. } => say(format_args!("path peer={peer} addr={addr}")),
        Event::Latency { peer, ms, .. } => say(format_args!("latency peer={peer} ms={ms}")),
        Event::EchoReceived {
            peer, addr, hops, ..
        } => say(format_args!("echo-in peer={peer} from={addr} hops={hops}")),
        Event::EchoReply { peer, payload, .. } => say(format_args!(
            "echo-reply peer={peer} payload={}",
            text(&payload)
        )),
        Event::Packet {
            from,
            verb: Verb::USER_MESSAGE,
            payload,
            ..
        } if payload.len() >= 8 => {
            let ty = u64::from_be_bytes(payload[..8].try_into().unwrap_or([0; 8]));
            say(format_args!(
                "user-message from={from} type={ty} len={} text={} hex={}",
                payload.len() - 8,
                text(&payload[8..]),
                hex(&payload[8..])
            ));
        }
        Event::Packet {
            from,
            verb,
            payload,
            ..
        } => say(format_args!(
            "packet from={from} verb={} len={}",
            verb.name(),
            payload.len()
        )),
        Event::ExternalAddress { addr, .. } => say(format_args!("external-address addr={addr}")),
        Event::PlanetUpdated { planet } => say(format_args!(
            "planet-updated id={} timestamp={} roots={}",
            planet.id,
            planet.timestamp,
            planet.roots.len()
        )),
        Event::IdentityCollision { root, .. } => {
            say(format_args!("identity-collision root={root}"))
        }
    }
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("vl1-node: {e}");
        usage()
    });
    if let Err(e) = run(args) {
        eprintln!("vl1-node: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let identity = load_identity(&args.identity)?;
    let me = identity.address();
    let planet_bytes =
        std::fs::read(&args.planet).map_err(|e| format!("{}: {e}", args.planet.display()))?;
    let (planet, _) = World::parse(&planet_bytes).map_err(|e| format!("planet: {e}"))?;
    let in_planet = planet.roots.iter().any(|r| r.identity == identity);
    if args.root && !in_planet {
        return Err(format!(
            "--root: {me} is not a root of planet {}",
            planet.id
        ));
    }
    let socket = UdpSocket::bind(args.bind).map_err(|e| format!("bind {}: {e}", args.bind))?;
    let mut cfg = NodeConfig::new(planet.clone());
    cfg.trusted_paths = args.trusted.clone();
    let mut node = Node::new(cfg, vec![identity]).map_err(|e| format!("{e}"))?;
    say(format_args!("address {me}"));
    say(format_args!(
        "bound {}",
        socket.local_addr().map_err(|e| format!("{e}"))?
    ));
    say(format_args!(
        "role {} planet={} roots={}",
        if node.is_root() { "root" } else { "leaf" },
        planet.id,
        planet
            .roots
            .iter()
            .map(|r| r.identity.address().to_string())
            .collect::<Vec<_>>()
            .join(",")
    ));

    let clock = Clock::new();
    let mut commands = args.commands.map(|path| Commands { path, done: 0 });
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut out = vec![0u8; MAX_DATAGRAM_LEN];
    let mut next_repeat = 0u64;
    let mut next_report = 0u64;
    let (mut last_stats, mut last_drops) = (String::new(), String::new());
    loop {
        let now = clock.now();
        if now >= node.poll_timeout() {
            node.handle_timeout(now);
        }
        if now >= next_repeat {
            next_repeat = now + args.interval_ms;
            for to in &args.echo {
                let _ = node.send(now, me, *to, Verb::ECHO, b"flatwire-echo");
            }
            for (to, ty, t) in &args.message {
                let _ = node.send(now, me, *to, Verb::USER_MESSAGE, &user_message(*ty, t));
            }
        }
        if let Some(c) = commands.as_mut() {
            for line in c.poll() {
                run_command(&mut node, now, me, &line);
            }
        }
        if now >= next_report {
            next_report = now + 1000;
            let s = node.stats();
            let stats = format!(
                "stats whois_answered={} relayed={} rendezvous_sent={} hellos_received={} \
                 collisions_reported={} trusted_sent={} trusted_received={}",
                s.whois_answered,
                s.relayed,
                s.rendezvous_sent,
                s.hellos_received,
                s.collisions_reported,
                s.trusted_sent,
                s.trusted_received
            );
            if stats != last_stats {
                say(format_args!("{stats}"));
                last_stats = stats;
            }
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
        }
        while let Some(t) = node.poll_transmit(&mut out) {
            let data = &out[..t.len];
            let r = match t.ttl {
                Some(ttl) if t.to.is_ipv4() => {
                    let old = socket.ttl().unwrap_or(64);
                    let _ = socket.set_ttl(u32::from(ttl));
                    let r = socket.send_to(data, t.to);
                    let _ = socket.set_ttl(old);
                    r
                }
                _ => socket.send_to(data, t.to),
            };
            if let Err(e) = r {
                say(format_args!("send-error to={} error={e}", t.to));
            }
        }
        while let Some(e) = node.poll_event() {
            log_event(e);
        }
        let now = clock.now();
        let wake = node
            .poll_timeout()
            .min(next_repeat)
            .min(next_report)
            .saturating_sub(now)
            .clamp(1, 100);
        socket
            .set_read_timeout(Some(Duration::from_millis(wake)))
            .map_err(|e| format!("{e}"))?;
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
