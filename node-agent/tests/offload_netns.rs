//! TAP offloads over real agents in network namespaces (needs root): two members of one
//! network exchange TCP over the overlay while their kernels hand the agents TSO superframes
//! (`IFF_VNET_HDR`, `TUN_F_TSO4`); the agents split them ([`flatwire_agent::offload`]) and
//! merge the segments they receive into superframes again for their TAP writes; the bytes
//! arrive intact both ways over IPv4 and over IPv6 (link-local), iperf3 runs, and the agents'
//! metrics count the superframes they split (which only exist when the offload is on) and the
//! ones they wrote, several segments each, with no TAP write refused.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flatwire_agent::networks::tap_name;
use flatwire_agent::offload::OffloadDrop;
use flatwire_agent::tap::{self, TapError};
use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::planet::ping_in;

mod common;

use common::{
    TwoMemberLab, assert_root, lan_hosts, metric, scrape, start_agent, start_controller, wait_ipv4,
};

/// Bytes sent each way in the checked transfer.
const TRANSFER: usize = 24 << 20;
const PORT: u16 = 7001;
const IPERF_PORT: u16 = 7002;
const SUPERFRAMES: &str = "flatwire_tap_superframes_total";
const SEGMENTS: &str = "flatwire_tap_segments_total";
const COALESCED_WRITES: &str = "flatwire_tap_coalesced_writes_total";
const COALESCED_FRAMES: &str = "flatwire_tap_coalesced_frames_total";

/// The byte at stream position `p`: depends on the position, so a lost, repeated or
/// reordered byte shows.
fn pattern(p: usize) -> u8 {
    (p.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (p >> 16) as u8
}

/// Writes [`TRANSFER`] pattern bytes to `s` in large writes (the kernel makes superframes of
/// them).
fn send_pattern(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0;
    while sent < TRANSFER {
        let n = buf.len().min(TRANSFER - sent);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(sent + i);
        }
        s.write_all(&buf[..n])?;
        sent += n;
    }
    Ok(())
}

/// Reads [`TRANSFER`] bytes from `s`; returns the position of the first byte that is not
/// the pattern's (`None`: all intact).
fn check_pattern(s: &mut TcpStream) -> std::io::Result<Option<usize>> {
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    while got < TRANSFER {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream ended after {got} of {TRANSFER} bytes"),
            ));
        }
        if let Some(i) = (0..n).find(|i| buf[*i] != pattern(got + i)) {
            return Ok(Some(got + i));
        }
        got += n;
    }
    Ok(None)
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TapError {
    move |source| TapError::Io { what, source }
}

/// Sends the pattern from `client` to a server in `server` at `to` (bound there, connected to
/// from `client`), which checks it and sends it back to be checked; returns where each
/// direction first went wrong (`None`: intact).
fn transfer_both_ways(client: &Host, server: &Host, to: SocketAddr) -> [Option<usize>; 2] {
    let addr = to;
    let timeout = Some(Duration::from_secs(60));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_ns = PathBuf::from(server.netns_path());
    let srv = std::thread::spawn(move || {
        tap::in_netns(&server_ns, move || {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, addr.port()).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, addr.port()).into(),
            };
            let l = TcpListener::bind(any).map_err(io("bind the server"))?;
            let _ = ready_tx.send(());
            let (mut s, _) = l.accept().map_err(io("accept"))?;
            s.set_read_timeout(timeout).map_err(io("set timeout"))?;
            let bad = check_pattern(&mut s).map_err(io("receive at the server"))?;
            send_pattern(&mut s).map_err(io("send back"))?;
            s.shutdown(Shutdown::Write).map_err(io("shut down"))?;
            // Wait for the client to finish reading before the socket closes.
            let _ = s.read(&mut [0u8; 1]);
            Ok(bad)
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server never listened");
    let back = tap::in_netns(Path::new(&client.netns_path()), move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(io("connect over the overlay"))?;
        s.set_read_timeout(timeout).map_err(io("set timeout"))?;
        send_pattern(&mut s).map_err(io("send from the client"))?;
        let bad = check_pattern(&mut s).map_err(io("receive at the client"))?;
        s.shutdown(Shutdown::Both).map_err(io("shut down"))?;
        Ok(bad)
    })
    .unwrap();
    let there = srv.join().expect("server thread panicked").unwrap();
    [there, back]
}

/// The IPv6 link-local address the kernel gave link `dev` in `host` (EUI-64 from its MAC) and
/// the link's index there.
fn link_local(host: &Host, dev: &str) -> (Ipv6Addr, u32) {
    let dev = dev.to_string();
    let info = tap::in_netns(Path::new(&host.netns_path()), move || {
        tap::inspect_link(&dev)
    })
    .unwrap()
    .expect("the TAP is gone");
    let m = info.mac;
    let eui64 = [m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfe, 0x80]);
    a[8..].copy_from_slice(&eui64);
    (a.into(), info.ifindex)
}

