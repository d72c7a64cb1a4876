//! Pod bindings (flatwire extension): on a `vouchRequiresPod` network a node's vouch counts
//! only for a pod the binding places on that node; the member gets the binding's tags, a
//! binding's tag change retags it, deleting the binding deletes it (IP back to the pool) and
//! bindings survive a restart of the file store. Also: pinning a member's identity by POST.

mod common;

use common::{config, ident, lab_network, pod_metadata, stored_member};
use flatwire_vl1::{Address, Identity};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ApiError, Controller, ControllerStore, FileStore, RequestOutcome, RequestRefusal,
};
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::vouch::{METADATA_KEY, Vouch, VouchError};
use serde_json::json;

const UID: &str = "0b7c0f1e-1111-2222-3333-444455556666";
const POD: &str = "default/web/0b7c0f1e-1111-2222-3333-444455556666";

fn tags(cfg: &NetworkConfig) -> Vec<(u32, u32)> {
    cfg.tags.iter().map(|t| (t.id, t.value)).collect()
}

/// The recorded lab network (controller `zta`) in a file store, with `vouchRequiresPod` as
/// given, and host `ztb` authorized with its identity pinned through the API.
fn lab(dir: &std::path::Path, requires_pod: bool) -> (Controller<FileStore>, Identity, NetworkId) {
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let host = ident("capture/node-identities/ztb-e28e6b73a1.secret");
    let mut store = FileStore::open(dir).unwrap();
    let mut n = lab_network();
    store.put_network(&mut n).unwrap();
    let nwid: NetworkId = "e6acfe87fc3adaf6".parse().unwrap();
    let mut ctl = Controller::new(zta, store);
    let body = json!({"vouchRequiresPod": requires_pod, "tags": [{"id": 1000, "default": 1}]});
    let n = ctl
        .api_network_post(nwid, body.to_string().as_bytes(), 0)
        .unwrap();
    assert_eq!(n.vouch_requires_pod, requires_pod);
    let body = json!({"authorized": true, "identity": host.to_public().to_string()});
    let m = ctl
        .api_member_post(nwid, host.address(), body.to_string().as_bytes(), 0)
        .unwrap();
    assert!(m.authorized);
    assert_eq!(m.identity, Some(host.to_public().to_string()));
    (ctl, host, nwid)
}

fn binding(host: Address, tags: serde_json::Value) -> Vec<u8> {
    json!({"namespace": "default", "name": "web", "host": host.to_string(), "tags": tags})
        .to_string()
        .into_bytes()
}

/// `pod` asks for its config (packet ID 1, at `t`) with a fresh vouch of `host` for pod
/// string `pod_id`, drawing random numbers from `rnd`; returns the config it is given.
fn vouched_request(
    ctl: &mut Controller<FileStore>,
    host: &Identity,
    pod: &Identity,
    pod_id: &str,
    nwid: NetworkId,
    t: i64,
    rnd: &mut dyn FnMut() -> u64,
) -> NetworkConfig {
    let v = Vouch::sign(host, pod.address(), nwid, pod_id, t).unwrap();
    config(
        ctl.handle_request(nwid, pod, &pod_metadata(Some(&v), false), 1, t, rnd)
            .unwrap(),
    )
}

#[test]
fn identity_is_pinned_by_post_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), true);
    let a = host.address();
    // The same identity again (even in its secret form) is fine and stored public.
    let same = json!({"identity": host.to_secret_string().unwrap()});
    let m = ctl
        .api_member_post(nwid, a, same.to_string().as_bytes(), 1)
        .unwrap();
    assert_eq!(m.identity, Some(host.to_public().to_string()));
    // Another identity of the same address cannot exist; one of another address is refused.
    let other = ident("identities/identity-2.public");
    let e = ctl
        .api_member_post(
            nwid,
            a,
            json!({"identity": other.to_string()})
                .to_string()
                .as_bytes(),
            1,
        )
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Field { ref field, .. } if field == "identity"),
        "{e}"
    );
    // Clearing a pinned identity is refused with a clear error.
    let e = ctl
        .api_member_post(nwid, a, br#"{"identity": null}"#, 1)
        .unwrap_err();
    assert!(matches!(e, ApiError::IdentityPinned(x) if x == a), "{e}");
    assert!(e.to_string().contains("another identity pinned"), "{e}");
    // A member with a pinned identity refuses a requester with another key.
    let fresh = ident("identities/identity-1.public");
    let m = ctl
        .api_member_post(
            nwid,
            fresh.address(),
            json!({"identity": fresh.to_string()})
                .to_string()
                .as_bytes(),
            1,
        )
        .unwrap();
    assert_eq!(m.identity, Some(fresh.to_string()));
}

