//! VL1 interop with a real ZeroTier One 1.x (`FLATWIRE_ZT_ONE_BIN` = path to `zerotier-one`).
//!
//! Two planets of our own, each in its own namespace topology on one bridge with no route
//! out (198.18.0.0/15 only), so no node can ever see a public root:
//!
//! * `flatwire_root`: the root is our `vl1-node --root`; leaves are our `vl1-node` (E) and a
//!   real `zerotier-one` (Z).
//! * `zerotier_one_root`: the root is a real `zerotier-one` (R) whose identity we generate and
//!   put in the planet; leaves are E and Z as above.
//!
//! In each: HELLO/OK both ways (leaf <-> root and E <-> Z), WHOIS each way through the root
//! (Z joins a network whose controller address is E, which makes Z look E up; E looks Z up
//! when Z's request arrives), ECHO both ways (ours with a payload; ZeroTier One's own probe,
//! triggered by a PUSH_DIRECT_PATHS from E), and USER_MESSAGE both ways: ZeroTier One has no
//! CLI or API to send one, so Z runs as a software-update distributor
//! (`softwareUpdateDist`): E's USER_MESSAGE type 100 `GET_LATEST` request is logged by Z in
//! `update-dist.log` and answered by Z with a USER_MESSAGE type 100 `LATEST`. Fragmented
//! USER_MESSAGEs both ways (an ~8 KB request; a 6 KB `DATA` chunk of the "update"). In the
//! ZeroTier One root scenario E and Z also share a trusted path (suite 2) and exchange
//! USER_MESSAGEs over it. ZeroTier One is checked to bind only UDP 9993 on its namespace
//! address and to know no root but ours.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::zt_planet;
use flatwire_tests::ztlab::{
    self, FwNode, ZtNode, ZtOptions, hex, read, tail, wait_for, zt_bin_or_skip, zt_version,
};
use flatwire_vl1::Identity;

const SKIP: &str = "SKIPPED: set FLATWIRE_ZT_ONE_BIN to a zerotier-one binary to run the ZeroTier One interop test";

/// Builds the `vl1-node` example and returns its path.
fn example_bin() -> std::path::PathBuf {
    ztlab::build_example("flatwire-vl1", "vl1-node")
}

/// The "update" Z distributes: 6000 incompressible bytes, so a chunk of it is a USER_MESSAGE
/// that ZeroTier One must fragment.
fn dist_payload() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..6000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn generate() -> Identity {
    Identity::generate(&AtomicBool::new(false)).expect("generate identity")
}

/// Starts `vl1-node` bound to `bind` with `planet` (as a root with `root`).
#[allow(clippy::too_many_arguments)]
fn start_fw(
    t: &mut Topology,
    host: &Host,
    bin: &Path,
    dir: &Path,
    bind: &str,
    planet: &Path,
    root: bool,
    extra: &[String],
) -> FwNode {
    let mut args = vec![
        "--bind".to_owned(),
        bind.to_owned(),
        "--planet".to_owned(),
        planet.display().to_string(),
    ];
    if root {
        args.push("--root".to_owned());
    }
    args.extend_from_slice(extra);
    FwNode::start(t, host, bin, dir, &args)
}

