//! The measurements themselves: `iperf3` and `ping` runs in namespaces and the `/proc` and
//! kernel counters read around them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flatwire_tests::netns::Host;
use flatwire_tests::planet::{Planet, Tcp};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use serde_json::Value;

/// Runs `iperf3` with `streams` parallel TCP streams for `seconds`: the server in `server`
/// (port `port`), the client in `client` sending to `to`.
pub fn iperf(
    planet: &Planet,
    server: &Host,
    client: &Host,
    to: IpAddr,
    streams: u32,
    seconds: u32,
    port: u16,
) -> Result<Tcp> {
    planet
        .iperf_report(server, client, to, port, streams, seconds)?
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("iperf3 -c {to} -P {streams}"))
}

/// Round-trip times of one `ping` run, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rtt {
    /// Replies received.
    pub samples: usize,
    /// Echo requests sent.
    pub sent: u32,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

impl Rtt {
    /// The figures of round trips `us` (microseconds, not empty) of `sent` tries.
    fn from_samples(mut us: Vec<f64>, sent: u32) -> Self {
        us.sort_by(f64::total_cmp);
        Self {
            samples: us.len(),
            sent,
            p50_us: percentile(&us, 50.0),
            p99_us: percentile(&us, 99.0),
        }
    }
}

/// Pings `to` from `from` `count` times, 10 ms apart (after 5 unmeasured warm-up echoes
/// that fill neighbour tables and caches).
pub fn ping(from: &Host, to: IpAddr, count: u32) -> Result<Rtt> {
    let target = to.to_string();
    // Warm-up: replies are not required (the measured run says whether the path works).
    let _ = from.run(
        "ping",
        &["-n", "-q", "-c", "5", "-i", "0.01", "-W", "1", &target],
    );
    let deadline = (count / 50 + 5).to_string();
    let out = from
        .command("ping")
        .args(["-n", "-c", &count.to_string(), "-i", "0.01", "-W", "1"])
        .args(["-w", &deadline, &target])
        .stdin(Stdio::null())
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let us = parse_ping_times(&text);
    if us.is_empty() {
        bail!(
            "no ping reply from {to} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Rtt::from_samples(us, count))
}

/// Round trips of a one-byte UDP echo between two threads over loopback, `count` times
/// 10 ms apart as [`ping`] (after 5 unmeasured ones), the client thread on CPU `cpus[0]` and
/// the echo thread on `cpus[1]` (maybe the same). Both threads sleep in between, so each
/// round trip wakes two sleeping threads: what a user-space hop in a path costs on this
/// machine at least, whatever the hop does.
pub fn wakeup_echo(count: u32, cpus: [usize; 2]) -> Result<Rtt> {
    let echo = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the echo socket")?;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the client")?;
    client.connect(echo.local_addr()?)?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let pin = move |i: usize| -> Result<()> {
        let mut set = CpuSet::new();
        set.set(cpus[i])
            .and_then(|()| sched_setaffinity(Pid::from_raw(0), &set))
            .with_context(|| format!("pinning a thread to CPU {}", cpus[i]))
    };
    // An empty datagram ends the echo thread.
    let server = std::thread::spawn(move || -> Result<()> {
        pin(1)?;
        let mut b = [0u8; 1];
        loop {
            let (n, from) = echo.recv_from(&mut b)?;
            if n == 0 {
                return Ok(());
            }
            echo.send_to(&b[..n], from)?;
        }
    });
    let run = move || -> Result<Vec<f64>> {
        let ran = pin(0).and_then(|()| {
            let (mut us, mut b) = (Vec::with_capacity(count as usize), [0u8; 1]);
            for i in 0..count + 5 {
                std::thread::sleep(Duration::from_millis(10));
                let start = Instant::now();
                client.send(&[1])?;
                client.recv(&mut b).context("no echo within 1 s")?;
                if i >= 5 {
                    us.push(start.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(us)
        });
        client.send(&[])?;
        ran
    };
    let us = std::thread::spawn(run)
        .join()
        .map_err(|_| anyhow::anyhow!("the echo client panicked"))?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?
        .context("echo thread")?;
    Ok(Rtt::from_samples(us?, count))
}

/// The CPUs this process may run on (none if the mask cannot be read).
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// The `time=0.053 ms` of every reply line, in microseconds.
fn parse_ping_times(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let t = l.split_whitespace().find_map(|w| w.strip_prefix("time="))?;
            t.parse::<f64>().ok().map(|ms| ms * 1000.0)
        })
        .collect()
}

/// The nearest-rank percentile `p` of sorted, non-empty `sorted`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time of a process and of its data-plane threads, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    /// utime + stime of the whole process.
    pub process: f64,
    /// utime + stime of the data-plane threads (`flatwire-dp`, `flatwire-dp1`, ...).
    pub dataplane: f64,
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            process: self.process + o.process,
            dataplane: self.dataplane + o.dataplane,
        }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            process: self.process - o.process,
            dataplane: self.dataplane - o.dataplane,
        }
    }
}