#[test]
fn vouches_need_a_binding_on_the_vouching_host() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), true);
    let pod = ident("identities/identity-1.secret");
    let intruder = ident("identities/identity-2.secret");
    let mut rnd = || 7u64;
    let t0 = 1_000_000;
    let v = Vouch::sign(&host, pod.address(), nwid, POD, t0).unwrap();
    let refused = RequestOutcome::Refuse(RequestRefusal::AccessDenied);
    // The pod asks with the host's genuine vouch: packet ID `pid`, at `t`.
    let ask = |ctl: &mut Controller<FileStore>, pid: u64, t: i64| {
        ctl.handle_request(
            nwid,
            &pod,
            &pod_metadata(Some(&v), false),
            pid,
            t,
            &mut || 7,
        )
        .unwrap()
    };

    // No binding: refused.
    assert_eq!(ask(&mut ctl, 1, t0), refused);
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::NoPodBinding(POD.into()))
    );
    // A binding on another host: refused.
    let elsewhere: Address = "0badc0ffee".parse().unwrap();
    ctl.api_pod_post(nwid, UID, &binding(elsewhere, json!([])))
        .unwrap();
    assert_eq!(ask(&mut ctl, 2, t0 + 1500), refused);
    assert!(
        matches!(ctl.last_vouch_error(), Some(VouchError::WrongHost { bound, .. }) if bound == "0badc0ffee"),
        "{:?}",
        ctl.last_vouch_error()
    );
    // The binding of another pod name under the same uid does not count either.
    let renamed = json!({"namespace": "default", "name": "db", "host": host.address().to_string()});
    ctl.api_pod_post(nwid, UID, renamed.to_string().as_bytes())
        .unwrap();
    assert_eq!(ask(&mut ctl, 3, t0 + 3000), refused);
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::NoPodBinding(POD.into()))
    );

    // The right binding, with a tag.
    let w = ctl
        .api_pod_post(nwid, UID, &binding(host.address(), json!([[1000, 200]])))
        .unwrap();
    assert_eq!(w.binding.pod_id(), POD);
    assert!(w.retagged.is_empty() && w.removed.is_empty());
    // A forged vouch (signed by the intruder in the host's name) is still refused.
    let forged = Vouch::sign(&intruder, pod.address(), nwid, POD, t0).unwrap();
    let mut bytes = forged.encode();
    bytes[1..6].copy_from_slice(&host.address().to_bytes());
    let mut md = pod_metadata(None, false);
    md.add(METADATA_KEY, &bytes);
    assert_eq!(
        ctl.handle_request(nwid, &pod, &md, 4, t0 + 4500, &mut rnd)
            .unwrap(),
        refused
    );
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::BadSignature(host.address()))
    );
    // A push (packet id 0, remembered metadata) does not let a vouch in.
    assert_eq!(ask(&mut ctl, 0, t0 + 5000), refused);
    // The genuine vouch: authorized, with the binding's tag in the first config.
    let cfg = config(ask(&mut ctl, 5, t0 + 6000));
    assert_eq!(tags(&cfg), vec![(1000, 200)]);
    let m = stored_member(&ctl, nwid, pod.address());
    assert!(m.authorized);
    assert_eq!(m.tags, vec![(1000, 200)]);
    let ip: std::net::IpAddr = m.ip_assignments[0].parse().unwrap();
    let b = ctl.store().get_pod(nwid, UID).unwrap().unwrap();
    assert_eq!(b.members, vec![pod.address().to_string()]);
    // An older vouch for the same pod, presented by another identity, is a replay.
    let old = Vouch::sign(&host, intruder.address(), nwid, POD, t0 - 1).unwrap();
    assert_eq!(
        ctl.handle_request(
            nwid,
            &intruder,
            &pod_metadata(Some(&old), false),
            6,
            t0 + 7500,
            &mut rnd
        )
        .unwrap(),
        refused
    );
    assert!(matches!(
        ctl.last_vouch_error(),
        Some(VouchError::Replayed { .. })
    ));

    // A tag change retags the member; its next config carries it.
    let w = ctl
        .api_pod_post(nwid, UID, &binding(host.address(), json!([[1000, 100]])))
        .unwrap();
    assert_eq!(w.retagged, vec![pod.address()]);
    let cfg = config(ask(&mut ctl, 0, t0 + 9000));
    assert_eq!(tags(&cfg), vec![(1000, 100)]);
    // The same body again changes nothing.
    let w = ctl
        .api_pod_post(nwid, UID, &binding(host.address(), json!([[1000, 100]])))
        .unwrap();
    assert!(w.retagged.is_empty());

    // A restart keeps the binding.
    drop(ctl);
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let mut ctl = Controller::new(zta, FileStore::open(dir.path()).unwrap());
    assert_eq!(ctl.store().list_pods(nwid).unwrap(), vec![UID.to_owned()]);
    assert_eq!(ctl.store().get_pod(nwid, UID).unwrap(), Some(w.binding));

    // Deleting the binding deletes the member it authorized; its IP is free again.
    let gone = ctl.api_pod_delete(nwid, UID).unwrap().unwrap();
    assert_eq!(gone.removed.len(), 1);
    assert!(gone.removed[0].authorized);
    assert_eq!(gone.removed[0].address, pod.address().to_string());
    assert!(
        ctl.store()
            .get_member(nwid, pod.address())
            .unwrap()
            .is_none()
    );
    assert!(
        !ctl.store()
            .ip_assigned(nwid, ip, Address::new(1).unwrap())
            .unwrap()
    );
    assert!(ctl.api_pod_delete(nwid, UID).unwrap().is_none());
    // The pod's still valid vouch no longer gets it in.
    assert_eq!(ask(&mut ctl, 7, t0 + 12_000), refused);
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::NoPodBinding(POD.into()))
    );
    // The host member is untouched.
    assert!(stored_member(&ctl, nwid, host.address()).authorized);
}

