//! Releasing a pod's member (flatwire extension, `fwleave`): the controller deletes the
//! requester's own record when a vouch authorized it, so its IP serves the next member; other
//! members are kept; a pod binding keeps its reservation; and the member runtime sends the
//! release on schedule, stops at the controller's answer or gives up after a second.

mod common;

use common::{config, ident, lab_network, pod_metadata, stored_member};
use flatwire_vl1::{Address, Identity, Verb};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    Controller, ControllerStore, MemoryStore, RequestOutcome, RequestRefusal, refusal_payload,
};
use flatwire_vl2::member::{MemberOptions, Network as Member, Output, Release};
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::verbs::ConfigRequest;
use flatwire_vl2::vouch::{METADATA_KEY, RELEASE_KEY, RELEASE_SENDS_MS, RELEASE_TIMEOUT_MS, Vouch};
use serde_json::json;

const NWID: &str = "e6acfe87fc3adaf6";
/// The only address the test pool hands out (ZeroTier's pick never takes a range's end).
const ONLY_IP: &str = "10.147.17.1";

fn ips(cfg: &NetworkConfig) -> Vec<String> {
    cfg.static_ips.iter().map(|a| a.ip.to_string()).collect()
}

/// The recorded lab network (controller `zta`) with a one-address pool, `vouchRequiresPod`
/// as given, and host `ztb` authorized through the API with its identity pinned.
fn lab<S: ControllerStore>(store: S, requires_pod: bool) -> (Controller<S>, Identity, NetworkId) {
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let host = ident("capture/node-identities/ztb-e28e6b73a1.secret");
    let mut store = store;
    let mut n = lab_network();
    store.put_network(&mut n).unwrap();
    let nwid: NetworkId = NWID.parse().unwrap();
    let mut ctl = Controller::new(zta, store);
    let body = json!({
        "vouchRequiresPod": requires_pod,
        "ipAssignmentPools": [{"ipRangeStart": ONLY_IP, "ipRangeEnd": "10.147.17.2"}],
    });
    ctl.api_network_post(nwid, body.to_string().as_bytes(), 0)
        .unwrap();
    let body = json!({"authorized": true, "identity": host.to_public().to_string()});
    ctl.api_member_post(nwid, host.address(), body.to_string().as_bytes(), 0)
        .unwrap();
    (ctl, host, nwid)
}

fn pod(n: u8) -> Identity {
    ident(&format!("identities/identity-{n}.secret"))
}

fn exists<S: ControllerStore>(ctl: &Controller<S>, nwid: NetworkId, a: Address) -> bool {
    ctl.store().get_member(nwid, a).unwrap().is_some()
}

/// `who` asks the controller for its config on `nwid` (packet ID `pid`, at `now`; every
/// random number is 5), presenting `vouch` and, if `release`, the release marker.
fn request<S: ControllerStore>(
    ctl: &mut Controller<S>,
    nwid: NetworkId,
    who: &Identity,
    vouch: Option<&Vouch>,
    release: bool,
    pid: u64,
    now: i64,
) -> RequestOutcome {
    let md = pod_metadata(vouch, release);
    ctl.handle_request(nwid, who, &md, pid, now, &mut || 5)
        .unwrap()
}

#[test]
fn a_released_pod_member_is_deleted_and_its_ip_serves_the_next() {
    let (mut ctl, host, nwid) = lab(MemoryStore::default(), false);
    let (a, b) = (pod(1), pod(2));
    let t0 = 1_000_000;
    let va = Vouch::sign(&host, a.address(), nwid, "default/a/uid-a", t0).unwrap();
    let vb = Vouch::sign(&host, b.address(), nwid, "default/b/uid-b", t0).unwrap();
    let ca = config(request(&mut ctl, nwid, &a, Some(&va), false, 1, t0));
    assert_eq!(ips(&ca), [ONLY_IP]);
    let stored = stored_member(&ctl, nwid, a.address());
    assert_eq!(
        stored.last_authorized_credential_type.as_deref(),
        Some("vouch")
    );
    // The pool is dry for the second pod.
    let cb = config(request(&mut ctl, nwid, &b, Some(&vb), false, 2, t0));
    assert!(ips(&cb).is_empty(), "{:?}", ips(&cb));

    // A's release, right after its request (inside the duplicate window): deleted.
    let out = request(&mut ctl, nwid, &a, Some(&va), true, 3, t0 + 10);
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::Released));
    assert_eq!(RequestRefusal::Released.error_code(), 0x03);
    assert!(!exists(&ctl, nwid, a.address()));
    // A resent release is acknowledged the same way (no record), and leaves none behind.
    let out = request(&mut ctl, nwid, &a, Some(&va), true, 4, t0 + 20);
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::ObjectNotFound));
    assert!(!exists(&ctl, nwid, a.address()));
    // A push replaying release metadata does nothing.
    let out = request(&mut ctl, nwid, &a, Some(&va), true, 0, t0 + 30);
    assert_eq!(out, RequestOutcome::Ignore);
    assert!(!exists(&ctl, nwid, a.address()));

    // B's next request gets the freed address.
    let cb = config(request(&mut ctl, nwid, &b, Some(&vb), false, 5, t0 + 2000));
    assert_eq!(ips(&cb), [ONLY_IP]);
}