/// utime + stime (seconds) from a `/proc/.../stat` line.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the parenthesised command name: state is field 3; utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The CPU time `pid` (and its data-plane threads) used so far.
pub fn cpu(pid: u32) -> Result<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let process = stat_cpu_seconds(&stat).context("unreadable /proc/<pid>/stat")?;
    let dataplane = dataplane_threads(pid)?.iter().map(|(_, s)| s).sum();
    Ok(Cpu { process, dataplane })
}

/// The CPU seconds each data-plane thread of `pid` (`flatwire-dp`, `flatwire-dp1`, ...) used
/// so far, by thread name, sorted.
pub fn dataplane_threads(pid: u32) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm.starts_with("flatwire-dp") {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            out.push((comm.to_owned(), stat_cpu_seconds(&stat).unwrap_or(0.0)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Resident memory of `pid` (`VmRSS`), in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss(&status).context("no VmRSS in /proc/<pid>/status")
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The PID of the `flatwire-agent` process running in `host`'s namespace.
pub fn agent_pid(host: &Host) -> Result<u32> {
    let pids = flatwire_tests::netns::run_checked(std::process::Command::new("ip").args([
        "netns",
        "pids",
        host.ns(),
    ]))?;
    String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|e| e.file_name().map(|n| n == "flatwire-agent"))
                .unwrap_or(false)
        })
        .with_context(|| format!("no flatwire-agent process in namespace {}", host.ns()))
}

/// Waits (at most `limit`) until the processes `pids` together use less than 2% of a core
/// over a second (agents fill their identity pools after start). Returns how long it took,
/// or their CPU share (percent) over the last second when they did not settle.
pub fn settle(pids: &[u32], limit: Duration) -> Result<Duration, f64> {
    let start = std::time::Instant::now();
    let total = || -> f64 {
        pids.iter()
            .filter_map(|p| cpu(*p).ok())
            .map(|c| c.process)
            .sum()
    };
    let mut last = total();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = total();
        let busy = now - last;
        if busy < 0.02 {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            return Err(100.0 * busy);
        }
        last = now;
    }
}

/// The machine's 1-minute load average (other work on a shared machine skews every figure).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Kernel counters of one namespace that tell where packets were lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// UDP datagrams delivered to sockets.
    pub udp_in_datagrams: u64,
    /// UDP datagrams dropped because the socket's receive buffer was full.
    pub udp_rcvbuf_errors: u64,
    /// UDP datagrams the socket could not send because its buffer was full.
    pub udp_sndbuf_errors: u64,
    /// Frames the kernel dropped on the TAP (`tx_dropped`: the agent did not read in time).
    pub tap_tx_dropped: u64,
    /// Frames written to the TAP that the kernel dropped (`rx_dropped`).
    pub tap_rx_dropped: u64,
}

impl Counters {
    /// Reads the counters of `host`'s namespace (TAP `tap`).
    pub fn read(host: &Host, tap: &str) -> Result<Self> {
        let snmp = host.run("cat", &["/proc/net/snmp"])?;
        let udp = parse_snmp(&String::from_utf8_lossy(&snmp.stdout), "Udp");
        let link = host.run("ip", &["-j", "-s", "link", "show", "dev", tap])?;
        let v: Value = serde_json::from_slice(&link.stdout).context("ip -j -s link")?;
        let stats = &v[0]["stats64"];
        Ok(Self {
            udp_in_datagrams: udp.get("InDatagrams").copied().unwrap_or(0),
            udp_rcvbuf_errors: udp.get("RcvbufErrors").copied().unwrap_or(0),
            udp_sndbuf_errors: udp.get("SndbufErrors").copied().unwrap_or(0),
            tap_tx_dropped: stats["tx"]["dropped"].as_u64().unwrap_or(0),
            tap_rx_dropped: stats["rx"]["dropped"].as_u64().unwrap_or(0),
        })
    }

    /// Share of arriving UDP datagrams the full receive buffer dropped, in percent.
    pub fn udp_loss_percent(&self) -> Option<f64> {
        let arrived = self.udp_in_datagrams + self.udp_rcvbuf_errors;
        (arrived > 0).then(|| 100.0 * self.udp_rcvbuf_errors as f64 / arrived as f64)
    }