#[test]
fn bad_bindings_are_refused_and_a_host_change_removes_members() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), true);
    let bad = |ctl: &mut Controller<FileStore>, uid: &str, body: serde_json::Value| {
        ctl.api_pod_post(nwid, uid, body.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    };
    let h = host.address().to_string();
    let e = bad(
        &mut ctl,
        "../x",
        json!({"namespace": "a", "name": "b", "host": h}),
    );
    assert!(e.contains("uid"), "{e}");
    let e = bad(
        &mut ctl,
        UID,
        json!({"namespace": "a", "name": "b", "host": "xyz"}),
    );
    assert!(e.contains("host"), "{e}");
    let e = bad(
        &mut ctl,
        UID,
        json!({"namespace": "a/b", "name": "b", "host": h}),
    );
    assert!(e.contains("namespace"), "{e}");
    let e = bad(
        &mut ctl,
        UID,
        json!({"namespace": "a", "name": "b", "host": h, "uid": "other"}),
    );
    assert!(e.contains("uid"), "{e}");
    let e = bad(
        &mut ctl,
        UID,
        json!({"namespace": "a", "name": "b", "host": h, "tags": [[1, 4294967296u64]]}),
    );
    assert!(e.contains("32 bits"), "{e}");
    let other: NetworkId = "e6acfe87fc000009".parse().unwrap();
    assert!(matches!(
        ctl.api_pod_post(other, UID, &binding(host.address(), json!([]))),
        Err(ApiError::NoSuchNetwork(_))
    ));
    assert!(
        ctl.store().list_pods(nwid).unwrap().is_empty(),
        "nothing stored"
    );

    // A member authorized through the binding goes when the binding names another host.
    let pod = ident("identities/identity-1.secret");
    ctl.api_pod_post(nwid, UID, &binding(host.address(), json!([])))
        .unwrap();
    vouched_request(&mut ctl, &host, &pod, POD, nwid, 10_000, &mut || 3);
    // `members` in a body is ignored.
    let body = json!({"namespace": "default", "name": "web", "host": "0badc0ffee", "members": []});
    let w = ctl
        .api_pod_post(nwid, UID, body.to_string().as_bytes())
        .unwrap();
    assert_eq!(w.removed.len(), 1);
    assert!(w.binding.members.is_empty());
    assert!(
        ctl.store()
            .get_member(nwid, pod.address())
            .unwrap()
            .is_none()
    );
}

