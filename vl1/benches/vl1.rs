//! VL1 benchmarks: identity generation, packet armor/dearmor against raw Salsa20/12 +
//! Poly1305 on the same buffers, and packets through two sans-I/O nodes.
//!
//! Criterion prints its usual per-benchmark lines (wall time, short measurement windows so
//! the whole run stays under three minutes). The closing table is measured separately in
//! thread-CPU time (`/proc/thread-self/schedstat`, wall time where that is missing) with
//! the variants interleaved, so the ratios compare like with like on a shared machine.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use flatwire_vl1::crypto::{self, CipherSuite, SymmetricKey};
use flatwire_vl1::identity;
use flatwire_vl1::wire::{self, Verb};
use flatwire_vl1::world::{Root, World, WorldType};
use flatwire_vl1::{Address, Identity, LocalSocket, Node, NodeConfig};
use poly1305::Poly1305;
use poly1305::universal_hash::{KeyInit, UniversalHash};
use salsa20::Salsa12;
use salsa20::cipher::{KeyIvInit, StreamCipher};

const SIZES: [usize; 2] = [1400, 2800];

fn key() -> SymmetricKey {
    let mut k = [0u8; 48];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(29).wrapping_add(7);
    }
    SymmetricKey::new(k)
}

fn packet(len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(13)).collect();
    p[13] = 0x01;
    p[18] = 0;
    p[27] = Verb::FRAME.0;
    p
}

/// Raw Poly1305 as fast as the stock crate goes: whole blocks through `update`, the tail
/// through `compute_unpadded`.
fn raw_poly(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    let (blocks, tail) = poly1305::Block::slice_as_chunks(data);
    let mut p = Poly1305::new(key.into());
    p.update(blocks);
    p.compute_unpadded(tail).into()
}

/// Raw Salsa20/12 + Poly1305 seal then open of `data` (the work of armor + dearmor
/// without ZeroTier's header handling).
fn raw_seal_open(key: &[u8; 32], nonce: &[u8; 8], data: &mut [u8]) -> bool {
    let mut s = Salsa12::new(key.into(), nonce.into());
    let mut block0 = [0u8; 64];
    s.apply_keystream(&mut block0);
    s.apply_keystream(data);
    let tag = raw_poly(block0[..32].try_into().unwrap(), data);
    let mut s = Salsa12::new(key.into(), nonce.into());
    let mut block0 = [0u8; 64];
    s.apply_keystream(&mut block0);
    let ok = raw_poly(block0[..32].try_into().unwrap(), data) == tag;
    s.apply_keystream(data);
    ok
}

fn armor_dearmor(p: &mut [u8], k: &SymmetricKey, suite: CipherSuite) {
    crypto::armor(p, k, suite).unwrap();
    crypto::dearmor(p, k).unwrap();
}

/// Two nodes on one thread: `a` is the planet's root, `b` a member. Datagrams are handed
/// across in memory.
struct Pair {
    a: Node,
    b: Node,
    a_addr: Address,
    b_addr: Address,
    now: u64,
}

const A_SOCK: &str = "192.0.2.1:9993";
const B_SOCK: &str = "192.0.2.2:9993";

impl Pair {
    fn new() -> Pair {
        let cancel = AtomicBool::new(false);
        let ia = Identity::generate(&cancel).unwrap();
        let ib = Identity::generate(&cancel).unwrap();
        let (pk, sk) = identity::generate_key_pair().unwrap();
        let roots = vec![Root {
            identity: ia.to_public(),
            stable_endpoints: vec![A_SOCK.parse().unwrap()],
        }];
        let planet = World::create(WorldType::Planet, 1, 1, pk, roots, &sk).unwrap();
        let mut p = Pair {
            a_addr: ia.address(),
            b_addr: ib.address(),
            a: Node::new(NodeConfig::new(planet.clone()), vec![ia]).unwrap(),
            b: Node::new(NodeConfig::new(planet), vec![ib]).unwrap(),
            now: 1000,
        };
        for _ in 0..20 {
            p.now += 500;
            p.a.handle_timeout(p.now);
            p.b.handle_timeout(p.now);
            p.pump();
        }
        assert!(p.a.knows_peer(p.a_addr, p.b_addr), "nodes did not meet");
        p
    }

