//! Test topologies of network namespaces: hosts, veth links, Linux bridges and NAT routers.
//!
//! Every namespace is named `fw-<pid>-<seq>-<name>` so a run's namespaces are recognisable and
//! a later run can sweep what a killed one left behind. Nothing here ever touches the root
//! namespace's interfaces: links are created directly inside the namespaces they join, the
//! only addresses allowed are from the benchmarking range 198.18.0.0/15 and ULA fd00::/8, and
//! a route may only point at an address this topology handed out. So no namespace can reach
//! off the machine. Dropping the [`Topology`] (also while panicking) ends its processes by PID
//! and deletes its namespaces.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::HarnessError;
use crate::process::{Proc, alive};

/// Prefix of every namespace the harness creates.
pub const NS_PREFIX: &str = "fw-";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace of a topology (a host, a switch or a router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    ns: String,
    name: String,
}

impl Host {
    /// The full namespace name (`fw-<pid>-<seq>-<name>`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The short name given when it was created.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path of the namespace file, as container runtimes pass it (`CNI_NETNS`).
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Runs `program args` inside this namespace; an error carries its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, HarnessError> {
        run_checked(self.command(program).args(args))
    }

    /// Mbit/s received in a `seconds`-long TCP `iperf3` run from this namespace to a server
    /// started in `server` on `port` and reached at `to` (`reverse`: the server sends).
    pub fn iperf3_mbit(
        &self,
        server: &Host,
        to: &str,
        port: u16,
        seconds: u32,
        reverse: bool,
    ) -> Result<f64, HarnessError> {
        let port = port.to_string();
        let mut cmd = server.command("iperf3");
        cmd.args(["-s", "-1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut srv = Proc::spawn(&format!("iperf3 server in {}", server.name), &mut cmd)?;
        let start = std::time::Instant::now();
        while server
            .run("ss", &["-Hltn", &format!("sport = :{port}")])?
            .stdout
            .is_empty()
        {
            if start.elapsed() > std::time::Duration::from_secs(5) {
                return Err(HarnessError::Refused(format!(
                    "iperf3 never listened on {port} in {}",
                    server.name
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let seconds = seconds.to_string();
        let mut args = vec!["-c", to, "-p", &port, "-J", "-t", &seconds];
        args.extend(["--connect-timeout", "2000"]);
        if reverse {
            args.push("-R");
        }
        let out = self.run("iperf3", &args);
        srv.stop();
        let out = out?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|r| r["end"]["sum_received"]["bits_per_second"].as_f64())
            .map(|bps| bps / 1e6)
            .ok_or_else(|| {
                HarnessError::Refused(format!(
                    "iperf3 to {to} gave no throughput: {}",
                    String::from_utf8_lossy(&out.stdout)
                ))
            })
    }

    /// The first IPv4 address on interface `dev` in this namespace, if any.
    pub fn ipv4_on(&self, dev: &str) -> Option<std::net::Ipv4Addr> {
        let out = self
            .run("ip", &["-4", "-o", "addr", "show", "dev", dev])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let word = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)?;
        word.split('/').next()?.parse().ok()
    }
}

/// A Linux bridge living in a namespace of its own (a switch hosts can be plugged into).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    host: Host,
    ports: u32,
}

impl Switch {
    /// The namespace the bridge lives in.
    pub fn host(&self) -> &Host {
        &self.host
    }
}

/// How a NAT router rewrites outbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// iptables MASQUERADE: endpoint-independent where the kernel can keep the source port.
    Masquerade,
    /// MASQUERADE `--random-fully`: every flow gets a random port (a symmetric NAT).
    Symmetric,
}

/// A set of namespaces and the processes running in them, torn down on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    links: HashMap<String, u32>,
    addresses: Vec<IpAddr>,
}

impl Topology {
    /// Starts an empty topology with a fresh per-run prefix; sweeps namespaces of dead runs.
    pub fn new() -> Result<Self, HarnessError> {
        sweep_stale()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            prefix: format!("{NS_PREFIX}{}-{seq}-", std::process::id()),
            namespaces: Vec::new(),
            procs: Vec::new(),
            links: HashMap::new(),
            addresses: Vec::new(),
        })
    }

