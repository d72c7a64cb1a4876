//! Controller object model round trips and the stores.

mod common;

use common::zt_one;
use flatwire_vl1::Address;
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ControllerStore, FileStore, Member, MemoryStore, Network, to_canonical_json,
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
