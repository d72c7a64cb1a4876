//! A lab for interop with a real ZeroTier One 1.x (`FLATWIRE_ZT_ONE_BIN` = path to
//! `zerotier-one`): our example nodes and `zerotier-one` processes in harness namespaces
//! ([`crate::netns`]), followed through their logs, ZeroTier One's CLI and its local JSON API
//! (including its built-in network controller).
//!
//! ZeroTier One always runs with a `local.conf` that binds only its namespace address, with
//! port mapping, TCP fallback, the secondary port and software updates off, and with the
//! planet file the test gives it, so it never contacts a public root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::netns::{Host, Topology};

/// The `zerotier-one` binary to test against, from `FLATWIRE_ZT_ONE_BIN`.
pub fn zt_bin() -> Option<PathBuf> {
    std::env::var_os("FLATWIRE_ZT_ONE_BIN").map(PathBuf::from)
}

/// [`zt_bin`], checked to exist; `None` (after printing `skip`) when it is not set, so a
/// test can return early and pass as skipped.
pub fn zt_bin_or_skip(skip: &str) -> Option<PathBuf> {
    let Some(zt) = zt_bin() else {
        println!("{skip}");
        return None;
    };
    assert!(
        zt.exists(),
        "FLATWIRE_ZT_ONE_BIN={} does not exist",
        zt.display()
    );
    Some(zt)
}

/// The world id of the interop tests' own planet ("Flatwire").
pub const PLANET_ID: u64 = 0x466c_6174_7769_7265;

/// The serialized bytes of our own planet ([`PLANET_ID`], created now with a fresh signing
/// key) whose one root is `$root_id` (a `flatwire_vl1::Identity`) at `$endpoint` (a
/// `SocketAddr`).
///
/// A macro because this harness does not depend on `flatwire_vl1`: it expands in the
/// interop tests, which do.
#[macro_export]
macro_rules! zt_planet {
    ($root_id:expr, $endpoint:expr $(,)?) => {{
        let (pk, sk) = ::flatwire_vl1::identity::generate_key_pair().unwrap();
        ::flatwire_vl1::World::create(
            ::flatwire_vl1::WorldType::Planet,
            $crate::ztlab::PLANET_ID,
            $crate::ztlab::now_ms(),
            pk,
            vec![::flatwire_vl1::Root {
                identity: $root_id.to_public(),
                stable_endpoints: vec![$endpoint],
            }],
            &sk,
        )
        .unwrap()
        .serialize(false)
    }};
}