#[test]
fn without_the_flag_bindings_are_not_needed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), false);
    let pod = ident("identities/identity-1.secret");
    let cfg = vouched_request(&mut ctl, &host, &pod, POD, nwid, 10_000, &mut || 3);
    assert_eq!(tags(&cfg), vec![(1000, 1)], "the network's default tag");
    // The flag is not written while false (ZeroTier's files stay as they were).
    let n = ctl.store().get_network(nwid).unwrap().unwrap();
    let text = flatwire_vl2::controller::to_canonical_json(&n).unwrap();
    assert!(!text.contains("vouchRequiresPod"), "{text}");
}

const UID2: &str = "0b7c0f1e-7777-2222-3333-444455556666";
const POD2: &str = "default/db/0b7c0f1e-7777-2222-3333-444455556666";

/// Gives the lab network pools that do not fill their routes: `10.147.17.1-200` in
/// `10.147.17.0/24` and `fd00:feed::1-ffff` (assigned from the pool) in `fd00:feed::/96`.
fn dual_stack(ctl: &mut Controller<FileStore>, nwid: NetworkId) {
    let body = json!({
        "v6AssignMode": {"zt": true},
        "ipAssignmentPools": [
            {"ipRangeStart": "10.147.17.1", "ipRangeEnd": "10.147.17.200"},
            {"ipRangeStart": "fd00:feed::1", "ipRangeEnd": "fd00:feed::ffff"},
        ],
        "routes": [{"target": "10.147.17.0/24"}, {"target": "fd00:feed::/96"}],
    });
    ctl.api_network_post(nwid, body.to_string().as_bytes(), 0)
        .unwrap();
}

/// A binding body for pod `name` on `host`, with `ipAssignments` if given.
fn pod_body(name: &str, host: Address, ips: Option<serde_json::Value>) -> Vec<u8> {
    let mut b = json!({"namespace": "default", "name": name, "host": host.to_string()});
    if let Some(ips) = ips {
        b["ipAssignments"] = ips;
    }
    b.to_string().into_bytes()
}

/// A predictable source of "randomness" for IPv6 pool picks: `seed + 1`, `seed + 2`, ...
fn counter(seed: u64) -> impl FnMut() -> u64 {
    let mut n = seed;
    move || {
        n += 1;
        n
    }
}

