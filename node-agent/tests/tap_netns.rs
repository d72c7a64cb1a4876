//! Real TAP devices created inside a real network namespace (needs root).
//!
//! The namespace is named `fw-<pid>-agent-...` and removed by a Drop guard, also on panic.
//! Only 198.18.0.0/15 addresses are used, and only inside the namespace.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flatwire_agent::tap::{
    IpPrefix, LinkRoute, LinkState, Tap, TapConfig, TapError, configure_link, in_netns,
};

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(suffix: &str) -> Self {
        let name = format!("fw-{}-agent-{suffix}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Self { name }
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }
    fn read(&self, what: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", what])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

const POD_MAC: [u8; 6] = [0x32, 0x5a, 0x10, 0x20, 0x30, 0x40];
const NEIGHBOUR_MAC: [u8; 6] = [0x32, 0x5a, 0x99, 0x88, 0x77, 0x66];

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The reply the neighbour `ip` (only reachable through the TAP) sends to `frame`, if any.
fn answer(frame: &[u8], ip: Ipv4Addr, seen: &mut (usize, usize)) -> Option<Vec<u8>> {
    if frame.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let src_mac = &frame[6..12];
    let p = &frame[14..];
    match ethertype {
        0x0806 if p.len() >= 28 && p[6..8] == [0, 1] && p[24..28] == ip.octets() => {
            // ARP request for the neighbour: reply with its MAC.
            seen.0 += 1;
            let mut r = Vec::with_capacity(42);
            r.extend_from_slice(src_mac);
            r.extend_from_slice(&NEIGHBOUR_MAC);
            r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
            r.extend_from_slice(&NEIGHBOUR_MAC);
            r.extend_from_slice(&ip.octets());
            r.extend_from_slice(&p[8..14]); // requester MAC
            r.extend_from_slice(&p[14..18]); // requester IP
            Some(r)
        }
        0x0800 if p.len() >= 28 && p[9] == 1 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if p[16..20] != ip.octets() || total > p.len() || ihl < 20 || p[ihl] != 8 {
                return None;
            }
            // ICMP echo request to the neighbour: echo reply.
            seen.1 += 1;
            let mut ipp = p[..total].to_vec();
            let (s, d) = (ipp[12..16].to_vec(), ipp[16..20].to_vec());
            ipp[12..16].copy_from_slice(&d);
            ipp[16..20].copy_from_slice(&s);
            ipp[8] = 64;
            ipp[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&ipp[..ihl]);
            ipp[10..12].copy_from_slice(&c.to_be_bytes());
            ipp[ihl] = 0;
            ipp[ihl + 2..ihl + 4].copy_from_slice(&[0, 0]);
            let c = checksum(&ipp[ihl..]);
            ipp[ihl + 2..ihl + 4].copy_from_slice(&c.to_be_bytes());
            let mut r = Vec::with_capacity(14 + total);
            r.extend_from_slice(src_mac);
            r.extend_from_slice(&NEIGHBOUR_MAC);
            r.extend_from_slice(&[0x08, 0x00]);
            r.extend_from_slice(&ipp);
            Some(r)
        }
        _ => None,
    }
}

#[test]
fn tap_in_a_namespace_answers_ping_through_the_fd() {
    assert!(
        is_root(),
        "this test needs root (CAP_NET_ADMIN) to create TAPs and namespaces"
    );
    let ns = Netns::new("tap");
    let x = (std::process::id() % 250) as u8 + 1;
    let pod_ip = Ipv4Addr::new(198, 18, x, 1);
    let neighbour = Ipv4Addr::new(198, 18, x, 2);

    let state = LinkState {
        mtu: 1400,
        addresses: vec![IpPrefix {
            addr: IpAddr::V4(pod_ip),
            len: 24,
        }],
        routes: vec![LinkRoute {
            dst: IpPrefix {
                addr: IpAddr::V4(Ipv4Addr::new(198, 19, x, 0)),
                len: 24,
            },
            gateway: Some(IpAddr::V4(neighbour)),
        }],
    };
    let tap = in_netns(&ns.path(), move || {
        let tap = Tap::create(&TapConfig {
            name: "eth0".into(),
            mac: POD_MAC,
            mtu: 1400,
            queues: 1,
        })?;
        configure_link(tap.ifindex(), &state)?;
        Ok(tap)
    })
    .unwrap();
    assert_eq!(ns.read("/sys/class/net/eth0/address"), "32:5a:10:20:30:40");
    let routes = Command::new("ip")
        .args(["-n", &ns.name, "-4", "route", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains(&format!("198.19.{x}.0/24 via {neighbour}")),
        "{routes}"
    );
    assert_eq!(ns.read("/sys/class/net/eth0/mtu"), "1400");

    let mut ping = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ping", "-c1", "-W1"])
        .arg(neighbour.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let q = &tap.queues()[0];
    let mut bufs = vec![vec![0u8; 1514]; 8];
    let mut lens = [0usize; 8];
    let mut seen = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = ping.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "ping did not finish");
        if q.wait_readable(Some(Duration::from_millis(50))).unwrap() {
            let n = q.recv_batch(&mut bufs, &mut lens).unwrap();
            let replies: Vec<Vec<u8>> = (0..n)
                .filter_map(|i| answer(&bufs[i][..lens[i]], neighbour, &mut seen))
                .collect();
            let out = q.send_batch(&replies).unwrap();
            assert_eq!(out.sent, replies.len());
        }
    };
    assert_eq!(
        seen,
        (1, 1),
        "one ARP request and one echo request through the fd"
    );
    assert!(status.success(), "ping through the TAP fd failed: {status}");
}

#[test]
fn multiqueue_tap_is_made_in_the_namespace_with_all_queues() {
    assert!(is_root(), "this test needs root (CAP_NET_ADMIN)");
    let ns = Netns::new("mq");
    let tap = in_netns(&ns.path(), || {
        Tap::create(&TapConfig {
            name: "net1".into(),
            mac: POD_MAC,
            mtu: 9000,
            queues: 2,
        })
    })
    .unwrap();
    assert_eq!(tap.queues().len(), 2);
    assert_eq!(ns.read("/sys/class/net/net1/mtu"), "9000");
    // IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE.
    let flags = u32::from_str_radix(
        ns.read("/sys/class/net/net1/tun_flags")
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_eq!(flags & 0x0002, 0x0002, "IFF_TAP");
    assert_eq!(flags & 0x0100, 0x0100, "IFF_MULTI_QUEUE");
    // Dropping the fds destroys the device inside the namespace (the kernel tears it down
    // asynchronously, so give it a moment).
    drop(tap);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !ns.read("/sys/class/net/net1/mtu").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "net1 still exists 3 s after its fds were closed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn missing_namespace_is_named_in_the_error() {
    assert!(is_root(), "this test needs root (CAP_NET_ADMIN)");
    let path = PathBuf::from(format!(
        "/var/run/netns/fw-{}-agent-absent",
        std::process::id()
    ));
    let err = in_netns(&path, || {
        Tap::create(&TapConfig {
            name: "eth0".into(),
            mac: POD_MAC,
            mtu: 1500,
            queues: 1,
        })
    })
    .unwrap_err();
    assert!(matches!(err, TapError::Netns { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}
