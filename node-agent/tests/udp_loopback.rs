//! Batched UDP over loopback only (127.0.0.1 and [::1]).

use std::collections::HashSet;
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use flatwire_agent::udp::{
    GSO_MAX_BYTES, RecvMeta, Transmit, UdpPort, coalesce, dual_stack_any, segments,
};

const MAX_PAYLOAD: usize = 1500;

/// A payload that names its sender and sequence number, of a length that varies with `seq`.
fn payload(sender: u8, seq: u32) -> Vec<u8> {
    let len = 16 + (seq as usize * 7) % 900;
    let mut p = vec![sender; len];
    p[..4].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Receives until `want` datagrams arrived; returns (source, payload) pairs.
fn recv_n(port: &UdpPort, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
    let caps = port.capabilities();
    let slots = caps.recv_batch.max(1);
    let mut storage = vec![vec![0u8; caps.recv_buffer_len(MAX_PAYLOAD)]; slots];
    let mut metas = vec![RecvMeta::default(); slots];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want {
        assert!(
            Instant::now() < deadline,
            "only {} of {want} arrived",
            got.len()
        );
        if !port
            .wait_readable(Some(Duration::from_millis(200)))
            .unwrap()
        {
            continue;
        }
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = port.recv_batch(&mut bufs, &mut metas).unwrap();
        for (m, buf) in metas[..n].iter().zip(storage.iter()) {
            for d in segments(buf, m) {
                got.push((m.addr, d.to_vec()));
            }
        }
    }
    got
}

#[test]
fn thousand_datagrams_in_batches_over_v4_and_v6_loopback() {
    let rx = UdpPort::bind(dual_stack_any(0)).unwrap();
    rx.set_recv_buffer_size(4 << 20).unwrap();
    let caps = rx.capabilities();
    assert!(caps.dual_stack);
    eprintln!("udp capabilities: {caps:?}");
    let port = rx.local_addr().unwrap().port();

    let tx4 = UdpPort::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let tx6 = UdpPort::bind((Ipv6Addr::LOCALHOST, 0).into()).unwrap();
    let to4: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let to6: SocketAddr = (Ipv6Addr::LOCALHOST, port).into();
    let from4 = tx4.local_addr().unwrap();
    let from6 = tx6.local_addr().unwrap();

    let mut expected = HashSet::new();
    let mut received = HashSet::new();
    const BATCH: u32 = 50;
    for batch in 0..10u32 {
        for (sender, tx, to, from) in [(4u8, &tx4, to4, from4), (6u8, &tx6, to6, from6)] {
            let payloads: Vec<Vec<u8>> = (batch * BATCH..(batch + 1) * BATCH)
                .map(|seq| payload(sender, seq))
                .collect();
            let transmits: Vec<Transmit<'_>> = payloads
                .iter()
                .map(|p| Transmit {
                    destination: to,
                    ecn: None,
                    contents: p,
                    segment_size: None,
                    src_ip: None,
                })
                .collect();
            let out = tx.send_batch(&transmits).unwrap();
            assert_eq!((out.sent, out.rejected), (BATCH as usize, 0));
            for p in payloads {
                expected.insert((from, p));
            }
            for (src, d) in recv_n(&rx, BATCH as usize) {
                // Sources are canonical: the IPv4 sender shows as 127.0.0.1, not ::ffff:.
                assert_eq!(src, from, "source of a datagram from sender {sender}");
                assert!(received.insert((src, d)), "duplicate datagram");
            }
        }
    }
    assert_eq!(received.len(), 1000);
    assert_eq!(received, expected);

    // Back through the dual-stack socket to both families in one sendmmsg batch.
    let a = payload(9, 1);
    let b = payload(9, 2);
    let back = [
        Transmit {
            destination: from4,
            ecn: None,
            contents: &a,
            segment_size: None,
            src_ip: None,
        },
        Transmit {
            destination: from6,
            ecn: None,
            contents: &b,
            segment_size: None,
            src_ip: None,
        },
    ];
    assert_eq!(rx.send_batch(&back).unwrap().sent, 2);
    assert_eq!(recv_n(&tx4, 1), [((Ipv4Addr::LOCALHOST, port).into(), a)]);
    assert_eq!(recv_n(&tx6, 1), [((Ipv6Addr::LOCALHOST, port).into(), b)]);
}

#[test]
fn segmented_transmit_arrives_as_separate_datagrams() {
    let rx = UdpPort::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let tx = UdpPort::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    eprintln!("sender capabilities: {:?}", tx.capabilities());
    // 10 segments of 100 bytes and a short 40-byte tail.
    let contents: Vec<u8> = (0..1040u32).map(|i| (i / 100) as u8).collect();
    let t = Transmit {
        destination: rx.local_addr().unwrap(),
        ecn: None,
        contents: &contents,
        segment_size: Some(100),
        src_ip: None,
    };
    let out = tx.send_batch(&[t]).unwrap();
    assert_eq!((out.sent, out.rejected), (1, 0));
    let got = recv_n(&rx, 11);
    assert_eq!(got.len(), 11);
    for (i, (src, d)) in got.iter().enumerate() {
        assert_eq!(*src, tx.local_addr().unwrap());
        let want = if i == 10 { 40 } else { 100 };
        assert_eq!(d.len(), want, "segment {i}");
        assert!(d.iter().all(|&b| b == i as u8), "segment {i} contents");
    }
}

/// The `(segments, segment size)` of each transmit.
fn shape(ts: &[Transmit<'_>]) -> Vec<(usize, usize)> {
    ts.iter()
        .map(|t| {
            let seg = t.segment_size.unwrap_or(t.contents.len());
            (t.contents.len().div_ceil(seg), seg)
        })
        .collect()
}

#[test]
fn equal_sized_runs_to_one_peer_coalesce_into_gso_sends() {
    let rx_a = UdpPort::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let rx_b = UdpPort::bind((Ipv6Addr::LOCALHOST, 0).into()).unwrap();
    let tx = UdpPort::bind(dual_stack_any(0)).unwrap();
    let (a, b) = (rx_a.local_addr().unwrap(), rx_b.local_addr().unwrap());
    // Five of 1400 and a shorter last to a; three of 1400 to b; 7 to a; one of 90 to a.
    let lens = [
        (1400, a),
        (1400, a),
        (1400, a),
        (1400, a),
        (1400, a),
        (1399, a),
        (1400, b),
        (1400, b),
        (1400, b),
        (7, a),
        (90, a),
    ];
    let mut buf = Vec::new();
    for (k, (len, _)) in lens.iter().enumerate() {
        buf.extend(std::iter::repeat_n(k as u8, *len));
    }
    let mut ts = Vec::new();
    coalesce(&buf, &lens, 64, |_| (), &mut ts);
    assert_eq!(shape(&ts), [(6, 1400), (3, 1400), (1, 7), (1, 90)]);
    // A run longer than the kernel takes is cut; a shorter datagram ends a run.
    ts.clear();
    coalesce(&buf, &lens, 4, |_| (), &mut ts);
    assert_eq!(
        shape(&ts),
        [(4, 1400), (2, 1400), (3, 1400), (1, 7), (1, 90)]
    );
    // Datagrams of different keys never share a run.
    ts.clear();
    coalesce(&buf, &lens, 64, |d| d[0] / 3, &mut ts);
    assert_eq!(
        shape(&ts),
        [(3, 1400), (3, 1400), (3, 1400), (1, 7), (1, 90)]
    );
    // A run never exceeds what one UDP datagram can carry.
    let many = vec![(1400, a); 100];
    let big = vec![0u8; 1400 * 100];
    ts.clear();
    coalesce(&big, &many, 64, |_| (), &mut ts);
    assert!(ts.iter().all(|t| t.contents.len() <= GSO_MAX_BYTES));
    assert_eq!(
        ts.iter().map(|t| t.contents.len()).sum::<usize>(),
        1400 * 100
    );
    assert_eq!(ts[0].contents.len(), 1400 * (GSO_MAX_BYTES / 1400));

    // Sent for real (GSO where the kernel has it, split otherwise): every datagram arrives
    // whole, in order, at its own destination.
    ts.clear();
    coalesce(&buf, &lens, tx.capabilities().gso_segments, |_| (), &mut ts);
    let out = tx.send_batch(&ts).unwrap();
    assert_eq!((out.sent, out.rejected), (ts.len(), 0));
    let at_a: Vec<Vec<u8>> = recv_n(&rx_a, 8).into_iter().map(|(_, d)| d).collect();
    let at_b: Vec<Vec<u8>> = recv_n(&rx_b, 3).into_iter().map(|(_, d)| d).collect();
    for (k, (len, to)) in lens.iter().enumerate() {
        let want = vec![k as u8; *len];
        let got = if *to == a { &at_a } else { &at_b };
        assert!(got.contains(&want), "datagram {k} ({len} bytes)");
    }
    let order: Vec<u8> = at_a.iter().map(|d| d[0]).collect();
    assert_eq!(order, [0, 1, 2, 3, 4, 5, 9, 10]);
}

#[test]
fn refused_destination_is_counted_not_fatal() {
    let tx = UdpPort::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let rx = UdpPort::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let p = payload(1, 1);
    // An IPv6 destination on an IPv4 socket is refused by the kernel; the next one still goes.
    let ts = [
        Transmit {
            destination: (Ipv6Addr::LOCALHOST, 9).into(),
            ecn: None,
            contents: &p,
            segment_size: None,
            src_ip: None,
        },
        Transmit {
            destination: rx.local_addr().unwrap(),
            ecn: None,
            contents: &p,
            segment_size: None,
            src_ip: None,
        },
    ];
    let out = tx.send_batch(&ts).unwrap();
    assert_eq!((out.sent, out.rejected), (1, 1));
    assert!(out.last_error.is_some());
    assert_eq!(recv_n(&rx, 1)[0].1, p);
}

/// Reads a `net.core` sysctl (bytes).
fn core_sysctl(name: &str) -> usize {
    let path = format!("/proc/sys/net/core/{name}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn socket_buffers_are_sized_at_bind() {
    use flatwire_agent::udp::SOCKET_BUFFER;
    let port = UdpPort::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let (rcv, snd) = port.buffer_sizes().unwrap();
    // With CAP_NET_ADMIN (root) the forced size holds; without, the kernel caps the plain
    // option at the sysctl limit (and reports twice what it keeps).
    let root = nix::unistd::geteuid().is_root();
    let want = |limit: &str| {
        if root {
            SOCKET_BUFFER
        } else {
            SOCKET_BUFFER.min(core_sysctl(limit))
        }
    };
    assert!(rcv >= want("rmem_max"), "receive buffer {rcv} bytes");
    assert!(snd >= want("wmem_max"), "send buffer {snd} bytes");
    // Far above the kernel default (212992 bytes reported) on a root run.
    if root {
        assert!(
            rcv >= 2 * SOCKET_BUFFER,
            "forced receive buffer {rcv} bytes"
        );
    }
}

/// The data-plane threads' socket group: every datagram reaches the socket of the thread that
/// owns its destination address (the kernel runs the steering program), over IPv4 and IPv6;
/// datagrams too short to name one reach the first socket.
#[test]
fn a_steered_group_delivers_each_datagram_to_the_owner_of_its_destination() {
    use flatwire_agent::shard::{shard_of, steering_program};
    use flatwire_vl1::Address;
    // Its first four bytes say 2 (of 3): the program must pin it to the first socket.
    let host: Address = "0000000201".parse().unwrap();
    for (bind, to) in [
        (
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Ipv4Addr::LOCALHOST.into(),
        ),
        (dual_stack_any(0), Ipv6Addr::LOCALHOST.into()),
    ] {
        let group = UdpPort::bind_group(bind, 3, &steering_program(host, 3)).unwrap();
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr().unwrap().port();
        for p in &group {
            assert_eq!(p.local_addr().unwrap().port(), port, "one port");
        }
        let to = SocketAddr::new(to, port);
        let client = UdpPort::bind(SocketAddr::new(to.ip(), 0)).unwrap();
        // (payload, the socket it must reach)
        let mut sent: Vec<(Vec<u8>, usize)> = Vec::new();
        for i in 0u32..60 {
            let b = i.wrapping_mul(2_654_435_761).to_be_bytes();
            let dest = if i % 10 == 0 {
                host
            } else {
                Address::from_bytes([b[0], b[1], b[2], b[3], i as u8])
            };
            let mut d = vec![0u8; 28 + i as usize];
            d[..4].copy_from_slice(&i.to_be_bytes());
            d[8..13].copy_from_slice(&dest.to_bytes());
            sent.push((d, shard_of(dest, host, 3)));
        }
        // Runts: 4 bytes (a NAT opener) and 12 (one byte short of an address).
        for len in [4, 12] {
            let mut d = vec![0xff; len];
            d[..4].copy_from_slice(&(1000 + len as u32).to_be_bytes());
            sent.push((d, 0));
        }
        let transmits: Vec<Transmit<'_>> = sent
            .iter()
            .map(|(d, _)| Transmit {
                destination: to,
                ecn: None,
                contents: d,
                segment_size: None,
                src_ip: None,
            })
            .collect();
        assert_eq!(client.send_batch(&transmits).unwrap().sent, sent.len());
        for (k, p) in group.iter().enumerate() {
            let want: HashSet<Vec<u8>> = sent
                .iter()
                .filter(|(_, s)| *s == k)
                .map(|(d, _)| d.clone())
                .collect();
            assert!(!want.is_empty(), "socket {k} gets some of them");
            let got: HashSet<Vec<u8>> = recv_n(p, want.len()).into_iter().map(|(_, d)| d).collect();
            assert_eq!(got, want, "socket {k} of {bind}");
            assert!(
                !p.wait_readable(Some(Duration::from_millis(100))).unwrap(),
                "socket {k} got more than its share"
            );
        }
    }
}
