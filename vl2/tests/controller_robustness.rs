//! The controller never loses or corrupts a stored network or member: not when its
//! process is SIGKILLed in the middle of writing the file store, and not on bad API
//! input, which gets a typed error and leaves the store exactly as it was.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flatwire_vl1::{Address, Identity};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ApiError, Controller, ControllerStore, FileStore, Member, MemoryStore, Network, PoolProblem,
};

const CHILD_ENV: &str = "FLATWIRE_VL2_KILL_WRITER_DIR";

fn nwid() -> NetworkId {
    "e6acfe87fc3adaf6".parse().unwrap()
}

fn member_address(i: u64) -> Address {
    Address::new(0x10_0000_0000 + i).unwrap()
}

/// Member `i` as the writer stores it: large enough (~64 KiB) that a kill often lands
/// inside a write.
fn member(i: u64) -> Member {
    let mut m = Member::new(nwid(), member_address(i), i as i64);
    m.authorized = i.is_multiple_of(2);
    m.active_bridge = i.is_multiple_of(5);
    m.ip_assignments = vec![format!("10.0.{}.{}", i / 250, 1 + i % 250)];
    m.name = Some(format!("m{i}"));
    m.extra.insert(
        "pad".into(),
        serde_json::Value::String(format!("{i:08}").repeat(8192)),
    );
    m
}

/// The hot member, rewritten in place on every step: version `k`.
fn hot(k: u64) -> Member {
    let mut m = member(1_000_000);
    m.name = Some(format!("v{k}"));
    m.extra.insert(
        "pad".into(),
        serde_json::Value::String(format!("{k:08}").repeat(8192)),
    );
    m
}

/// The child: writes members (and rewrites the hot one) forever, logging each write
/// after it returns. Only runs when the parent test starts it.
#[test]
fn kill_writer_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut store = FileStore::open(dir.join("store")).unwrap();
    let start = store.list_members(nwid()).unwrap().len() as u64;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("progress"))
        .unwrap();
    for i in start.. {
        store.put_member(&mut member(i)).unwrap();
        store.put_member(&mut hot(i)).unwrap();
        writeln!(log, "{i}").unwrap();
        log.flush().unwrap();
    }
}

fn completed(progress: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(progress).unwrap_or_default();
    // A line without its newline was cut by the kill: not a completed write.
    text.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n')?.parse().ok())
        .collect()
}

/// Every `*.json` file under `dir` parses as a network or member.
fn assert_all_files_parse(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            n += assert_all_files_parse(&p);
        } else if p.extension().is_some_and(|x| x == "json")
            && !p.file_name().unwrap().to_string_lossy().starts_with('.')
        {
            let b = std::fs::read(&p).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&b)
                .unwrap_or_else(|e| panic!("{} is corrupt: {e}", p.display()));
            match v["objtype"].as_str() {
                Some("member") => drop(serde_json::from_value::<Member>(v).unwrap()),
                Some("network") => drop(serde_json::from_value::<Network>(v).unwrap()),
                other => panic!("{}: objtype {other:?}", p.display()),
            }
            n += 1;
        }
    }
    n
}

#[test]
fn file_store_survives_sigkill_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = FileStore::open(dir.path().join("store")).unwrap();
        s.put_network(&mut Network::new(nwid(), 1)).unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    let mut last_hot = None;
    for round in 0..6u64 {
        let before = completed(&dir.path().join("progress")).len();
        let mut child = Command::new(&exe)
            .args(["kill_writer_child", "--exact", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Let it complete a few writes, then kill it at a varying point of the next.
        let deadline = Instant::now() + Duration::from_secs(60);
        while completed(&dir.path().join("progress")).len() < before + 3 + round as usize {
            assert!(Instant::now() < deadline, "writer {pid} made no progress");
            assert!(child.try_wait().unwrap().is_none(), "writer {pid} exited");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(300 * round));
        // Child::kill sends SIGKILL to this child's PID.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed, not finished");

        // Reopen as a restarted controller would.
        let files = assert_all_files_parse(&dir.path().join("store"));
        let store = FileStore::open(dir.path().join("store")).unwrap();
        assert!(store.get_network(nwid()).unwrap().is_some());
        let done = completed(&dir.path().join("progress"));
        assert!(files > done.len(), "every completed member is on disk");
        for &i in &done {
            let mut want = member(i);
            let got = store
                .get_member(nwid(), member_address(i))
                .unwrap()
                .unwrap_or_else(|| panic!("member {i} lost"));
            want.revision = got.revision;
            assert_eq!(got, want, "member {i} intact");
        }
        // The hot member is one whole version, at least the last logged one.
        let h = store
            .get_member(nwid(), member_address(1_000_000))
            .unwrap()
            .unwrap();
        let k: u64 = h.name.as_deref().unwrap()[1..].parse().unwrap();
        let mut want = hot(k);
        want.revision = h.revision;
        assert_eq!(h, want, "hot member is a complete version");
        assert!(k >= *done.last().unwrap());
        assert!(last_hot.is_none_or(|l| k >= l));
        last_hot = Some(k);
        // The rebuilt index agrees with the members on disk.
        let mut bridges = Vec::new();
        for a in store.list_members(nwid()).unwrap() {
            if store.get_member(nwid(), a).unwrap().unwrap().active_bridge {
                bridges.push(a);
            }
        }
        assert_eq!(store.active_bridges(nwid()).unwrap(), bridges);
    }
}

// ---- bad API input ----

/// Whether an error is the one expected.
type Expect = fn(&ApiError) -> bool;

fn controller<S: ControllerStore>(store: S) -> Controller<S> {
    let secret = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/spec/vectors/zt-one/capture/node-identities/zta-e6acfe87fc.secret"
    ))
    .unwrap();
    let id: Identity = secret.trim().parse().unwrap();
    Controller::new(id, store)
}