#[test]
fn members_not_authorized_by_a_vouch_are_never_released() {
    let (mut ctl, host, nwid) = lab(MemoryStore::default(), false);
    let t0 = 1_000_000;
    // The host, authorized through the API, takes the address.
    let c = config(request(&mut ctl, nwid, &host, None, false, 1, t0));
    assert_eq!(ips(&c), [ONLY_IP]);
    let before = ctl.store().get_member(nwid, host.address()).unwrap();
    let out = request(&mut ctl, nwid, &host, None, true, 2, t0 + 10);
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::AccessDenied));
    assert_eq!(
        ctl.store().get_member(nwid, host.address()).unwrap(),
        before,
        "the record is untouched"
    );
    // It keeps being served with its address.
    let c = config(request(&mut ctl, nwid, &host, None, false, 3, t0 + 2000));
    assert_eq!(ips(&c), [ONLY_IP]);
}

#[test]
fn a_release_deletes_only_the_requesters_own_record() {
    let (mut ctl, host, nwid) = lab(MemoryStore::default(), false);
    let (a, intruder) = (pod(1), pod(3));
    let t0 = 1_000_000;
    let va = Vouch::sign(&host, a.address(), nwid, "default/a/uid-a", t0).unwrap();
    let ca = config(request(&mut ctl, nwid, &a, Some(&va), false, 1, t0));
    assert_eq!(ips(&ca), [ONLY_IP]);
    // Another member presenting A's vouch with the marker releases nothing of A's, and is
    // not recorded.
    let out = request(&mut ctl, nwid, &intruder, Some(&va), true, 2, t0 + 10);
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::ObjectNotFound));
    assert!(!exists(&ctl, nwid, intruder.address()));
    let kept = stored_member(&ctl, nwid, a.address());
    assert!(kept.authorized);
    assert_eq!(kept.ip_assignments, [ONLY_IP]);
    // A member of another network is untouched by a release on this one.
    let other: NetworkId = "e6acfe87fc000001".parse().unwrap();
    let out = request(&mut ctl, other, &a, Some(&va), true, 3, t0 + 20);
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::ObjectNotFound));
    assert!(exists(&ctl, nwid, a.address()));
}

#[test]
fn a_release_keeps_the_pod_bindings_reservation() {
    let (mut ctl, host, nwid) = lab(MemoryStore::default(), true);
    let (first, other, next) = (pod(1), pod(2), pod(4));
    let t0 = 1_000_000;
    let (web, db) = ("uid-web", "uid-db");
    for (uid, name) in [(web, "web"), (db, "db")] {
        let body =
            json!({"namespace": "default", "name": name, "host": host.address().to_string()});
        ctl.api_pod_post(nwid, uid, body.to_string().as_bytes())
            .unwrap();
    }
    let web_pod = format!("default/web/{web}");
    let v1 = Vouch::sign(&host, first.address(), nwid, &web_pod, t0).unwrap();
    let c = config(request(&mut ctl, nwid, &first, Some(&v1), false, 1, t0));
    assert_eq!(ips(&c), [ONLY_IP]);
    assert_eq!(
        ctl.store()
            .get_pod(nwid, web)
            .unwrap()
            .unwrap()
            .ip_assignments,
        [ONLY_IP]
    );

    // The sandbox goes: its member is released, the binding keeps the pod's address.
    let out = request(&mut ctl, nwid, &first, Some(&v1), true, 2, t0 + 10);
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::Released));
    assert!(!exists(&ctl, nwid, first.address()));
    let b = ctl.store().get_pod(nwid, web).unwrap().unwrap();
    assert_eq!(b.ip_assignments, [ONLY_IP], "{b:?}");

    // Another pod does not get the reserved address ...
    let vo = Vouch::sign(
        &host,
        other.address(),
        nwid,
        &format!("default/db/{db}"),
        t0,
    )
    .unwrap();
    let c = config(request(
        &mut ctl,
        nwid,
        &other,
        Some(&vo),
        false,
        3,
        t0 + 20,
    ));
    assert!(ips(&c).is_empty(), "{:?}", ips(&c));
    // ... the pod's next sandbox does.
    let v2 = Vouch::sign(&host, next.address(), nwid, &web_pod, t0 + 30).unwrap();
    let c = config(request(&mut ctl, nwid, &next, Some(&v2), false, 4, t0 + 30));
    assert_eq!(ips(&c), [ONLY_IP]);
    assert!(
        ctl.store()
            .get_pod(nwid, web)
            .unwrap()
            .unwrap()
            .members
            .contains(&next.address().to_string())
    );
}