/// `zerotier-one -v`.
pub fn zt_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Builds example `example` of workspace package `package` and returns its path.
pub fn build_example(package: &str, example: &str) -> PathBuf {
    crate::process::cargo_build(&["-p", package, "--example", example], example)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Wall-clock milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `f` every 200 ms until it returns `Some` or `secs` pass; then panics with `what`
/// and `diag()`.
pub fn wait_for<T>(
    what: &str,
    secs: u64,
    diag: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {secs} s waiting for: {what}\n{}", diag());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A file's text, empty when missing.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The last `n` lines of a file, with a header naming it.
pub fn tail(path: &Path, n: usize) -> String {
    let text = read(path);
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- {} (last {n} lines)\n{}",
        path.display(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}

/// One of our example nodes (`vl1-node`, `vl2-node`): its stdout log (one event per line)
/// and its commands file.
pub struct FwNode {
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Lines appended here are run by the node.
    pub commands: PathBuf,
    /// Its VL1 address (from its `address` line).
    pub address: String,
}

impl FwNode {
    /// Starts `bin --identity <dir>/identity.secret --commands <dir>/commands args...` in
    /// `host` and waits for its `address` line.
    pub fn start(t: &mut Topology, host: &Host, bin: &Path, dir: &Path, args: &[String]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("node.log");
        let commands = dir.join("commands");
        std::fs::write(&commands, "").unwrap();
        let mut cmd = format!(
            "exec {} --identity {} --commands {}",
            bin.display(),
            dir.join("identity.secret").display(),
            commands.display()
        );
        for x in args {
            cmd.push(' ');
            cmd.push_str(x);
        }
        cmd.push_str(&format!(" >{} 2>&1", log.display()));
        t.spawn(host, "sh", &["-c", &cmd]).unwrap();
        let address = wait_for(
            "our node prints its address",
            60,
            || tail(&log, 20),
            || {
                read(&log)
                    .lines()
                    .find_map(|l| l.strip_prefix("address ").map(str::to_owned))
            },
        );
        FwNode {
            log,
            commands,
            address,
        }
    }

    /// Appends a command line.
    pub fn command(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.commands)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }

    /// The log's lines.
    pub fn lines(&self) -> Vec<String> {
        read(&self.log).lines().map(str::to_owned).collect()
    }

    /// Waits for a log line that starts with `prefix` and contains every one of `parts`.
    pub fn wait_line(&self, what: &str, secs: u64, prefix: &str, parts: &[&str]) -> String {
        wait_for(
            what,
            secs,
            || tail(&self.log, 40),
            || {
                self.lines()
                    .into_iter()
                    .find(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
            },
        )
    }

    /// The last log line that starts with `prefix`.
    pub fn last_line(&self, prefix: &str) -> Option<String> {
        self.lines().into_iter().rfind(|l| l.starts_with(prefix))
    }

    /// Prints the last log line starting with `prefix` (a `drops ` or `stats ` line) after
    /// `label`, and asserts that it counts no packet that failed authentication
    /// (`MacFailed`) or decoding (`BadPayload`).
    pub fn assert_no_bad_packets(&self, label: &str, prefix: &str) {
        let line = self
            .last_line(prefix)
            .unwrap_or_else(|| prefix.trim_end().to_owned());
        println!("{label} {line}");
        assert!(
            !line.contains("MacFailed") && !line.contains("BadPayload"),
            "{label} dropped packets: {line}"
        );
    }

    /// The value of `key=` in `line` (`key=value` words).
    pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A one-bridge topology for interop tests: hosts at `198.18.<net>.1..` and a planet of our
/// own whose one root is at the first host, port 9993. No host has a route out.
pub struct Lab {
    /// The namespaces and the processes started in them.
    pub t: Topology,
    /// The hosts, in the order they were named.
    pub hosts: Vec<Host>,
    /// Homes, logs and the planet file.
    pub dir: tempfile::TempDir,
    /// The serialized planet.
    pub planet: Vec<u8>,
    /// The planet, as a file.
    pub planet_file: PathBuf,
    net: u8,
}

impl Lab {
    /// Hosts `names` on subnet `198.18.<net>.0/24` and a planet whose root is `root_id`.
    pub fn new(net: u8, names: &[&str], root_id: &flatwire_vl1::Identity) -> Lab {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut t = Topology::new().expect("topology");
        let mut sw = t.switch("sw").expect("switch");
        let mut hosts = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let h = t.host(n).expect("host");
            t.plug(&mut sw, &h, &format!("198.18.{net}.{}/24", i + 1))
                .expect("plug");
            hosts.push(h);
        }
        let endpoint: std::net::SocketAddr =
            format!("198.18.{net}.1:9993").parse().expect("endpoint");
        let planet = crate::zt_planet!(root_id, endpoint);
        let planet_file = dir.path().join("planet");
        std::fs::write(&planet_file, &planet).expect("write the planet");
        Lab {
            t,
            hosts,
            dir,
            planet,
            planet_file,
            net,
        }
    }

    /// The underlay address of host `i`.
    pub fn ip(&self, i: usize) -> String {
        format!("198.18.{}.{}", self.net, i + 1)
    }

    /// Starts `zerotier-one` on host `i` with identity `id` (home `dir/name`).
    pub fn zt(&mut self, i: usize, name: &str, bin: &Path, id: &flatwire_vl1::Identity) -> ZtNode {
        let home = self.dir.path().join(name);
        let host = self.hosts[i].clone();
        let ip = self.ip(i);
        let planet = self.planet.clone();
        let z = ZtNode::start(
            &mut self.t,
            &host,
            bin,
            &home,
            &ip,
            &planet,
            ZtOptions {
                identity: Some((
                    id.to_secret_string().expect("an identity with its secret"),
                    id.to_string(),
                )),
                ..ZtOptions::default()
            },
        );
        assert_eq!(z.address, id.address().to_string());
        z
    }
}

/// How to start a [`ZtNode`].
#[derive(Default)]
pub struct ZtOptions {
    /// Identity as (secret text, public text); `None` lets ZeroTier One generate one.
    pub identity: Option<(String, String)>,
    /// `local.conf`'s `physical` object (`null` for none).
    pub physical: serde_json::Value,
    /// Extra `settings` keys merged into `local.conf`.
    pub settings: serde_json::Value,
}

/// A `zerotier-one` process with its home directory.
pub struct ZtNode {
    /// Its namespace.
    pub host: Host,
    /// Its home (`-U` home: identity, planet, local.conf, networks.d, controller.d).
    pub home: PathBuf,
    /// The binary (also used as `zerotier-cli` with `-q`).
    pub bin: PathBuf,
    /// Its VL1 address.
    pub address: String,
}

impl ZtNode {
    /// Starts ZeroTier One with `planet`, bound only to `ip` in `host`, and waits until its
    /// local API answers. Files the caller put in `home` beforehand are kept.
    pub fn start(
        t: &mut Topology,
        host: &Host,
        bin: &Path,
        home: &Path,
        ip: &str,
        planet: &[u8],
        opts: ZtOptions,
    ) -> ZtNode {
        std::fs::create_dir_all(home).unwrap();
        std::fs::write(home.join("planet"), planet).unwrap();
        let mut settings = serde_json::json!({
            "primaryPort": 9993,
            "portMappingEnabled": false,
            "allowTcpFallbackRelay": false,
            "allowSecondaryPort": false,
            "bind": [ip],
            "softwareUpdate": "disable",
            "allowManagementFrom": ["127.0.0.1/32"]
        });
        if let (Some(s), Some(extra)) = (settings.as_object_mut(), opts.settings.as_object()) {
            for (k, v) in extra {
                s.insert(k.clone(), v.clone());
            }
        }
        let physical = if opts.physical.is_null() {
            serde_json::json!({})
        } else {
            opts.physical
        };
        let conf = serde_json::json!({ "physical": physical, "settings": settings });
        std::fs::write(home.join("local.conf"), conf.to_string()).unwrap();
        if let Some((secret, public)) = &opts.identity {
            std::fs::write(home.join("identity.secret"), secret).unwrap();
            std::fs::write(home.join("identity.public"), public).unwrap();
        }
        let log = home.join("out.log");
        let cmd = format!(
            "exec {} -U {} >{} 2>&1",
            bin.display(),
            home.display(),
            log.display()
        );
        t.spawn(host, "sh", &["-c", &cmd]).unwrap();
        let public = home.join("identity.public");
        let address = wait_for(
            "zerotier-one has an identity",
            60,
            || tail(&log, 20),
            || {
                let p = read(&public);
                (p.len() >= 10).then(|| p[..10].to_owned())
            },
        );
        let z = ZtNode {
            host: host.clone(),
            home: home.to_owned(),
            bin: bin.to_owned(),
            address,
        };
        wait_for(
            "zerotier-one answers its local API",
            60,
            || z.diag(),
            || z.cli(&["info"]).ok(),
        );
        z
    }

    /// Runs `zerotier-cli -j args` against this node; its JSON answer.
    pub fn cli(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = self
            .host
            .command(&self.bin)
            .arg("-q")
            .arg(format!("-D{}", self.home.display()))
            .arg("-j")
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Calls the local JSON API (`GET` without a body, `POST` with one) at `path` (for
    /// example `/controller/network/<nwid>`), inside the node's namespace.
    pub fn api(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let port = read(&self.home.join("zerotier-one.port")).trim().to_owned();
        let port = port.parse().unwrap_or(9993);
        let method = if body.is_some() { "POST" } else { "GET" };
        local_api(&self.host, &self.home, port, method, path, body)
    }

    /// `listpeers`.
    pub fn peers(&self) -> Vec<serde_json::Value> {
        self.cli(&["listpeers"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// One peer of `listpeers`.
    pub fn peer(&self, address: &str) -> Option<serde_json::Value> {
        self.peers()
            .into_iter()
            .find(|p| p["address"].as_str() == Some(address))
    }

    /// The local API's `/network/<nwid>` object, if the node has joined it.
    pub fn network(&self, nwid: &str) -> Option<serde_json::Value> {
        self.api(&format!("/network/{nwid}"), None)
            .ok()
            .filter(|v| v["id"].as_str() == Some(nwid))
    }

    /// The last lines of its log and its peers, for failure messages.
    pub fn diag(&self) -> String {
        format!(
            "{}\n--- peers of {}: {}",
            tail(&self.home.join("out.log"), 20),
            self.address,
            serde_json::Value::Array(self.peers())
        )
    }

    /// Waits until `peer` is listed with an active direct path at `ip` and a measured
    /// latency (so an OK to one of this node's HELLO/ECHO probes came back).
    pub fn wait_peer(&self, what: &str, peer: &str, ip: &str, secs: u64) -> serde_json::Value {
        wait_for(
            what,
            secs,
            || self.diag(),
            || {
                let p = self.peer(peer)?;
                let has_path = p["paths"].as_array()?.iter().any(|x| {
                    x["active"].as_bool() == Some(true)
                        && x["address"]
                            .as_str()
                            .is_some_and(|a| a.starts_with(&format!("{ip}/")))
                });
                (has_path && p["latency"].as_i64().is_some_and(|l| l >= 0)).then_some(p)
            },
        )
    }
}

/// Calls a ZeroTier-style local JSON API (ZeroTier One's or `flatwire-agent`'s) on
/// `127.0.0.1:port` inside `host` with `method`, authenticated with the token in
/// `home/authtoken.secret`; the JSON answer of a 2xx reply, else an error with the status and
/// body.
pub fn local_api(
    host: &Host,
    home: &Path,
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let token = read(&home.join("authtoken.secret")).trim().to_owned();
    let mut cmd = host.command("curl");
    cmd.args([
        "-sS",
        "--fail-with-body",
        "--max-time",
        "10",
        "-X",
        method,
        "-H",
    ])
    .arg(format!("X-ZT1-Auth: {token}"));
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d"])
            .arg(b.to_string());
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "curl {method} {path}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}
