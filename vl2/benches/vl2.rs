//! VL2 benchmarks: rule evaluation (10 / 100 / 1,024 entries), controller config issue
//! rate and memory per member for a 10,000-member network, and rule compile time for a
//! generated 1,000-line source. Criterion measures wall time (short runs); the table at
//! the end is computed from this thread's CPU time (`/proc/thread-self/schedstat`), so it
//! reads as "per core" on a shared machine, and memory comes from a counting allocator.

use std::alloc::System;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flatwire_vl1::{Address, Identity, identity};
use flatwire_vl2::controller::{
    Controller, ControllerStore, Member, MemoryStore, Network, Pool, RequestOutcome, RouteJson,
    config_payloads,
};
use flatwire_vl2::dictionary::Dictionary;
use flatwire_vl2::rules::eval::{Env, Frame, NoCredentials, RuleHits, Semantics, filter_outbound};
use flatwire_vl2::rules::{Rule, RuleKind, compiler};
use flatwire_vl2::verbs::{SoftwareVersion, request_metadata};
use flatwire_vl2::{Mac, NetworkId};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const MEMBERS: usize = 10_000;
/// Requests timed for the table.
const ISSUE_SAMPLE: u64 = 3000;

/// CPU time of this thread in ns (0 where the kernel does not report it).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `f` `n` times; returns operations per CPU-second (wall time if CPU time is
/// unavailable).
fn per_cpu_second(n: u64, mut f: impl FnMut(u64)) -> f64 {
    let (c0, w0) = (thread_cpu_ns(), std::time::Instant::now());
    for i in 0..n {
        f(i);
    }
    let cpu = thread_cpu_ns().saturating_sub(c0);
    let ns = if cpu > 0 {
        cpu
    } else {
        w0.elapsed().as_nanos() as u64
    };
    n as f64 * 1e9 / ns.max(1) as f64
}

/// `n` rule entries: non-matching `ipdest /32` + DROP pairs, then `ethertype ipv4` +
/// ACCEPT, so every entry is evaluated.
fn rule_set(n: usize) -> Vec<Rule> {
    let body = n.saturating_sub(2);
    let mut v = Vec::with_capacity(n);
    for i in 0..(body / 2) as u32 {
        v.push(Rule::new(RuleKind::Ipv4Dest(
            Ipv4Addr::from(0x0ac8_0000 + i),
            32,
        )));
        v.push(Rule::new(RuleKind::Drop));
    }
    if body % 2 == 1 {
        v.push(Rule::new(RuleKind::FrameSizeRange(0, 65535)));
    }
    v.push(Rule::new(RuleKind::Ethertype(0x0800)));
    v.push(Rule::new(RuleKind::Accept));
    v
}

fn udp_payload() -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0x05, 0x78, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&[10, 9, 0, 4, 10, 9, 0, 5]);
    ip.extend_from_slice(&[0x0f, 0xa0, 0x13, 0x88, 0x05, 0x64, 0, 0]);
    ip.resize(1400, 0xab);
    ip
}

/// Runs the outbound filter on one frame; counts the decision in `hits` when given (what a
/// member does for every frame).
fn eval_once(
    rules: &[Rule],
    payload: &[u8],
    rnd: &mut dyn FnMut() -> u32,
    hits: Option<&mut RuleHits>,
) -> u8 {
    let nwid = NetworkId::from(0x8056_c2e2_1c00_0001);
    let frame = Frame {
        source_mac: Mac::from_address(Address::new(0x1122334455).unwrap_or_default(), nwid),
        dest_mac: Mac::from_address(Address::new(0x2233445566).unwrap_or_default(), nwid),
        ethertype: 0x0800,
        vlan_id: 0,
        payload,
    };
    let mut env = Env {
        own_address: Address::new(0x1122334455).unwrap_or_default(),
        config_flags: 0,
        credentials: &NoCredentials,
        random: rnd,
        semantics: Semantics::V1_14,
    };
    let d = filter_outbound(rules, [], false, 0x2233445566, &frame, &mut env);
    if let Some(h) = hits {
        h.record(false, &d);
    }
    d.accept
}

struct Lab {
    ctl: Controller<MemoryStore>,
    members: Vec<Identity>,
    nwid: NetworkId,
    md: Dictionary,
    store_bytes_per_member: f64,
}

