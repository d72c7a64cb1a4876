//! Controller object model round trips and the stores.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::zt_one;
use flatwire_vl1::Address;
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ControllerStore, FileStore, Member, MemoryStore, Network, PodBinding, to_canonical_json,
};

#[test]
fn recorded_controller_json_round_trips_byte_for_byte() {
    for f in [
        "api-json/controller-network-e6acfe87fc3adaf6.json",
        "api-json/controller.d/network/e6acfe87fc3adaf6.json",
    ] {
        let text = String::from_utf8(zt_one(f)).unwrap();
        let n: Network = serde_json::from_str(&text).unwrap();
        assert_eq!(n.name, "zt-anchor-lab");
        assert!(n.private && n.v4_assign_mode.zt);
        assert_eq!(n.ip_assignment_pools[0].ip_range_start, "10.147.17.1");
        assert_eq!(to_canonical_json(&n).unwrap(), text.trim_end(), "{f}");
    }
    for f in [
        "api-json/controller-network-e6acfe87fc3adaf6-member-e28e6b73a1.json",
        "api-json/controller-network-e6acfe87fc3adaf6-member-e6acfe87fc.json",
        "api-json/controller.d/network/e6acfe87fc3adaf6/member/e28e6b73a1.json",
    ] {
        let text = String::from_utf8(zt_one(f)).unwrap();
        let m: Member = serde_json::from_str(&text).unwrap();
        assert!(m.authorized);
        assert_eq!(m.v_minor, 14);
        assert_eq!(to_canonical_json(&m).unwrap(), text.trim_end(), "{f}");
    }
}