/// Checks, for each of `hosts`, that the agent merged the TCP segments it received since
/// `before` (its [`coalesced_counts`] then) into superframes, at least 4 per write on
/// average, and dropped nothing on its TAP.
fn assert_coalesced(hosts: &[Host], before: &[(f64, f64)], what: &str) {
    // Metrics are published every second: wait for a publication after the transfer.
    std::thread::sleep(Duration::from_millis(1200));
    for (h, (w0, f0)) in hosts.iter().zip(before) {
        let (w, f) = wait_more(h, coalesced_counts, *w0);
        let (w, f) = (w - w0, f - f0);
        eprintln!(
            "{what}: {}: {w} superframes written, merged from {f} received frames ({:.1} per write)",
            h.name(),
            f / w
        );
        assert!(
            w > 0.0,
            "{what}: {}: no received segments were merged",
            h.name()
        );
        assert!(
            f >= 4.0 * w,
            "{what}: {}: {f} frames in {w} superframes: fewer than 4 per write",
            h.name()
        );
        let m = scrape(h);
        let reasons = OffloadDrop::ALL.map(OffloadDrop::name);
        for r in reasons.into_iter().chain([tap::TOO_LONG, "TapRejected"]) {
            let series = format!("flatwire_drops_total{{reason=\"{r}\"}}");
            assert_eq!(metric(&m, &series), 0.0, "{}: {series}", h.name());
        }
    }
}

/// Superframes and segments the agent in `host` has split.
fn split_counts(host: &Host) -> (f64, f64) {
    let m = scrape(host);
    (metric(&m, SUPERFRAMES), metric(&m, SEGMENTS))
}

/// Superframes the agent in `host` has written to its TAP and the frames merged into them.
fn coalesced_counts(host: &Host) -> (f64, f64) {
    let m = scrape(host);
    (metric(&m, COALESCED_WRITES), metric(&m, COALESCED_FRAMES))
}

/// Waits (at most 5 s: metrics are published periodically) until `counts` of the agent in
/// `host` shows more than `before` in its first count; returns the counts.
fn wait_more(host: &Host, counts: fn(&Host) -> (f64, f64), before: f64) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = counts(host);
        if c.0 > before || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tcp_superframes_are_split_and_cross_the_overlay_intact() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let hosts = lan_hosts(&mut topo, &["ctl", "m1", "m2"]);
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| -> PathBuf { dir.path().join(n) };
    let lab = TwoMemberLab::write(dir.path(), 0x00_0001, "10.77.0");
    let (planet_file, nwid) = (lab.planet.clone(), lab.nwid);
    let planet_arg = planet_file.to_str().unwrap();
    let nwid_arg = nwid.to_string();

    let mut ctl = start_controller(&hosts[0], &home("ctl"), &planet_file);
    let mut members: Vec<_> = ["m1", "m2"]
        .iter()
        .zip(&hosts[1..])
        .map(|(n, h)| {
            start_agent(
                h,
                &home(n),
                &home(n).join("agent.sock"),
                &["--planet", planet_arg, "--join", &nwid_arg],
            )
        })
        .collect();
    let tap = tap_name(nwid);
    let limit = Duration::from_secs(30);
    let ip1 = wait_ipv4(&hosts[1], &tap, &mut members[0], limit);
    let ip2 = wait_ipv4(&hosts[2], &tap, &mut members[1], limit);
    let r = ping_in(&hosts[1], ip2.into(), 3);
    assert!(r.ok, "ping {ip1} -> {ip2} failed:\n{}", r.output);
    let before = [split_counts(&hosts[1]), split_counts(&hosts[2])];
    let written_before = [coalesced_counts(&hosts[1]), coalesced_counts(&hosts[2])];

    let t = Instant::now();
    let bad = transfer_both_ways(&hosts[1], &hosts[2], (ip2, PORT).into());
    eprintln!(
        "{} MiB each way over the overlay in {:?}",
        TRANSFER >> 20,
        t.elapsed()
    );
    assert_eq!(
        bad,
        [None, None],
        "first wrong byte per direction (m1 -> m2, m2 -> m1)"
    );
    // Both senders' kernels handed over superframes, and the agents split them; both
    // receiving agents merged the segments into superframes again, several per write.
    for (h, (sf0, _)) in hosts[1..].iter().zip(before) {
        let (sf, seg) = wait_more(h, split_counts, sf0);
        eprintln!("{}: {sf} superframes split into {seg} frames", h.name());
        assert!(sf > sf0, "{}: no TSO superframe was split", h.name());
        assert!(seg > sf, "{}: superframes of one segment only", h.name());
    }
    assert_coalesced(&hosts[1..], &written_before, "IPv4");

    // The same over IPv6, between the TAPs' link-local addresses.
    let (ll2, _) = link_local(&hosts[2], &tap);
    let (_, scope) = link_local(&hosts[1], &tap);
    let written_before = [coalesced_counts(&hosts[1]), coalesced_counts(&hosts[2])];
    let to = SocketAddrV6::new(ll2, PORT + 10, 0, scope);
    let bad = transfer_both_ways(&hosts[1], &hosts[2], to.into());
    assert_eq!(bad, [None, None], "IPv6: first wrong byte per direction");
    assert_coalesced(&hosts[1..], &written_before, "IPv6");

    let (sf0, _) = split_counts(&hosts[1]);
    let mbit = hosts[1]
        .iperf3_mbit(&hosts[2], &ip2.to_string(), IPERF_PORT, 3, false)
        .unwrap();
    let (sf, seg) = wait_more(&hosts[1], split_counts, sf0);
    eprintln!(
        "iperf3 m1 -> m2 over the overlay: {mbit:.0} Mbit/s, {} superframes split into {} frames",
        sf - sf0,
        seg
    );
    assert!(sf > sf0, "iperf3 sent no superframe");
    assert!(mbit > 10.0, "iperf3 over the overlay: {mbit} Mbit/s");
    for p in members.iter_mut().chain([&mut ctl]) {
        assert!(p.try_status().is_none(), "{} exited", p.name());
    }
}