    /// Delivers datagrams both ways until both nodes are quiet; returns how many
    /// `Packet` events were raised.
    fn pump(&mut self) -> u64 {
        let (a_sock, b_sock): (SocketAddr, SocketAddr) =
            (A_SOCK.parse().unwrap(), B_SOCK.parse().unwrap());
        let mut delivered = 0;
        let mut buf = vec![0u8; flatwire_vl1::node::MAX_DATAGRAM_LEN];
        loop {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit(&mut buf) {
                if t.to == b_sock {
                    self.b
                        .handle_datagram(self.now, LocalSocket(0), a_sock, &buf[..t.len]);
                }
                moved = true;
            }
            while let Some(t) = self.b.poll_transmit(&mut buf) {
                if t.to == a_sock {
                    self.a
                        .handle_datagram(self.now, LocalSocket(0), b_sock, &buf[..t.len]);
                }
                moved = true;
            }
            for n in [&mut self.a, &mut self.b] {
                while let Some(e) = n.poll_event() {
                    if matches!(e, flatwire_vl1::Event::Packet { .. }) {
                        delivered += 1;
                    }
                }
            }
            if !moved {
                return delivered;
            }
        }
    }

    /// One FRAME each way; returns the packets delivered.
    fn ping_pong(&mut self, payload: &[u8]) -> u64 {
        self.a
            .send(self.now, self.a_addr, self.b_addr, Verb::FRAME, payload)
            .unwrap();
        self.b
            .send(self.now, self.b_addr, self.a_addr, Verb::FRAME, payload)
            .unwrap();
        self.pump()
    }
}

fn frame_payload(len: usize) -> Vec<u8> {
    // Incompressible bytes (xorshift), as encrypted-inside traffic mostly is.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn criterion_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("identity");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(3));
    let cancel = AtomicBool::new(false);
    g.bench_function("generate", |b| {
        b.iter(|| Identity::generate(&cancel).unwrap())
    });
    g.finish();

    let k = key();
    let raw_key: [u8; 32] = k.as_bytes()[..32].try_into().unwrap();
    let mut g = c.benchmark_group("armor+dearmor");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut p = packet(size);
        g.bench_function(BenchmarkId::new("suite1", size), |b| {
            b.iter(|| armor_dearmor(black_box(&mut p), &k, CipherSuite::Poly1305Salsa2012))
        });
        g.bench_function(BenchmarkId::new("suite3", size), |b| {
            b.iter(|| armor_dearmor(black_box(&mut p), &k, CipherSuite::AesGmacSiv))
        });
        g.bench_function(BenchmarkId::new("raw-salsa12-poly1305", size), |b| {
            b.iter(|| raw_seal_open(&raw_key, &[7; 8], black_box(&mut p[wire::HEADER_LEN - 1..])))
        });
    }
    g.finish();

    let mut pair = Pair::new();
    let payload = frame_payload(1400);
    let mut g = c.benchmark_group("two-node-loop");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(2));
    g.bench_function("frame-1400-ping-pong", |b| {
        b.iter(|| assert_eq!(pair.ping_pong(&payload), 2))
    });
    g.finish();
}

/// CPU time consumed by this thread, in ns (wall time where the kernel does not say).
fn thread_cpu_ns(wall_start: Instant) -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| wall_start.elapsed().as_nanos() as u64)
}

/// Runs `f` in batches of `batch` calls until `budget` of thread-CPU time is spent;
/// returns ns per call.
fn cpu_ns_per_call(budget: Duration, batch: u64, mut f: impl FnMut()) -> f64 {
    let wall = Instant::now();
    let start = thread_cpu_ns(wall);
    let mut calls = 0u64;
    loop {
        for _ in 0..batch {
            f();
        }
        calls += batch;
        let spent = thread_cpu_ns(wall) - start;
        if spent >= budget.as_nanos() as u64 {
            return spent as f64 / calls as f64;
        }
    }
}

fn gbit(bytes: usize, ns: f64) -> f64 {
    bytes as f64 * 8.0 / ns
}