    /// The prefix every namespace of this topology carries.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of the namespaces created so far.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// PIDs of the processes started in this topology that are still tracked.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// Creates a namespace `name` with its loopback up and IPv6 DAD off.
    pub fn host(&mut self, name: &str) -> Result<Host, HarnessError> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(HarnessError::Refused(format!(
                "namespace name {name:?} must be letters, digits and '-'"
            )));
        }
        let ns = format!("{}{name}", self.prefix);
        run_checked(Command::new("ip").args(["netns", "add", &ns]))?;
        self.namespaces.push(ns.clone());
        let host = Host {
            ns,
            name: name.to_owned(),
        };
        ip(&host, &["link", "set", "lo", "up"])?;
        write_sysctl(&host, "net/ipv6/conf/all/accept_dad", "0")?;
        write_sysctl(&host, "net/ipv6/conf/default/accept_dad", "0")?;
        Ok(host)
    }

    /// Creates a switch: a namespace holding a Linux bridge `br0` that is up.
    pub fn switch(&mut self, name: &str) -> Result<Switch, HarnessError> {
        let host = self.host(name)?;
        ip(&host, &["link", "add", "br0", "type", "bridge"])?;
        ip(&host, &["link", "set", "br0", "up"])?;
        Ok(Switch { host, ports: 0 })
    }

    /// Links two namespaces with a veth pair, giving each end an address (`addr/prefix`).
    /// Returns the interface names (`ethN` on each side).
    pub fn link(
        &mut self,
        a: &Host,
        a_addr: &str,
        b: &Host,
        b_addr: &str,
    ) -> Result<(String, String), HarnessError> {
        let a_if = self.next_if(a, "eth");
        let b_if = self.next_if(b, "eth");
        self.veth(a, &a_if, b, &b_if)?;
        self.address(a, &a_if, a_addr)?;
        self.address(b, &b_if, b_addr)?;
        Ok((a_if, b_if))
    }

    /// Plugs `host` into `switch` with a veth whose host end gets `addr` (`addr/prefix`).
    /// Returns the host's interface name.
    pub fn plug(
        &mut self,
        switch: &mut Switch,
        host: &Host,
        addr: &str,
    ) -> Result<String, HarnessError> {
        let host_if = self.next_if(host, "eth");
        let port = format!("p{}", switch.ports);
        switch.ports += 1;
        self.veth(host, &host_if, &switch.host, &port)?;
        ip(&switch.host, &["link", "set", &port, "master", "br0"])?;
        self.address(host, &host_if, addr)?;
        Ok(host_if)
    }

    /// Adds another address (`addr/prefix`) to an interface the topology created.
    pub fn address(&mut self, host: &Host, ifname: &str, addr: &str) -> Result<(), HarnessError> {
        let ip_addr = check_address(addr)?;
        let mut args = vec!["addr", "add", addr, "dev", ifname];
        if ip_addr.is_ipv6() {
            args.push("nodad");
        }
        ip(host, &args)?;
        self.addresses.push(ip_addr);
        Ok(())
    }

    /// Routes `dest` (a prefix, or `default`) from `host` via `gateway`, which must be an
    /// address this topology assigned: a route can never lead off the machine.
    pub fn route(&self, host: &Host, dest: &str, gateway: &str) -> Result<(), HarnessError> {
        let gw: IpAddr = gateway
            .parse()
            .map_err(|_| HarnessError::Refused(format!("gateway {gateway:?} is not an address")))?;
        if !self.addresses.contains(&gw) {
            return Err(HarnessError::Refused(format!(
                "gateway {gw} is not an address of this topology; routes may not leave it"
            )));
        }
        if dest != "default" {
            check_address(dest)?;
        }
        let mut args = vec![];
        if gw.is_ipv6() {
            args.push("-6");
        }
        args.extend(["route", "add", dest, "via", gateway]);
        ip(host, &args)
    }

    /// Turns `host` into a NAT router between `lan` and `wan` (interfaces it has): forwarding
    /// on, and outbound traffic on `wan` rewritten by iptables as `nat` says.
    pub fn nat_router(
        &self,
        host: &Host,
        lan: &str,
        wan: &str,
        nat: Nat,
    ) -> Result<(), HarnessError> {
        write_sysctl(host, "net/ipv4/ip_forward", "1")?;
        let mut rule = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            wan,
            "-j",
            "MASQUERADE",
        ];
        if nat == Nat::Symmetric {
            rule.push("--random-fully");
        }
        host.run("iptables", &rule)?;
        // Only replies come back in from the WAN side; nothing unsolicited is forwarded.
        host.run(
            "iptables",
            &[
                "-A",
                "FORWARD",
                "-i",
                wan,
                "-o",
                lan,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        )?;
        host.run(
            "iptables",
            &["-A", "FORWARD", "-i", wan, "-o", lan, "-j", "DROP"],
        )?;
        Ok(())
    }

    /// Starts `program args` inside `host`; it is ended by PID when the topology drops.
    pub fn spawn(
        &mut self,
        host: &Host,
        program: &str,
        args: &[&str],
    ) -> Result<&mut Proc, HarnessError> {
        let mut cmd = host.command(program);
        cmd.args(args).stdin(Stdio::null());
        let proc = Proc::spawn(&format!("{program} in {}", host.name), &mut cmd)?;
        self.procs.push(proc);
        Ok(self.procs.last_mut().expect("just pushed"))
    }

    /// Ends every process and deletes every namespace (what dropping does, with errors).
    pub fn teardown(&mut self) -> Result<(), HarnessError> {
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
        let mut first_err = None;
        while let Some(ns) = self.namespaces.pop() {
            if let Err(e) = delete_namespace(&ns) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn next_if(&mut self, host: &Host, stem: &str) -> String {
        let n = self.links.entry(host.ns.clone()).or_insert(0);
        let name = format!("{stem}{n}");
        *n += 1;
        name
    }

    fn veth(&self, a: &Host, a_if: &str, b: &Host, b_if: &str) -> Result<(), HarnessError> {
        run_checked(Command::new("ip").args([
            "link", "add", a_if, "netns", &a.ns, "type", "veth", "peer", "name", b_if, "netns",
            &b.ns,
        ]))?;
        ip(a, &["link", "set", a_if, "up"])?;
        ip(b, &["link", "set", b_if, "up"])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("netns harness: teardown: {e}");
        }
    }
}