/// The config requests among `out`, decoded.
fn requests(out: &[Output]) -> Vec<ConfigRequest> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send {
                verb: Verb::NETWORK_CONFIG_REQUEST,
                payload,
                ..
            } => Some(ConfigRequest::decode(payload).unwrap()),
            _ => None,
        })
        .collect()
}

fn drain(n: &mut Member) -> Vec<Output> {
    std::iter::from_fn(|| n.poll_output()).collect()
}

#[test]
fn the_member_resends_its_release_then_gives_up() {
    let (_ctl, host, nwid) = lab(MemoryStore::default(), false);
    let a = pod(1);
    let t0 = 1_000_000;
    let opts = MemberOptions {
        vouch: Some(Vouch::sign(&host, a.address(), nwid, "default/a/uid-a", t0).unwrap()),
        ..MemberOptions::default()
    };
    let mut n = Member::join(a.address(), nwid, opts, t0);
    drain(&mut n);
    assert_eq!(n.release_state(), None);
    assert!(n.release(t0 + 100));
    assert!(!n.release(t0 + 100), "one release at a time");
    let mut sent_at = Vec::new();
    let mut now = t0 + 100;
    while n.release_state() == Some(Release::Pending) {
        for r in requests(&drain(&mut n)) {
            let md = r.metadata_dictionary();
            assert!(md.get(RELEASE_KEY).is_some() && md.get(METADATA_KEY).is_some());
            assert_eq!(r.nwid, nwid);
            sent_at.push(now - (t0 + 100));
        }
        now = n.poll_timeout();
        n.handle_timeout(now);
    }
    assert_eq!(sent_at, RELEASE_SENDS_MS);
    assert_eq!(n.release_state(), Some(Release::Unanswered));
    assert_eq!(now - (t0 + 100), RELEASE_TIMEOUT_MS);
    // Nothing more is asked.
    n.handle_timeout(now + 120_000);
    assert!(requests(&drain(&mut n)).is_empty());
}

#[test]
fn the_controllers_answer_ends_the_release() {
    let (mut ctl, host, nwid) = lab(MemoryStore::default(), false);
    let ctl_addr = ctl.identity().address();
    let pubs = [ctl.identity().to_public(), host.to_public()];
    let dir = |x: Address| pubs.iter().find(|i| i.address() == x).cloned();
    let mut rnd = || 5u64;
    let t0 = 1_000_000;
    // A pod and the host (not vouched) each release through the real request path.
    for (who, vouched, expect) in [
        (pod(1), true, Release::Deleted),
        (host.clone(), false, Release::Refused),
    ] {
        let vouch = vouched
            .then(|| Vouch::sign(&host, who.address(), nwid, "default/a/uid-a", t0).unwrap());
        let opts = MemberOptions {
            vouch,
            ..MemberOptions::default()
        };
        let mut n = Member::join(who.address(), nwid, opts, t0);
        for r in requests(&drain(&mut n)) {
            let md = r.metadata_dictionary();
            config(
                ctl.handle_request(nwid, &who, &md, 1, t0, &mut rnd)
                    .unwrap(),
            );
        }
        assert!(n.release(t0 + 50));
        let reqs = requests(&drain(&mut n));
        assert_eq!(reqs.len(), 1);
        let md = reqs[0].metadata_dictionary();
        let RequestOutcome::Refuse(r) = ctl
            .handle_request(nwid, &who, &md, 77, t0 + 60, &mut rnd)
            .unwrap()
        else {
            panic!("a release is answered with an error");
        };
        let p = refusal_payload(77, r, nwid);
        n.handle_packet(t0 + 70, ctl_addr, Verb::ERROR, 2, &p, &dir);
        assert_eq!(n.release_state(), Some(expect));
        assert_eq!(exists(&ctl, nwid, who.address()), !vouched);
        // No resend after the answer.
        let now = n.poll_timeout();
        n.handle_timeout(now);
        assert!(requests(&drain(&mut n)).is_empty());
    }
}