fn summary() {
    println!(
        "\nSummary (thread-CPU time, one core; armor figures are armor+dearmor of one packet)"
    );
    let cancel = AtomicBool::new(false);
    let id_ns = cpu_ns_per_call(Duration::from_secs(3), 1, || {
        black_box(Identity::generate(&cancel).unwrap());
    });
    let id_per_s = 1e9 / id_ns;
    // Generation tries a geometric number of keys (about 15), so its rate is noisy; the
    // memory-hard hash rate behind it is steady and gives the expected rate.
    let public = [7u8; identity::PUBLIC_KEY_LEN];
    let hash_ns = cpu_ns_per_call(Duration::from_secs(1), 1, || {
        black_box(identity::memory_hard_digest(black_box(&public)));
    });
    let hashes_per_s = 1e9 / hash_ns;

    let k = key();
    let raw_key: [u8; 32] = k.as_bytes()[..32].try_into().unwrap();
    let mut rows = Vec::new();
    for size in SIZES {
        let mut p = packet(size);
        let (mut s1, mut s3, mut raw) = (0.0, 0.0, 0.0);
        // Interleave the variants in rounds so drift on the shared machine hits all alike.
        for _ in 0..5 {
            let budget = Duration::from_millis(150);
            s1 += cpu_ns_per_call(budget, 16, || {
                armor_dearmor(black_box(&mut p), &k, CipherSuite::Poly1305Salsa2012)
            });
            s3 += cpu_ns_per_call(budget, 16, || {
                armor_dearmor(black_box(&mut p), &k, CipherSuite::AesGmacSiv)
            });
            raw += cpu_ns_per_call(budget, 16, || {
                black_box(raw_seal_open(
                    &raw_key,
                    &[7; 8],
                    black_box(&mut p[wire::HEADER_LEN - 1..]),
                ));
            });
        }
        rows.push((size, s1 / 5.0, s3 / 5.0, raw / 5.0));
    }

    // Incompressible frames (most tunnelled traffic is encrypted) and compressible ones
    // (text), interleaved.
    let mut pair = Pair::new();
    let payload = frame_payload(1400);
    let text: Vec<u8> = b"GET /index.html HTTP/1.1\r\nHost: example\r\n"
        .iter()
        .copied()
        .cycle()
        .take(1400)
        .collect();
    let (mut pp_ns, mut text_ns) = (0.0, 0.0);
    for _ in 0..4 {
        pp_ns += cpu_ns_per_call(Duration::from_millis(500), 16, || {
            assert_eq!(pair.ping_pong(&payload), 2);
        });
        text_ns += cpu_ns_per_call(Duration::from_millis(500), 16, || {
            assert_eq!(pair.ping_pong(&text), 2);
        });
    }
    let pps = 2.0 * 1e9 / (pp_ns / 4.0);
    let text_pps = 2.0 * 1e9 / (text_ns / 4.0);

    println!("{:<52} {:>14}", "measure", "value");
    println!("{:-<52} {:->14}", "", "");
    println!(
        "{:<52} {:>14.1}",
        "identity generations / s (measured)", id_per_s
    );
    println!("{:<52} {:>14.1}", "memory-hard hashes / s", hashes_per_s);
    println!(
        "{:<52} {:>14.1}",
        "identity generations / s (expected: hashes x 17/256)",
        hashes_per_s * 17.0 / 256.0
    );
    for (size, s1, s3, raw) in rows {
        println!(
            "{:<52} {:>9.2} Gb/s  ({:.2} µs)",
            format!("suite 1 Salsa20/12+Poly1305, {size} B"),
            gbit(size, s1),
            s1 / 1e3
        );
        println!(
            "{:<52} {:>9.2} Gb/s  ({:.2} µs)",
            format!("suite 3 AES-GMAC-SIV, {size} B"),
            gbit(size, s3),
            s3 / 1e3
        );
        println!(
            "{:<52} {:>9.2} Gb/s  ({:.2} µs)",
            format!("raw Salsa20/12+Poly1305, {size} B"),
            gbit(size - wire::HEADER_LEN + 1, raw),
            raw / 1e3
        );
        println!(
            "{:<52} {:>13.0}%  (target >= 85%)",
            format!("suite 1 / raw, {size} B"),
            100.0 * raw / s1
        );
        println!(
            "{:<52} {:>13.0}%",
            format!("suite 3 / raw, {size} B"),
            100.0 * raw / s3
        );
    }
    println!(
        "{:<52} {:>14.0}",
        "two-node loop packets / s (1,400 B FRAME)", pps
    );
    println!(
        "{:<52} {:>14.0}",
        "two-node loop packets / s (1,400 B text FRAME)", text_pps
    );
}

criterion_group!(benches, criterion_benches);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` only smoke-tests the above.
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