/// `pod` asks for its config with a fresh vouch of `host` for pod string `pod_id` (IPv6
/// picks from `counter(seed)`); returns the config's static IPs (as text, sorted) and the
/// member's `ipAssignments`.
fn join(
    ctl: &mut Controller<FileStore>,
    host: &Identity,
    pod: &Identity,
    pod_id: &str,
    nwid: NetworkId,
    t: i64,
    seed: u64,
) -> (Vec<String>, Vec<String>) {
    let mut statics: Vec<String> =
        vouched_request(ctl, host, pod, pod_id, nwid, t, &mut counter(seed))
            .static_ips
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
    statics.sort();
    let m = stored_member(ctl, nwid, pod.address());
    (statics, m.ip_assignments)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The IPs (one IPv4, one IPv6) the pools would give `pod` (IPv6 picks from
/// `counter(seed)`) when nothing is reserved: measured on a controller of its own.
fn natural_picks(host_dir: &std::path::Path, pod: &Identity, seed: u64) -> Vec<String> {
    let (mut ctl, host, nwid) = lab(host_dir, true);
    dual_stack(&mut ctl, nwid);
    ctl.api_pod_post(nwid, UID2, &pod_body("db", host.address(), None))
        .unwrap();
    let (statics, ips) = join(&mut ctl, &host, pod, POD2, nwid, 10_000, seed);
    assert_eq!(statics, sorted(ips.clone()));
    assert_eq!(ips.len(), 2, "one IPv4 and one IPv6 pick: {ips:?}");
    ips
}

#[test]
fn reserved_ips_go_to_their_pod_and_nobody_else() {
    let other_pod = ident("identities/identity-2.secret");
    let pod = ident("identities/identity-1.secret");
    let scratch = tempfile::tempdir().unwrap();
    // What the other pod's member and this pod's member would get from the pools.
    let taken_by_other = natural_picks(scratch.path(), &other_pod, 0);
    let scratch2 = tempfile::tempdir().unwrap();
    let own_natural = natural_picks(scratch2.path(), &pod, 100);
    assert!(
        own_natural.iter().all(|ip| !taken_by_other.contains(ip)),
        "the test needs distinct natural picks: {own_natural:?} {taken_by_other:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), true);
    dual_stack(&mut ctl, nwid);
    // A binding restored with a reservation of exactly the other pod's natural picks (one
    // of them spelled in a longer form), a duplicate and IPs outside every pool (two of
    // them inside a route).
    let v6 = taken_by_other
        .iter()
        .find(|ip| ip.contains(':'))
        .unwrap()
        .clone();
    let long_v6 = v6.replacen("fd00:feed::", "fd00:feed:0:0:0:0:0:", 1);
    assert_ne!(long_v6, v6);
    let outside = ["192.0.2.9", "10.147.17.240", "fd00:feed::1:0"];
    let mut reserved = taken_by_other.clone();
    reserved.extend(outside.map(String::from));
    let mut posted = vec![
        taken_by_other[0].clone(),
        taken_by_other[1].clone(),
        long_v6,
    ];
    posted.extend(outside.map(String::from));
    posted.push(taken_by_other[0].clone());
    let w = ctl
        .api_pod_post(
            nwid,
            UID,
            &pod_body("web", host.address(), Some(json!(posted))),
        )
        .unwrap();
    let v4_first = |v: &[String]| {
        let mut ips: Vec<std::net::IpAddr> = v.iter().map(|s| s.parse().unwrap()).collect();
        ips.sort();
        ips.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    assert_eq!(w.binding.ip_assignments, v4_first(&reserved));
    // The stored file carries the field.
    let text =
        std::fs::read_to_string(dir.path().join(format!("network/{nwid}/pod/{UID}.json"))).unwrap();
    assert!(text.contains("\"ipAssignments\":[\"10.147.17."), "{text}");
    assert!(
        ctl.store()
            .ip_reserved(nwid, v6.parse().unwrap(), None)
            .unwrap()
    );

    // The other pod's member comes first and gets other IPs than its natural picks.
    ctl.api_pod_post(nwid, UID2, &pod_body("db", host.address(), None))
        .unwrap();
    let (statics, other_ips) = join(&mut ctl, &host, &other_pod, POD2, nwid, 20_000, 0);
    assert_eq!(statics, sorted(other_ips.clone()));
    assert_eq!(other_ips.len(), 2, "{other_ips:?}");
    for ip in &other_ips {
        assert!(!reserved.contains(ip), "{ip} is reserved for another pod");
    }
    // Its binding follows its member's IPs.
    let b2 = ctl.store().get_pod(nwid, UID2).unwrap().unwrap();
    assert_eq!(b2.ip_assignments, v4_first(&other_ips));
    assert_eq!(b2.members, vec![other_pod.address().to_string()]);

    // A restart rebuilds the reservation index from the binding files.
    drop(ctl);
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let mut ctl = Controller::new(zta, FileStore::open(dir.path()).unwrap());
    let ip: std::net::IpAddr = taken_by_other[0].parse().unwrap();
    assert!(ctl.store().ip_reserved(nwid, ip, None).unwrap());
    assert!(ctl.store().ip_reserved(nwid, ip, Some(UID2)).unwrap());
    assert!(!ctl.store().ip_reserved(nwid, ip, Some(UID)).unwrap());

    // The pod's member gets exactly its reserved pool IPs (not its own natural picks, not
    // those outside the pools), and the binding drops the unusable ones.
    let (statics, ips) = join(&mut ctl, &host, &pod, POD, nwid, 30_000, 100);
    assert_eq!(sorted(ips.clone()), sorted(taken_by_other.clone()));
    assert_eq!(statics, sorted(taken_by_other.clone()));
    let b = ctl.store().get_pod(nwid, UID).unwrap().unwrap();
    assert_eq!(b.ip_assignments, v4_first(&taken_by_other));
    assert_eq!(b.members, vec![pod.address().to_string()]);
    for ip in outside {
        assert!(
            !ctl.store()
                .ip_reserved(nwid, ip.parse().unwrap(), None)
                .unwrap()
        );
    }

    // An API change of the member's IPs reaches its binding.
    let moved = json!({"ipAssignments": ["10.147.17.250", v6]});
    ctl.api_member_post(nwid, pod.address(), moved.to_string().as_bytes(), 40_000)
        .unwrap();
    let b = ctl.store().get_pod(nwid, UID).unwrap().unwrap();
    assert_eq!(
        b.ip_assignments,
        vec!["10.147.17.250".to_string(), v6.clone()]
    );
    let old_v4: std::net::IpAddr = taken_by_other
        .iter()
        .find(|ip| !ip.contains(':'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        !ctl.store().ip_reserved(nwid, old_v4, None).unwrap(),
        "{old_v4} is free again"
    );
}

#[test]
fn reservations_are_checked_and_fixed_once_the_binding_exists() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), true);
    let h = host.address();
    let refused = |ctl: &mut Controller<FileStore>, ips: serde_json::Value| {
        ctl.api_pod_post(nwid, UID, &pod_body("web", h, Some(ips)))
            .unwrap_err()
    };
    let e = refused(&mut ctl, json!(["10.147.17.9", "10.147.17.300"]));
    assert!(
        matches!(e, ApiError::Field { ref field, .. } if field == "ipAssignments"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("\"10.147.17.300\" is not an IP address"),
        "{e}"
    );
    let e = refused(&mut ctl, json!("10.147.17.9"));
    assert!(e.to_string().contains("ipAssignments"), "{e}");
    let e = refused(&mut ctl, json!([1, 2]));
    assert!(e.to_string().contains("ipAssignments"), "{e}");
    let many: Vec<String> = (1..=17).map(|i| format!("10.147.17.{i}")).collect();
    let e = refused(&mut ctl, json!(many));
    assert!(
        matches!(
            e,
            ApiError::TooMany {
                what: "ipAssignments",
                count: 17,
                max: 16
            }
        ),
        "{e}"
    );
    assert!(
        ctl.store().list_pods(nwid).unwrap().is_empty(),
        "nothing stored"
    );
    // Sixteen are fine.
    let w = ctl
        .api_pod_post(nwid, UID, &pod_body("web", h, Some(json!(many[..16]))))
        .unwrap();
    assert_eq!(w.binding.ip_assignments.len(), 16);
    ctl.api_pod_delete(nwid, UID).unwrap().unwrap();

    let w = ctl
        .api_pod_post(nwid, UID, &pod_body("web", h, Some(json!(["10.147.17.9"]))))
        .unwrap();
    assert_eq!(w.binding.ip_assignments, vec!["10.147.17.9"]);
    // Repeating the stored value (in any spelling) or leaving it out is fine ...
    ctl.api_pod_post(nwid, UID, &pod_body("web", h, Some(json!(["10.147.17.9"]))))
        .unwrap();
    let w = ctl
        .api_pod_post(nwid, UID, &binding(h, json!([[1000, 5]])))
        .unwrap();
    assert_eq!(w.binding.ip_assignments, vec!["10.147.17.9"]);
    assert_eq!(w.binding.tags, vec![(1000, 5)]);
    // ... another value is a conflict that changes nothing, not even the tags.
    for other in [
        json!([]),
        json!(["10.147.17.10"]),
        json!(["10.147.17.9", "fd00::1"]),
    ] {
        let body = json!({"namespace": "default", "name": "web", "host": h.to_string(),
            "tags": [[1000, 6]], "ipAssignments": other});
        let e = ctl
            .api_pod_post(nwid, UID, body.to_string().as_bytes())
            .unwrap_err();
        assert!(
            matches!(e, ApiError::PodIpsSetByController(ref u) if u == UID),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("ipAssignments of an existing binding are set by the controller"),
            "{e}"
        );
    }
    assert_eq!(ctl.store().get_pod(nwid, UID).unwrap(), Some(w.binding));

    // Once a member is authorized the controller's value counts: the member got the
    // reserved IP, so the binding is unchanged, and a POST must repeat it.
    let pod = ident("identities/identity-1.secret");
    let (_, ips) = join(&mut ctl, &host, &pod, POD, nwid, 10_000, 0);
    assert_eq!(ips, vec!["10.147.17.9"]);
    let e = ctl
        .api_pod_post(
            nwid,
            UID,
            &pod_body("web", h, Some(json!(["10.147.17.10"]))),
        )
        .unwrap_err();
    assert!(matches!(e, ApiError::PodIpsSetByController(_)), "{e}");
}

#[test]
fn deleting_a_binding_frees_its_reserved_ips() {
    let other_pod = ident("identities/identity-2.secret");
    let scratch = tempfile::tempdir().unwrap();
    let natural = natural_picks(scratch.path(), &other_pod, 0);

    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, host, nwid) = lab(dir.path(), true);
    dual_stack(&mut ctl, nwid);
    ctl.api_pod_post(
        nwid,
        UID,
        &pod_body("web", host.address(), Some(json!(natural))),
    )
    .unwrap();
    let gone = ctl.api_pod_delete(nwid, UID).unwrap().unwrap();
    assert!(gone.removed.is_empty());
    for ip in &natural {
        assert!(
            !ctl.store()
                .ip_reserved(nwid, ip.parse().unwrap(), None)
                .unwrap()
        );
    }
    // With the reservation gone the other pod gets its natural picks again.
    ctl.api_pod_post(nwid, UID2, &pod_body("db", host.address(), None))
        .unwrap();
    let (_, ips) = join(&mut ctl, &host, &other_pod, POD2, nwid, 20_000, 0);
    assert_eq!(sorted(ips), sorted(natural));
}

#[test]
fn a_member_posted_with_ips_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, _host, nwid) = lab(dir.path(), true);
    let node = ident("identities/identity-3.secret");
    let body = json!({"authorized": true, "identity": node.to_public().to_string(),
        "ipAssignments": ["10.147.17.200"]});
    ctl.api_member_post(nwid, node.address(), body.to_string().as_bytes(), 0)
        .unwrap();
    // Even when a binding reserves that IP too, the member keeps what it was given.
    let w = ctl
        .api_pod_post(
            nwid,
            UID,
            &pod_body("web", _host.address(), Some(json!(["10.147.17.200"]))),
        )
        .unwrap();
    assert_eq!(w.binding.ip_assignments, vec!["10.147.17.200"]);
    for (pid, t) in [(1, 1_000), (2, 100_000)] {
        let cfg = config(
            ctl.handle_request(
                nwid,
                &node,
                &pod_metadata(None, false),
                pid,
                t,
                &mut counter(0),
            )
            .unwrap(),
        );
        let statics: Vec<String> = cfg.static_ips.iter().map(|a| a.to_string()).collect();
        assert_eq!(statics, vec!["10.147.17.200/24"]);
        let m = stored_member(&ctl, nwid, node.address());
        assert_eq!(m.ip_assignments, vec!["10.147.17.200"]);
        assert_eq!(m.identity, Some(node.to_public().to_string()));
    }
}