#[test]
fn unknown_fields_survive() {
    let text = r#"{"id":"e6acfe87fc3adaf6","nwid":"e6acfe87fc3adaf6","zzFuture":{"b":1,"a":2}}"#;
    let n: Network = serde_json::from_str(text).unwrap();
    let out = to_canonical_json(&n).unwrap();
    assert!(out.ends_with(r#""zzFuture":{"a":2,"b":1}}"#), "{out}");
    assert!(out.contains(r#""rules":[{"not":false,"or":false,"type":"ACTION_ACCEPT"}]"#));
    assert!(out.contains(r#""authTokens":[null]"#));
}

fn exercise(store: &mut dyn ControllerStore) {
    let nwid: NetworkId = "e6acfe87fc3adaf6".parse().unwrap();
    let a: Address = "e28e6b73a1".parse().unwrap();
    let mut n = Network::new(nwid, 5);
    assert!(store.put_network(&mut n).unwrap());
    assert_eq!(n.revision, 1);
    let mut same = n.clone();
    assert!(!store.put_network(&mut same).unwrap());
    assert_eq!(same.revision, 1);
    n.name = "renamed".into();
    assert!(store.put_network(&mut n).unwrap());
    assert_eq!(store.get_network(nwid).unwrap().unwrap().revision, 2);
    let mut m = Member::new(nwid, a, 6);
    m.authorized = true;
    assert!(store.put_member(&mut m).unwrap());
    assert_eq!(store.list_networks().unwrap(), vec![nwid]);
    assert_eq!(store.list_members(nwid).unwrap(), vec![a]);
    assert_eq!(store.get_member(nwid, a).unwrap().unwrap(), m);
    assert!(store.delete_member(nwid, a).unwrap().is_some());
    assert!(store.get_member(nwid, a).unwrap().is_none());
    assert!(store.delete_network(nwid).unwrap().is_some());
    assert!(store.list_networks().unwrap().is_empty());
}

#[test]
fn memory_store_bumps_revisions() {
    exercise(&mut MemoryStore::default());
}

#[test]
fn file_store_bumps_revisions_and_writes_controller_d_layout() {
    let dir = tempfile::tempdir().unwrap();
    exercise(&mut FileStore::open(dir.path()).unwrap());
    let mut s = FileStore::open(dir.path()).unwrap();
    let nwid: NetworkId = "e6acfe87fc3adaf6".parse().unwrap();
    let mut n = Network::new(nwid, 5);
    s.put_network(&mut n).unwrap();
    let path = dir.path().join("network/e6acfe87fc3adaf6.json");
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(text, to_canonical_json(&n).unwrap());
    // no temporary files left behind
    let names: Vec<_> = std::fs::read_dir(dir.path().join("network"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1);
}

// Group commit (FileStore::with_group_commit).

fn nwid_a() -> NetworkId {
    "e6acfe87fc3adaf6".parse().unwrap()
}

fn addr(i: u64) -> Address {
    Address::new(0x1100000000 + i).unwrap()
}

fn member_with_ip(i: u64) -> Member {
    let mut m = Member::new(nwid_a(), addr(i), 7);
    m.authorized = true;
    m.ip_assignments = vec![format!("10.9.0.{i}")];
    m
}

fn binding(uid: &str) -> PodBinding {
    PodBinding {
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        uid: uid.into(),
        host: "e28e6b73a1".into(),
        tags: vec![(1, 2)],
        members: Vec::new(),
        ip_assignments: vec!["10.9.1.1".into()],
    }
}

/// Every file below `dir` (relative path -> contents).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// No temporary files, and every file is a complete JSON object.
fn assert_no_torn_files(dir: &Path) {
    for (p, data) in files(dir) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.'),
            "temporary file left: {}",
            p.display()
        );
        serde_json::from_slice::<serde_json::Value>(&data)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()));
    }
}

#[test]
fn group_commit_stages_writes_visible_at_once_and_durable_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let nwid = nwid_a();
    let mut s = FileStore::open(dir.path()).unwrap().with_group_commit();
    assert_eq!(s.staged(), 0);
    s.put_network(&mut Network::new(nwid, 5)).unwrap();
    let mut ms: Vec<Member> = (1..=3).map(member_with_ip).collect();
    for m in &mut ms {
        assert!(s.put_member(m).unwrap());
    }
    assert!(s.put_pod(nwid, &binding("uid-1")).unwrap());
    assert_eq!(s.staged(), 5);
    // Reads, listings and the index see the staged state; the disk has none of it.
    assert_eq!(s.list_networks().unwrap(), vec![nwid]);
    assert_eq!(s.get_network(nwid).unwrap().unwrap().revision, 1);
    assert_eq!(
        s.list_members(nwid).unwrap(),
        vec![addr(1), addr(2), addr(3)]
    );
    assert_eq!(s.get_member(nwid, addr(2)).unwrap().as_ref(), Some(&ms[1]));
    assert_eq!(s.list_pods(nwid).unwrap(), vec!["uid-1".to_string()]);
    assert!(s.get_pod(nwid, "uid-1").unwrap().is_some());
    assert!(
        s.ip_assigned(nwid, "10.9.0.3".parse().unwrap(), addr(1))
            .unwrap()
    );
    assert!(
        s.ip_reserved(nwid, "10.9.1.1".parse().unwrap(), None)
            .unwrap()
    );
    assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    assert!(
        FileStore::open(dir.path())
            .unwrap()
            .list_networks()
            .unwrap()
            .is_empty()
    );

    s.commit().unwrap();
    assert_eq!(s.staged(), 0);
    assert_eq!(files(dir.path()).len(), 5);
    assert_no_torn_files(dir.path());
    let r = FileStore::open(dir.path()).unwrap();
    assert_eq!(r.list_networks().unwrap(), vec![nwid]);
    assert_eq!(
        r.list_members(nwid).unwrap(),
        vec![addr(1), addr(2), addr(3)]
    );
    for m in &ms {
        let a: Address = m.id.parse().unwrap();
        assert_eq!(r.get_member(nwid, a).unwrap().as_ref(), Some(m));
    }
    assert_eq!(r.get_pod(nwid, "uid-1").unwrap(), Some(binding("uid-1")));
    assert!(
        r.ip_assigned(nwid, "10.9.0.3".parse().unwrap(), addr(1))
            .unwrap()
    );
    assert!(
        r.ip_reserved(nwid, "10.9.1.1".parse().unwrap(), None)
            .unwrap()
    );
    // Nothing staged: a commit is a no-op.
    s.commit().unwrap();
}

#[test]
fn group_commit_stages_deletes_and_writes_an_object_once() {
    let dir = tempfile::tempdir().unwrap();
    let nwid = nwid_a();
    let mut s = FileStore::open(dir.path()).unwrap().with_group_commit();
    s.put_network(&mut Network::new(nwid, 5)).unwrap();
    s.put_member(&mut member_with_ip(1)).unwrap();
    s.put_member(&mut member_with_ip(2)).unwrap();
    s.put_pod(nwid, &binding("uid-1")).unwrap();
    s.commit().unwrap();

    assert!(s.delete_member(nwid, addr(1)).unwrap().is_some());
    assert!(s.delete_pod(nwid, "uid-1").unwrap().is_some());
    assert_eq!(s.list_members(nwid).unwrap(), vec![addr(2)]);
    assert!(s.get_member(nwid, addr(1)).unwrap().is_none());
    assert!(s.list_pods(nwid).unwrap().is_empty());
    assert!(
        !s.ip_assigned(nwid, "10.9.0.1".parse().unwrap(), addr(2))
            .unwrap()
    );
    assert!(
        !s.ip_reserved(nwid, "10.9.1.1".parse().unwrap(), None)
            .unwrap()
    );
    // Still on disk until the commit.
    assert_eq!(files(dir.path()).len(), 4);

    // Member 2 changed twice: one staged write, of the last version.
    let mut m = member_with_ip(2);
    m.ip_assignments = vec!["10.9.0.20".into()];
    assert!(s.put_member(&mut m).unwrap());
    m.ip_assignments = vec!["10.9.0.21".into()];
    assert!(s.put_member(&mut m).unwrap());
    assert_eq!(m.revision, 3);
    assert_eq!(s.staged(), 3, "two deletions and one write");

    s.commit().unwrap();
    let on_disk = files(dir.path());
    assert_eq!(on_disk.len(), 2, "{:?}", on_disk.keys());
    let member_file = PathBuf::from(format!("network/{nwid}/member/{}.json", addr(2)));
    assert_eq!(
        on_disk[&member_file],
        to_canonical_json(&m).unwrap().into_bytes()
    );
    let r = FileStore::open(dir.path()).unwrap();
    assert_eq!(r.list_members(nwid).unwrap(), vec![addr(2)]);
    assert!(r.list_pods(nwid).unwrap().is_empty());
    assert!(
        r.ip_assigned(nwid, "10.9.0.21".parse().unwrap(), addr(1))
            .unwrap()
    );
    assert!(
        !r.ip_assigned(nwid, "10.9.0.20".parse().unwrap(), addr(1))
            .unwrap()
    );
}

#[test]
fn group_commit_store_dropped_before_commit_loses_only_the_staged_changes() {
    let dir = tempfile::tempdir().unwrap();
    let nwid = nwid_a();
    let before = {
        let mut s = FileStore::open(dir.path()).unwrap().with_group_commit();
        s.put_network(&mut Network::new(nwid, 5)).unwrap();
        s.put_member(&mut member_with_ip(1)).unwrap();
        s.put_member(&mut member_with_ip(2)).unwrap();
        s.commit().unwrap();
        let before = files(dir.path());
        // Staged, never committed: a change, a new member, a deletion, a new binding.
        let mut m = member_with_ip(1);
        m.ip_assignments = vec!["10.9.0.99".into()];
        s.put_member(&mut m).unwrap();
        s.put_member(&mut member_with_ip(3)).unwrap();
        s.delete_member(nwid, addr(2)).unwrap();
        s.put_pod(nwid, &binding("uid-1")).unwrap();
        assert_eq!(s.staged(), 4);
        before
    };
    assert_eq!(files(dir.path()), before);
    assert_no_torn_files(dir.path());
    let r = FileStore::open(dir.path()).unwrap();
    assert_eq!(r.list_members(nwid).unwrap(), vec![addr(1), addr(2)]);
    assert_eq!(
        r.get_member(nwid, addr(1)).unwrap().unwrap().ip_assignments,
        vec!["10.9.0.1".to_string()]
    );
    assert!(r.list_pods(nwid).unwrap().is_empty());
}

#[test]
fn group_commit_that_fails_keeps_everything_staged_and_a_later_commit_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let nwid = nwid_a();
    // Sorts after `nwid`: its files are written after those of `nwid`.
    let other: NetworkId = "e6acfe87fcffffff".parse().unwrap();
    let mut s = FileStore::open(dir.path()).unwrap().with_group_commit();
    s.put_network(&mut Network::new(nwid, 5)).unwrap();
    s.put_member(&mut member_with_ip(1)).unwrap();
    s.commit().unwrap();

    // A file where the other network's directory must go: writing its members fails
    // (we run as root, so a read-only directory would not stop us).
    s.put_network(&mut Network::new(other, 5)).unwrap();
    let mut m = Member::new(other, addr(7), 7);
    s.put_member(&mut m).unwrap();
    s.put_member(&mut member_with_ip(2)).unwrap();
    s.delete_member(nwid, addr(1)).unwrap();
    assert_eq!(s.staged(), 4);
    let blocker = dir.path().join(format!("network/{other}"));
    std::fs::write(&blocker, b"in the way").unwrap();
    assert!(s.commit().is_err(), "a commit into a file must fail");
    // Nothing is dropped (and the directories it may have made wait for a sync too).
    assert!(s.staged() >= 4, "{}", s.staged());
    assert_eq!(s.list_members(nwid).unwrap(), vec![addr(2)]);
    assert_eq!(s.get_member(other, addr(7)).unwrap().as_ref(), Some(&m));
    let left: Vec<_> = files(dir.path())
        .into_keys()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // A failure after the renames (the deletion meets a directory): still all staged.
    std::fs::remove_file(&blocker).unwrap();
    let in_the_way = dir
        .path()
        .join(format!("network/{nwid}/member/{}.json", addr(1)));
    std::fs::remove_file(&in_the_way).unwrap();
    std::fs::create_dir(&in_the_way).unwrap();
    std::fs::write(in_the_way.join("x"), b"x").unwrap();
    assert!(
        s.commit().is_err(),
        "removing a directory as a file must fail"
    );
    assert!(s.staged() >= 4, "{}", s.staged());

    std::fs::remove_dir_all(&in_the_way).unwrap();
    s.commit().unwrap();
    assert_eq!(s.staged(), 0);
    assert_no_torn_files(dir.path());
    let r = FileStore::open(dir.path()).unwrap();
    assert_eq!(r.list_networks().unwrap(), vec![nwid, other]);
    assert_eq!(r.list_members(nwid).unwrap(), vec![addr(2)]);
    assert_eq!(r.list_members(other).unwrap(), vec![addr(7)]);
    assert_eq!(r.get_member(other, addr(7)).unwrap(), Some(m));
}