    /// What grew from `before` to `self`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            udp_in_datagrams: self
                .udp_in_datagrams
                .saturating_sub(before.udp_in_datagrams),
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(before.udp_rcvbuf_errors),
            udp_sndbuf_errors: self
                .udp_sndbuf_errors
                .saturating_sub(before.udp_sndbuf_errors),
            tap_tx_dropped: self.tap_tx_dropped.saturating_sub(before.tap_tx_dropped),
            tap_rx_dropped: self.tap_rx_dropped.saturating_sub(before.tap_rx_dropped),
        }
    }
}

/// The name/value pairs of protocol `proto` in a `/proc/net/snmp` text (a header line of
/// names followed by a line of values).
fn parse_snmp(text: &str, proto: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// The `flatwire_drops_total{reason="..."}` counters of a metrics text, by reason.
pub fn drops(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("flatwire_drops_total{reason=\"")?;
            let (reason, value) = rest.split_once("\"}")?;
            Some((reason.to_owned(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// What grew from `before` to `after` (reasons that did not grow are left out).
pub fn drops_since(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(r, n)| {
            let d = n.saturating_sub(before.get(r).copied().unwrap_or(0));
            (d > 0).then(|| (r.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatwire_tests::planet::parse_iperf;

    #[test]
    fn the_wake_up_echo_times_every_round_trip_and_refuses_a_cpu_it_may_not_use() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "this process runs on some CPU");
        let r = wakeup_echo(10, [cpus[0], cpus[cpus.len() - 1]]).unwrap();
        assert_eq!((r.samples, r.sent), (10, 10));
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
        let err = wakeup_echo(10, [cpus[0], CpuSet::count()]).unwrap_err();
        assert!(format!("{err:#}").contains("CPU"), "{err:#}");
    }

    #[test]
    fn iperf_reports_parse() {
        let v: Value = serde_json::from_str(
            r#"{"end": {"sum_sent": {"bytes": 1000, "retransmits": 7},
                        "sum_received": {"bytes": 900, "bits_per_second": 2.5e9}}}"#,
        )
        .unwrap();
        assert_eq!(
            parse_iperf(&v).unwrap(),
            Tcp {
                gbps: 2.5,
                bytes: 900,
                retransmits: 7
            }
        );
        let err: Value = serde_json::from_str(r#"{"error": "unable to connect"}"#).unwrap();
        assert!(parse_iperf(&err).unwrap_err().contains("unable"));
    }

    #[test]
    fn ping_times_and_percentiles() {
        let out = "PING 198.18.0.11 (198.18.0.11) 56(84) bytes of data.\n\
                   64 bytes from 198.18.0.11: icmp_seq=1 ttl=64 time=0.045 ms\n\
                   64 bytes from 198.18.0.11: icmp_seq=2 ttl=64 time=0.101 ms\n\
                   64 bytes from 198.18.0.11: icmp_seq=3 ttl=64 time=1.20 ms\n\
                   rtt min/avg/max/mdev = 0.045/0.448/1.20/0.5 ms\n";
        let mut t = parse_ping_times(out);
        t.sort_by(f64::total_cmp);
        assert_eq!(t.len(), 3);
        assert!((t[0] - 45.0).abs() < 1e-9);
        assert!((percentile(&t, 50.0) - 101.0).abs() < 1e-9);
        assert!((percentile(&t, 99.0) - 1200.0).abs() < 1e-9);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), 50.0);
        assert_eq!(percentile(&hundred, 99.0), 99.0);
    }

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (flatwire (dp)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(stat_cpu_seconds(stat), Some(300.0 / clock_ticks()));
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t   12345 kB\n"),
            Some(12345 * 1024)
        );
        let snmp = "Udp: InDatagrams RcvbufErrors SndbufErrors\nUdp: 9 3 1\n";
        let m = parse_snmp(snmp, "Udp");
        assert_eq!(m["RcvbufErrors"], 3);
        assert_eq!(m["SndbufErrors"], 1);
        let c = Counters {
            udp_in_datagrams: 9,
            udp_rcvbuf_errors: 3,
            ..Counters::default()
        };
        assert_eq!(c.udp_loss_percent(), Some(25.0));
        assert_eq!(Counters::default().udp_loss_percent(), None);
    }

    #[test]
    fn drop_counters_parse_and_subtract() {
        let before = drops("flatwire_drops_total{reason=\"Duplicate\"} 2\n");
        let after = drops(
            "# TYPE x counter\nflatwire_drops_total{reason=\"Duplicate\"} 5\n\
             flatwire_drops_total{reason=\"TapRejected\"} 1\nflatwire_peers 3\n",
        );
        let d = drops_since(&before, &after);
        assert_eq!(d.len(), 2);
        assert_eq!(d["Duplicate"], 3);
        assert_eq!(d["TapRejected"], 1);
    }
}