/// The last value of `key=` on a `stats` line of `node`.
fn stat(node: &FwNode, key: &str) -> u64 {
    node.last_line("stats ")
        .and_then(|l| FwNode::field(&l, key).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Starts ZeroTier One as a software-update distributor of [`dist_payload`] (so that a
/// GET_LATEST USER_MESSAGE gets a LATEST reply), bound only to `ip`.
#[allow(clippy::too_many_arguments)]
fn start_zt(
    t: &mut Topology,
    host: &Host,
    bin: &Path,
    home: &Path,
    ip: &str,
    planet: &[u8],
    identity: Option<&Identity>,
    physical: serde_json::Value,
) -> ZtNode {
    let dist = home.join("update-dist.d");
    std::fs::create_dir_all(&dist).unwrap();
    let bin_path = dist.join("flatwire-interop.bin");
    std::fs::write(&bin_path, dist_payload()).unwrap();
    let sha = Command::new("sha512sum").arg(&bin_path).output().unwrap();
    let hash = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(hash.len(), 128, "sha512sum output");
    let meta = serde_json::json!({
        "vMajor": 99, "vMinor": 0, "vRev": 0, "vBuild": 0,
        "platform": 1, "arch": 2, "vendor": 0,
        "channel": "flatwire-interop", "signer": "flatwire-interop-signer",
        "hash": hash
    });
    std::fs::write(dist.join("flatwire-interop.bin.json"), meta.to_string()).unwrap();
    ZtNode::start(
        t,
        host,
        bin,
        home,
        ip,
        planet,
        ZtOptions {
            identity: identity.map(|id| (id.to_secret_string().unwrap(), id.to_string())),
            physical,
            settings: serde_json::json!({ "softwareUpdateDist": true }),
        },
    )
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RootKind {
    Flatwire,
    ZeroTierOne,
}

fn scenario(kind: RootKind, net: u8) {
    let Some(zt) = zt_bin_or_skip(SKIP) else {
        return;
    };
    let version = zt_version(&zt);
    let fw_bin = example_bin();
    let tag = format!("[{kind:?} root]");
    let pass = |what: &str| println!("PASS {tag} {what}");
    println!("{tag} ZeroTier One version {version}");

    let dir = tempfile::tempdir().unwrap();
    let mut t = Topology::new().unwrap();
    let mut sw = t.switch("sw").unwrap();
    let ip = |h: u8| format!("198.18.{net}.{h}");
    let root_h = t.host("root").unwrap();
    t.plug(&mut sw, &root_h, &format!("{}/24", ip(1))).unwrap();
    let fw_h = t.host("fw").unwrap();
    let fw_if = t.plug(&mut sw, &fw_h, &format!("{}/24", ip(2))).unwrap();
    t.address(&fw_h, &fw_if, &format!("{}/24", ip(12))).unwrap();
    let zt_h = t.host("zt").unwrap();
    t.plug(&mut sw, &zt_h, &format!("{}/24", ip(3))).unwrap();

    // Our planet: one root at 198.18.<net>.1:9993.
    let root_id = generate();
    let endpoint: SocketAddr = format!("{}:9993", ip(1)).parse().unwrap();
    let planet = zt_planet!(root_id, endpoint);
    let planet_file = dir.path().join("planet");
    std::fs::write(&planet_file, &planet).unwrap();
    let root_addr = root_id.address().to_string();

    // The root.
    let (fw_root, zt_root) = match kind {
        RootKind::Flatwire => {
            let d = dir.path().join("root");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("identity.secret"),
                root_id.to_secret_string().unwrap(),
            )
            .unwrap();
            let r = start_fw(
                &mut t,
                &root_h,
                &fw_bin,
                &d,
                &endpoint.to_string(),
                &planet_file,
                true,
                &[],
            );
            r.wait_line("root role", 10, "role root", &[]);
            (Some(r), None)
        }
        RootKind::ZeroTierOne => {
            let r = start_zt(
                &mut t,
                &root_h,
                &zt,
                &dir.path().join("ztroot"),
                &ip(1),
                &planet,
                Some(&root_id),
                serde_json::json!({}),
            );
            assert_eq!(r.address, root_addr, "ZeroTier One took our root identity");
            (None, Some(r))
        }
    };

    // In the ZeroTier One root scenario, E and Z also share a trusted path (suite 2): each
    // trusts exactly the other's underlay address, with the same ID; the root is not in it.
    let trust_id: u64 = 0x7f1a_7e00;
    let trusted = kind == RootKind::ZeroTierOne;
    let (fw_extra, zt_physical) = if trusted {
        (
            vec![format!("--trusted {}/32={trust_id}", ip(3))],
            serde_json::json!({ format!("{}/32", ip(2)): { "trustedPathId": trust_id } }),
        )
    } else {
        (Vec::new(), serde_json::json!({}))
    };

    // Our leaf E.
    let e = start_fw(
        &mut t,
        &fw_h,
        &fw_bin,
        &dir.path().join("fw"),
        "0.0.0.0:9993",
        &planet_file,
        false,
        &fw_extra,
    );
    e.wait_line(
        "E: OK(HELLO) from the root",
        60,
        "latency ",
        &[&format!("peer={root_addr}")],
    );
    pass("E -> root HELLO answered by OK(HELLO)");
    match (&fw_root, &zt_root) {
        (_, Some(r)) => {
            r.wait_peer("ZT root lists E", &e.address, &ip(2), 60);
            pass(
                "ZeroTier One root received E's HELLO and E answered its probe (latency measured)",
            );
        }
        (Some(r), _) => {
            r.wait_line(
                "our root got E's HELLO",
                30,
                "hello ",
                &[&format!("peer={}", e.address)],
            );
        }
        _ => unreachable!(),
    }

    // ZeroTier One leaf Z.
    let z = start_zt(
        &mut t,
        &zt_h,
        &zt,
        &dir.path().join("zt"),
        &ip(3),
        &planet,
        None,
        zt_physical.clone(),
    );
    // Z listens on its one UDP port at its namespace address only (no secondary or
    // port-mapping port), and its only root is ours.
    let ss = z.host.run("ss", &["-Huln"]).expect("ss -uln");
    let ss = String::from_utf8_lossy(&ss.stdout).to_string();
    let udp: Vec<&str> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(udp, [format!("{}:9993", ip(3))], "Z's UDP sockets:\n{ss}");
    pass("ZeroTier One binds one UDP socket, 9993 on its namespace address only");
    let zr = z.wait_peer("Z reaches the root", &root_addr, &ip(1), 90);
    assert_eq!(zr["role"].as_str(), Some("PLANET"), "{zr}");
    pass("Z <-> root HELLO/OK (Z lists our planet's root with a measured latency)");
    if let Some(r) = &fw_root {
        r.wait_line(
            "our root got Z's HELLO",
            30,
            "hello ",
            &[&format!("peer={}", z.address), "version=1.14."],
        );
        pass("ZeroTier One HELLO accepted by our root (peer-up, OK(HELLO) sent)");
    }
    if let Some(r) = &zt_root {
        r.wait_peer("ZT root lists Z", &z.address, &ip(3), 60);
    }

    // WHOIS both ways through the root, each the first contact between the two: E looks Z
    // up (without sending Z anything), then Z joins a network whose controller address is
    // E, so Z must look E up at the root before its request can reach E.
    let whois_before = fw_root.as_ref().map(|r| stat(r, "whois_answered"));
    e.command(&format!("whois {}", z.address));
    e.wait_line(
        "E learns Z through the root",
        30,
        "peer-up ",
        &[
            &format!("peer={}", z.address),
            &format!("via=whois:{root_addr}"),
        ],
    );
    pass("E -> root WHOIS for Z answered with Z's identity (OK(WHOIS))");
    assert!(
        z.peer(&e.address).is_none(),
        "Z must not know E before it looks E up"
    );
    let nwid = format!("{}f1a7e0", e.address);
    z.cli(&["join", &nwid]).expect("zerotier-cli join");
    e.wait_line(
        "E receives Z's NETWORK_CONFIG_REQUEST",
        60,
        "packet ",
        &[&format!("from={}", z.address), "NETWORK_CONFIG_REQUEST"],
    );
    pass(
        "Z -> root WHOIS for E answered (Z's first packet to E, a NETWORK_CONFIG_REQUEST, \
         reached E)",
    );
    if let (Some(r), Some(before)) = (&fw_root, whois_before) {
        wait_for(
            "our root answered both WHOIS",
            10,
            || tail(&r.log, 20),
            || (stat(r, "whois_answered") >= before + 2).then_some(()),
        );
        pass("our root answered WHOIS from both E and ZeroTier One (stats)");
    }
    let _ = z.cli(&["leave", &nwid]);

    // ECHO from E to Z, with a payload.
    e.command(&format!("echo {} interop-echo-1", z.address));
    e.wait_line(
        "E gets OK(ECHO) from Z",
        30,
        "echo-reply ",
        &[&format!("peer={}", z.address), "payload=interop-echo-1"],
    );
    pass("E -> Z ECHO answered with OK(ECHO) carrying the payload");

    // USER_MESSAGE from E to Z: a software-update GET_LATEST request (type 100).
    let req = serde_json::json!({
        "vMajor": 1, "vMinor": 0, "vRev": 0, "vBuild": 0,
        "platform": 1, "arch": 2, "vendor": 0,
        "channel": "flatwire-interop", "expectedSigner": "flatwire-interop-signer"
    });
    e.command(&format!("msg {} 100 \u{1}{req}", z.address));
    let dist_log = z.home.join("update-dist.log");
    wait_for(
        "Z logs E's GET_LATEST",
        30,
        || format!("{}\n{}", tail(&dist_log, 10), tail(&e.log, 20)),
        || {
            read(&dist_log)
                .lines()
                .find(|l| l.starts_with(&e.address) && l.contains("GET_LATEST 1.0.0_0"))
                .map(str::to_owned)
        },
    );
    pass(
        "E -> Z USER_MESSAGE (type 100) delivered: ZeroTier One's update service logged the request",
    );
    e.wait_line(
        "E receives Z's USER_MESSAGE reply",
        30,
        "user-message ",
        &[
            &format!("from={}", z.address),
            "type=100",
            "flatwire-interop-signer",
        ],
    );
    pass("Z -> E USER_MESSAGE (type 100, LATEST) received and decoded");

    // Fragmented both ways. E -> Z: a GET_LATEST padded to ~8 KB (six fragments at MTU
    // 1432); Z must reassemble it to log a second request.
    let mut big = req.clone();
    big["pad"] = serde_json::Value::String(hex(&dist_payload()[..4000]));
    e.command(&format!("msg {} 100 \u{1}{big}", z.address));
    wait_for(
        "Z logs E's fragmented GET_LATEST",
        30,
        || format!("{}\n{}", tail(&dist_log, 10), tail(&e.log, 20)),
        || {
            (read(&dist_log)
                .lines()
                .filter(|l| l.starts_with(&e.address) && l.contains("GET_LATEST"))
                .count()
                >= 2)
                .then_some(())
        },
    );
    pass("E -> Z fragmented USER_MESSAGE (~8 KB) reassembled and handled by ZeroTier One");
    // Z -> E: GET_DATA for the update makes Z send a 6 KB chunk (fragmented by ZeroTier One).
    let payload = dist_payload();
    let sha = Command::new("sha512sum")
        .arg(z.home.join("update-dist.d/flatwire-interop.bin"))
        .output()
        .unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout).to_string();
    let prefix = &sha[..32];
    e.command(&format!("msghex {} 100 03{prefix}00000000", z.address));
    let want = format!("hex=04{prefix}00000000{}", hex(&payload));
    e.wait_line(
        "E receives Z's fragmented DATA chunk",
        30,
        "user-message ",
        &[
            &format!("from={}", z.address),
            &format!("len={}", 1 + 16 + 4 + payload.len()),
            &want,
        ],
    );
    pass("Z -> E fragmented USER_MESSAGE (6 KB update chunk) reassembled bit for bit");

    // ECHO from Z to E: a PUSH_DIRECT_PATHS naming E's second address makes ZeroTier One
    // probe it with an ECHO (it knows E's protocol version by now).
    e.command(&format!("push {} {}:9993", z.address, ip(12)));
    e.wait_line(
        "E receives an ECHO from Z",
        60,
        "echo-in ",
        &[&format!("peer={}", z.address)],
    );
    pass("Z -> E ECHO received (and answered)");

    // Direct HELLO/OK between the leaves (after the root's RENDEZVOUS).
    e.wait_line(
        "E gets a direct HELLO from Z",
        90,
        "hello ",
        &[
            &format!("peer={}", z.address),
            &format!("from={}:9993", ip(3)),
            "hops=0",
            "version=1.14.",
        ],
    );
    pass("Z -> E direct HELLO accepted, OK(HELLO) sent");
    e.wait_line(
        "E gets OK(HELLO) from Z",
        90,
        "latency ",
        &[&format!("peer={}", z.address)],
    );
    z.wait_peer("Z lists E with a direct path", &e.address, &ip(2), 90);
    pass("E -> Z direct HELLO answered by OK(HELLO); Z lists E with an active direct path");

    // Nothing but our planet's nodes, all on the test underlay.
    for zn in [Some(&z), zt_root.as_ref()].into_iter().flatten() {
        for p in zn.peers() {
            if p["role"].as_str() == Some("PLANET") {
                assert_eq!(p["address"].as_str(), Some(root_addr.as_str()), "{p}");
            }
            for path in p["paths"].as_array().into_iter().flatten() {
                let a = path["address"].as_str().unwrap_or_default();
                assert!(a.starts_with(&format!("198.18.{net}.")), "path {a} of {p}");
            }
        }
    }
    pass("ZeroTier One saw only our planet's root and 198.18.x.x paths");
    if trusted {
        // Over the now direct path: one more request and reply, both in suite 2.
        let replies = |e: &FwNode| {
            read(&e.log)
                .lines()
                .filter(|l| l.starts_with("user-message ") && l.contains("type=100"))
                .count()
        };
        let before = replies(&e);
        e.command(&format!("msg {} 100 \u{1}{req}", z.address));
        wait_for(
            "a reply to the request sent over the trusted path",
            30,
            || format!("{}\n{}", tail(&dist_log, 10), tail(&e.log, 20)),
            || (replies(&e) > before).then_some(()),
        );
        wait_for(
            "E counts suite 2 both ways",
            10,
            || tail(&e.log, 20),
            || (stat(&e, "trusted_sent") > 0 && stat(&e, "trusted_received") > 0).then_some(()),
        );
        pass(&format!(
            "trusted path (suite 2, ID {trust_id:#x}) both ways: ZeroTier One accepted E's \
             clear-text USER_MESSAGE and E accepted its reply ({} sent, {} received)",
            stat(&e, "trusted_sent"),
            stat(&e, "trusted_received")
        ));
    }
    if let Some(r) = &fw_root {
        assert!(stat(r, "relayed") > 0, "{}", tail(&r.log, 30));
        pass("our root relayed between E and ZeroTier One");
    }
    if std::env::var_os("FLATWIRE_ZT_DUMP").is_some() {
        println!("{}", tail(&e.log, 400));
        if let Some(r) = &fw_root {
            println!("{}", tail(&r.log, 400));
        }
        println!("{}", z.diag());
    }
    if let Some(r) = &fw_root {
        for kind in ["stats ", "drops "] {
            r.assert_no_bad_packets(&format!("{tag} root"), kind);
        }
    }
    e.assert_no_bad_packets(&format!("{tag} E"), "drops ");
    println!("{tag} all interop checks passed with ZeroTier One {version}");
    drop(t);
}

#[test]
fn flatwire_root() {
    scenario(RootKind::Flatwire, 20);
}

#[test]
fn zerotier_one_root() {
    scenario(RootKind::ZeroTierOne, 21);
}