/// Accepts only the harness's address ranges: 198.18.0.0/15 and fd00::/8 (with a prefix).
fn check_address(addr: &str) -> Result<IpAddr, HarnessError> {
    let (ip, prefix) = addr.split_once('/').unwrap_or((addr, ""));
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| HarnessError::Refused(format!("{addr:?} is not an address")))?;
    if !prefix.is_empty() && prefix.parse::<u8>().is_err() {
        return Err(HarnessError::Refused(format!("{addr:?} has a bad prefix")));
    }
    let inside = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(v6) => v6.octets()[0] == 0xfd,
    };
    if inside {
        Ok(ip)
    } else {
        Err(HarnessError::Refused(format!(
            "{addr} is outside the test ranges 198.18.0.0/15 and fd00::/8"
        )))
    }
}

fn ip(host: &Host, args: &[&str]) -> Result<(), HarnessError> {
    run_checked(Command::new("ip").arg("-n").arg(&host.ns).args(args)).map(drop)
}

fn write_sysctl(host: &Host, key: &str, value: &str) -> Result<(), HarnessError> {
    host.run("sh", &["-c", &format!("echo {value} > /proc/sys/{key}")])
        .map(drop)
}

/// Runs a command, turning a non-zero exit into an error that carries its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<Output, HarnessError> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HarnessError::Spawn {
            what: what.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(HarnessError::Command {
            what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Ends the processes in a namespace of ours, then deletes it.
fn delete_namespace(ns: &str) -> Result<(), HarnessError> {
    if let Ok(out) = run_checked(Command::new("ip").args(["netns", "pids", ns])) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<u32>() {
                crate::process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    run_checked(Command::new("ip").args(["netns", "del", ns])).map(drop)
}

/// Names of the namespaces that carry the harness prefix.
pub fn harness_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(Path::new("/run/netns")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NS_PREFIX))
        .collect();
    names.sort();
    names
}

/// Whether the process that created harness namespace `ns` (`fw-<pid>-...`) still runs.
pub fn owner_alive(ns: &str) -> bool {
    ns.strip_prefix(NS_PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(alive)
}

/// Deletes harness namespaces whose creating process is gone (left by killed runs).
/// Returns the names it removed. Sweeps in this process take turns; a namespace another
/// process removed meanwhile counts as swept.
pub fn sweep_stale() -> Result<Vec<String>, HarnessError> {
    static SWEEP: Mutex<()> = Mutex::new(());
    let _turn = SWEEP.lock().unwrap_or_else(PoisonError::into_inner);
    let mut removed = Vec::new();
    for ns in harness_namespaces() {
        if owner_alive(&ns) {
            continue;
        }
        match delete_namespace(&ns) {
            Ok(()) => {}
            Err(_) if !Path::new("/run/netns").join(&ns).exists() => {}
            Err(e) => return Err(e),
        }
        removed.push(ns);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_test_ranges_are_accepted() {
        for ok in ["198.18.0.1/24", "198.19.255.1", "fd00::1/64", "fdaa:1::2"] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.1/8",
            "192.168.1.1/24",
            "8.8.8.8",
            "2001:db8::1/64",
            "x/24",
            "198.18.0.1/z",
        ] {
            assert!(
                matches!(check_address(bad), Err(HarnessError::Refused(_))),
                "{bad}"
            );
        }
    }
}