fn lab() -> Lab {
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let cid = Identity::generate(&cancel).expect("controller identity");
    let nwid = NetworkId::new(cid.address(), 1);
    let (pk, _) = identity::generate_key_pair().expect("key pair");
    let members: Vec<Identity> = (0..MEMBERS as u64)
        .filter_map(|i| {
            Identity::from_public_parts(Address::new(0x10_0000_0000 + i).ok()?, pk).ok()
        })
        .collect();
    let src = (0..20)
        .map(|i| format!("drop ipdest 10.1.{i}.0/24 dport 1000-2000;\n"))
        .collect::<String>()
        + "accept;\n";
    let compiled = compiler::compile(&src).expect("rules");
    let cli = compiled.to_cli_json().to_value();
    let mut n = Network::new(nwid, 0);
    n.private = true;
    n.ip_assignment_pools = vec![Pool {
        ip_range_start: "10.0.0.1".into(),
        ip_range_end: "10.0.255.254".into(),
    }];
    n.routes = vec![RouteJson {
        target: "10.0.0.0/16".into(),
        via: None,
    }];
    n.v4_assign_mode.zt = true;
    n.rules = cli["config"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut store = MemoryStore::default();
    store.put_network(&mut n).expect("network");
    let region = Region::new(GLOBAL);
    for (i, id) in members.iter().enumerate() {
        let mut m = Member::new(nwid, id.address(), 0);
        m.authorized = true;
        m.identity = Some(id.to_string());
        m.tags = vec![(1, (i % 3) as u64)];
        m.ip_assignments = vec![Ipv4Addr::from(0x0a00_0001 + i as u32).to_string()];
        store.put_member(&mut m).expect("member");
    }
    let st = region.change();
    let store_bytes_per_member =
        (st.bytes_allocated as f64 - st.bytes_deallocated as f64) / MEMBERS as f64;
    Lab {
        ctl: Controller::new(cid, store),
        members,
        nwid,
        md: request_metadata(
            SoftwareVersion {
                major: 1,
                minor: 14,
                revision: 1,
            },
            Some("linux/x86_64"),
        ),
        store_bytes_per_member,
    }
}

/// One config request served end to end: authorization, config build, dictionary
/// encoding and signing of the chunks.
fn issue(lab: &mut Lab, i: u64) -> usize {
    let who = &lab.members[(i as usize) % lab.members.len()];
    let now = 10_000 + (i / lab.members.len() as u64) as i64 * 2000;
    let mut rnd = || i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    match lab
        .ctl
        .handle_request(lab.nwid, who, &lab.md, i + 1, now, &mut rnd)
    {
        Ok(RequestOutcome::Config(cfg)) => {
            config_payloads(lab.ctl.identity(), &cfg, Some(i), i | 1)
                .map(|v| v.len())
                .unwrap_or(0)
        }
        _ => 0,
    }
}

fn compile_source() -> String {
    let mut s = String::from("tag role\n  id 1\n  enum 10 web\n  enum 20 db\n  enum 30 ops\n;\n");
    let mut lines = 6;
    let mut i = 0u32;
    while lines < 999 {
        s += &format!(
            "drop ipdest 10.{}.{}.0/24 dport {}-{} tseq role web;\n",
            (i >> 8) & 255,
            i & 255,
            1000 + i % 5000,
            2000 + i % 5000
        );
        lines += 1;
        i += 1;
    }
    s += "accept;\n";
    s
}

fn benches(c: &mut Criterion) {
    let payload = udp_payload();
    let mut seed = 1u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        seed
    };
    let mut g = c.benchmark_group("rule_eval");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 100, 1024] {
        let rules = rule_set(n);
        assert_eq!(rules.len(), n);
        assert_eq!(
            eval_once(&rules, &payload, &mut rnd, None),
            1,
            "frame accepted"
        );
        g.bench_with_input(BenchmarkId::from_parameter(n), &rules, |b, r| {
            b.iter(|| eval_once(black_box(r), black_box(&payload), &mut rnd, None))
        });
    }
    g.finish();

    let mut l = lab();
    assert!(issue(&mut l, 0) > 0, "a config is issued");
    // One counter across criterion's calls, so each request is a new one (the
    // controller ignores a member's repeats within 1 s).
    let mut i = 1u64;
    c.bench_function("controller_issue_10k", |b| {
        b.iter(|| {
            i += 1;
            issue(&mut l, i)
        })
    });
    let src = compile_source();
    assert_eq!(src.lines().count(), 1000);
    c.bench_function("rule_compile_1000_lines", |b| {
        b.iter(|| compiler::compile(black_box(&src)).map(|c| c.rules.len()))
    });

    // The table, from CPU time.
    println!();
    println!("| measurement | value |");
    println!("| --- | --- |");
    for n in [10usize, 100, 1024] {
        let rules = rule_set(n);
        let iters = (20_000_000 / n as u64).clamp(20_000, 2_000_000);
        let r = per_cpu_second(iters, |_| {
            black_box(eval_once(&rules, &payload, &mut rnd, None));
        });
        println!("| rule evaluation, {n} entries | {r:.0} frames/s per core |");
        let mut hits = RuleHits::default();
        let rc = per_cpu_second(iters, |_| {
            black_box(eval_once(&rules, &payload, &mut rnd, Some(&mut hits)));
        });
        assert_eq!(
            hits.get(false, flatwire_vl2::rules::eval::RuleAction::Accept),
            iters
        );
        println!(
            "| rule evaluation + hit counters, {n} entries | {rc:.0} frames/s per core ({:+.1}%) |",
            (rc / r - 1.0) * 100.0
        );
    }
    let mut l = lab();
    let base = Region::new(GLOBAL);
    // Bridges and assigned IPs come from the store's indexes (O(log members) a
    // request); most of the time is signing.
    let r = per_cpu_second(ISSUE_SAMPLE, |i| {
        black_box(issue(&mut l, i));
    });
    let after = base.change();
    let ctl_state =
        (after.bytes_allocated as f64 - after.bytes_deallocated as f64) / ISSUE_SAMPLE as f64;
    println!("| controller config issue, {MEMBERS} members | {r:.0} requests/s per core |");
    println!(
        "| controller memory per member | {:.0} B store + {:.0} B request state |",
        l.store_bytes_per_member, ctl_state
    );
    let r = per_cpu_second(20, |_| {
        black_box(compiler::compile(&src).map(|c| c.rules.len()).ok());
    });
    println!("| rule compile, 1,000-line source | {:.2} ms |", 1000.0 / r);
}

criterion_group! {
    name = vl2;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(10);
    targets = benches
}
criterion_main!(vl2);
