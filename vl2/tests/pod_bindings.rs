//! Pod bindings (flatwire extension): on a `vouchRequiresPod` network a node's vouch counts
//! only for a pod the binding places on that node; the member gets the binding's tags, a
//! binding's tag change retags it, deleting the binding deletes it (IP back to the pool) and
//! bindings survive a restart of the file store. Also: pinning a member's identity by POST.

mod common;

use common::{ident, zt_one};
use flatwire_vl1::{Address, Identity};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ApiError, Controller, ControllerStore, FileStore, Network, RequestOutcome, RequestRefusal,
};
use flatwire_vl2::dictionary::Dictionary;
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::verbs::{SoftwareVersion, request_metadata};
use flatwire_vl2::vouch::{METADATA_KEY, Vouch, VouchError};
use serde_json::json;

const UID: &str = "0b7c0f1e-1111-2222-3333-444455556666";
const POD: &str = "default/web/0b7c0f1e-1111-2222-3333-444455556666";

fn metadata(v: Option<&Vouch>) -> Dictionary {
    let mut md = request_metadata(
        SoftwareVersion {
            major: 1,
            minor: 14,
            revision: 1,
        },
        None,
    );
    if let Some(v) = v {
        md.add(METADATA_KEY, &v.encode());
    }
    Dictionary::parse(&md.encode())
}

fn config(o: RequestOutcome) -> NetworkConfig {
    match o {
        RequestOutcome::Config(c) => *c,
        other => panic!("expected a config, got {other:?}"),
    }
}

fn tags(cfg: &NetworkConfig) -> Vec<(u32, u32)> {
    cfg.tags.iter().map(|t| (t.id, t.value)).collect()
}

/// The recorded lab network (controller `zta`) in a file store, with `vouchRequiresPod` as
/// given, and host `ztb` authorized with its identity pinned through the API.
fn lab(dir: &std::path::Path, requires_pod: bool) -> (Controller<FileStore>, Identity, NetworkId) {
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let host = ident("capture/node-identities/ztb-e28e6b73a1.secret");
    let mut store = FileStore::open(dir).unwrap();
    let text = String::from_utf8(zt_one(
        "api-json/controller.d/network/e6acfe87fc3adaf6.json",
    ))
    .unwrap();
    let mut n: Network = serde_json::from_str(&text).unwrap();
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

    // No binding: refused.
    assert_eq!(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 1, t0, &mut rnd)
            .unwrap(),
        refused
    );
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::NoPodBinding(POD.into()))
    );
    // A binding on another host: refused.
    let elsewhere: Address = "0badc0ffee".parse().unwrap();
    ctl.api_pod_post(nwid, UID, &binding(elsewhere, json!([])))
        .unwrap();
    assert_eq!(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 2, t0 + 1500, &mut rnd)
            .unwrap(),
        refused
    );
    assert!(
        matches!(ctl.last_vouch_error(), Some(VouchError::WrongHost { bound, .. }) if bound == "0badc0ffee"),
        "{:?}",
        ctl.last_vouch_error()
    );
    // The binding of another pod name under the same uid does not count either.
    let renamed = json!({"namespace": "default", "name": "db", "host": host.address().to_string()});
    ctl.api_pod_post(nwid, UID, renamed.to_string().as_bytes())
        .unwrap();
    assert_eq!(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 3, t0 + 3000, &mut rnd)
            .unwrap(),
        refused
    );
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
    let mut md = metadata(None);
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
    assert_eq!(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 0, t0 + 5000, &mut rnd)
            .unwrap(),
        refused
    );
    // The genuine vouch: authorized, with the binding's tag in the first config.
    let cfg = config(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 5, t0 + 6000, &mut rnd)
            .unwrap(),
    );
    assert_eq!(tags(&cfg), vec![(1000, 200)]);
    let m = ctl
        .store()
        .get_member(nwid, pod.address())
        .unwrap()
        .unwrap();
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
            &metadata(Some(&old)),
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
    let cfg = config(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 0, t0 + 9000, &mut rnd)
            .unwrap(),
    );
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
    assert_eq!(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 7, t0 + 12_000, &mut rnd)
            .unwrap(),
        refused
    );
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::NoPodBinding(POD.into()))
    );
    // The host member is untouched.
    assert!(
        ctl.store()
            .get_member(nwid, host.address())
            .unwrap()
            .unwrap()
            .authorized
    );
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
    let mut rnd = || 3u64;
    ctl.api_pod_post(nwid, UID, &binding(host.address(), json!([])))
        .unwrap();
    let v = Vouch::sign(&host, pod.address(), nwid, POD, 10_000).unwrap();
    config(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 1, 10_000, &mut rnd)
            .unwrap(),
    );
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
    let mut rnd = || 3u64;
    let v = Vouch::sign(&host, pod.address(), nwid, POD, 10_000).unwrap();
    let cfg = config(
        ctl.handle_request(nwid, &pod, &metadata(Some(&v)), 1, 10_000, &mut rnd)
            .unwrap(),
    );
    assert_eq!(tags(&cfg), vec![(1000, 1)], "the network's default tag");
    // The flag is not written while false (ZeroTier's files stay as they were).
    let n = ctl.store().get_network(nwid).unwrap().unwrap();
    let text = flatwire_vl2::controller::to_canonical_json(&n).unwrap();
    assert!(!text.contains("vouchRequiresPod"), "{text}");
}