/// Everything the store holds, as canonical JSON.
fn snapshot(s: &dyn ControllerStore) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for n in s.list_networks().unwrap() {
        let net = s.get_network(n).unwrap().unwrap();
        out.insert(
            n.to_string(),
            flatwire_vl2::controller::to_canonical_json(&net).unwrap(),
        );
        for a in s.list_members(n).unwrap() {
            let m = s.get_member(n, a).unwrap().unwrap();
            out.insert(
                format!("{n}/{a}"),
                flatwire_vl2::controller::to_canonical_json(&m).unwrap(),
            );
        }
    }
    out
}

fn bad_network_bodies() -> Vec<(String, Expect)> {
    let rules = |n: usize| {
        serde_json::to_string(&vec![serde_json::json!({"type": "ACTION_ACCEPT"}); n]).unwrap()
    };
    let pool = |a: &str, b: &str| {
        format!(r#"{{"ipAssignmentPools":[{{"ipRangeStart":"{a}","ipRangeEnd":"{b}"}}]}}"#)
    };
    vec![
        ("{\"name\": \"x\"".into(), |e| {
            matches!(e, ApiError::Syntax(_))
        }),
        ("not json".into(), |e| matches!(e, ApiError::Syntax(_))),
        ("[1,2]".into(), |e| matches!(e, ApiError::NotAnObject)),
        ("null".into(), |e| matches!(e, ApiError::NotAnObject)),
        (
            r#"{"private":"yes"}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "private"),
        ),
        (
            r#"{"mtu":"big"}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "mtu"),
        ),
        (
            r#"{"mtu":100000}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "mtu"),
        ),
        (
            r#"{"routes":[{"target":"10.0.0.0/99"}]}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "routes"),
        ),
        (
            r#"{"routes":{"target":"10.0.0.0/8"}}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "routes"),
        ),
        (
            r#"{"rules":[{"type":5}]}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "rules"),
        ),
        (
            r#"{"ipAssignmentPools":[{"ipRangeStart":"10.0.0.1"}]}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "ipAssignmentPools"),
        ),
        (r#"{"id":"e6acfe87fc000002"}"#.into(), |e| {
            matches!(e, ApiError::IdMismatch(_))
        }),
        (format!(r#"{{"rules":{}}}"#, rules(1025)), |e| {
            matches!(
                e,
                ApiError::TooMany {
                    what: "rules",
                    count: 1025,
                    max: 1024
                }
            )
        }),
        (
            format!(r#"{{"capabilities":[{{"id":1,"rules":{}}}]}}"#, rules(65)),
            |e| {
                matches!(
                    e,
                    ApiError::TooMany {
                        what: "capability rules",
                        ..
                    }
                )
            },
        ),
        (
            format!(
                r#"{{"tags":[{}]}}"#,
                (0..129)
                    .map(|i| format!(r#"{{"id":{i}}}"#))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            |e| matches!(e, ApiError::TooMany { what: "tags", .. }),
        ),
        (pool("10.0.0.200", "10.0.0.1"), |e| {
            matches!(
                e,
                ApiError::Pool {
                    problem: PoolProblem::Inverted,
                    ..
                }
            )
        }),
        (pool("fd00::2", "fd00::1"), |e| {
            matches!(
                e,
                ApiError::Pool {
                    problem: PoolProblem::Inverted,
                    ..
                }
            )
        }),
        (pool("1.0.0.0", "200.0.0.0"), |e| {
            matches!(
                e,
                ApiError::Pool {
                    problem: PoolProblem::TooLarge,
                    ..
                }
            )
        }),
        (pool("10.0.0.1", "fd00::1"), |e| {
            matches!(
                e,
                ApiError::Pool {
                    problem: PoolProblem::MixedFamilies,
                    ..
                }
            )
        }),
        (pool("10.0.0.300", "10.0.0.1"), |e| {
            matches!(
                e,
                ApiError::Pool {
                    problem: PoolProblem::NotAnAddress,
                    ..
                }
            )
        }),
        (format!(r#"{{"name":"{}"}}"#, "x".repeat(2 << 20)), |e| {
            matches!(e, ApiError::TooLarge { .. })
        }),
    ]
}

fn bad_member_bodies() -> Vec<(String, Expect)> {
    vec![
        ("{".into(), |e| matches!(e, ApiError::Syntax(_))),
        ("\"member\"".into(), |e| matches!(e, ApiError::NotAnObject)),
        (
            r#"{"authorized":1}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "authorized"),
        ),
        (
            r#"{"activeBridge":"true"}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "activeBridge"),
        ),
        (
            r#"{"ipAssignments":["10.0.0.1","nope"]}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "ipAssignments"),
        ),
        (
            r#"{"ipAssignments":"10.0.0.1"}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "ipAssignments"),
        ),
        (
            r#"{"tags":[[1]]}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "tags"),
        ),
        (
            r#"{"capabilities":[-1]}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "capabilities"),
        ),
        (
            r#"{"identity":"garbage"}"#.into(),
            |e| matches!(e, ApiError::Field { field, .. } if field == "identity"),
        ),
        (r#"{"address":"e28e6b73a2"}"#.into(), |e| {
            matches!(e, ApiError::IdMismatch(_))
        }),
        (r#"{"nwid":"e6acfe87fc000002"}"#.into(), |e| {
            matches!(e, ApiError::IdMismatch(_))
        }),
        (
            format!(
                r#"{{"ipAssignments":[{}]}}"#,
                (0..33)
                    .map(|i| format!(r#""10.0.1.{i}""#))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            |e| {
                matches!(
                    e,
                    ApiError::TooMany {
                        what: "ipAssignments",
                        ..
                    }
                )
            },
        ),
    ]
}

fn bad_input_changes_nothing<S: ControllerStore>(store: S, files: Option<&Path>) {
    let nwid = nwid();
    let a: Address = "e28e6b73a1".parse().unwrap();
    let mut ctl = controller(store);
    let n = ctl
        .api_network_post(
            nwid,
            br#"{"name":"lab","ipAssignmentPools":[{"ipRangeStart":"10.0.0.1","ipRangeEnd":"10.0.0.254"}],"routes":[{"target":"10.0.0.0/24"}],"v4AssignMode":{"zt":true}}"#,
            5,
        )
        .unwrap();
    assert_eq!((n.name.as_str(), n.revision), ("lab", 1));
    let m = ctl
        .api_member_post(
            nwid,
            a,
            br#"{"authorized":true,"ipAssignments":["10.0.0.9"]}"#,
            6,
        )
        .unwrap();
    assert!(m.authorized && m.revision == 1);
    let before = snapshot(ctl.store());
    let disk_before = files.map(read_tree);
    for (body, ok) in bad_network_bodies() {
        let e = ctl
            .api_network_post(nwid, body.as_bytes(), 7)
            .expect_err(&body[..body.len().min(80)]);
        assert!(ok(&e), "{}: wrong error {e:?}", &body[..body.len().min(80)]);
        assert!(!e.to_string().is_empty());
        // A new network is not created by a bad body either.
        let other: NetworkId = "e6acfe87fc000009".parse().unwrap();
        assert!(ctl.api_network_post(other, body.as_bytes(), 7).is_err());
    }
    for (body, ok) in bad_member_bodies() {
        let e = ctl
            .api_member_post(nwid, a, body.as_bytes(), 7)
            .expect_err(&body);
        assert!(ok(&e), "{body}: wrong error {e:?}");
        let b: Address = "e28e6b73b2".parse().unwrap();
        assert!(ctl.api_member_post(nwid, b, body.as_bytes(), 7).is_err());
    }
    // A member of a network that does not exist.
    let ghost: NetworkId = "e6acfe87fc00000a".parse().unwrap();
    assert!(matches!(
        ctl.api_member_post(ghost, a, b"{}", 7),
        Err(ApiError::NoSuchNetwork(_))
    ));
    assert_eq!(snapshot(ctl.store()), before, "bad input changed the store");
    if let (Some(dir), Some(d)) = (files, disk_before) {
        assert_eq!(read_tree(dir), d, "bad input changed files");
    }
    // A good partial update still works and keeps the other fields.
    let m = ctl
        .api_member_post(nwid, a, br#"{"activeBridge":true}"#, 8)
        .unwrap();
    assert!(m.active_bridge && m.authorized && m.revision == 2);
    assert_eq!(m.ip_assignments, vec!["10.0.0.9".to_string()]);
    assert_eq!(ctl.store().active_bridges(nwid).unwrap(), vec![a]);
}

fn read_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(read_tree(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

#[test]
fn bad_api_input_gets_typed_errors_and_changes_nothing_in_memory() {
    bad_input_changes_nothing(MemoryStore::default(), None);
}

#[test]
fn bad_api_input_gets_typed_errors_and_changes_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    bad_input_changes_nothing(FileStore::open(dir.path()).unwrap(), Some(dir.path()));
}
