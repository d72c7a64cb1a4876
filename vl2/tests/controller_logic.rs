//! The controller's request procedure, checked against the recorded ZeroTier lab.

mod common;

use common::{
    add_capability_tag_and_dns, config, ident, lab_network, node_metadata, stored_member, zt_one,
};
use flatwire_vl1::{Address, Identity};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    Controller, ControllerStore, Member, MemberAuthorizer, MemoryStore, Network, RequestOutcome,
    RequestRefusal,
};
use flatwire_vl2::dictionary::Dictionary;
use flatwire_vl2::netconf::NetworkConfig;

/// What a 1.14.1 node sends (without the platform key).
fn metadata() -> Dictionary {
    node_metadata(None)
}

fn lab() -> (Controller<MemoryStore>, Identity, Identity, NetworkId) {
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let ztb = ident("capture/node-identities/ztb-e28e6b73a1.public");
    let mut store = MemoryStore::default();
    let mut n = lab_network();
    store.put_network(&mut n).unwrap();
    assert_eq!(n.revision, 1);
    (
        Controller::new(zta.clone(), store),
        zta,
        ztb,
        "e6acfe87fc3adaf6".parse().unwrap(),
    )
}

#[test]
fn private_network_denies_then_serves_the_lab_config() {
    let (mut ctl, zta, ztb, nwid) = lab();
    let mut rnd = || 4u64;
    let md = metadata();
    let out = ctl
        .handle_request(nwid, &ztb, &md, 1, 1000, &mut rnd)
        .unwrap();
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::AccessDenied));
    assert_eq!(RequestRefusal::AccessDenied.error_code(), 7);
    let mut m = stored_member(&ctl, nwid, ztb.address());
    assert_eq!(m.identity.as_deref(), Some(ztb.to_string().as_str()));
    // A repeat within 1000 ms is ignored.
    assert_eq!(
        ctl.handle_request(nwid, &ztb, &md, 2, 1500, &mut rnd)
            .unwrap(),
        RequestOutcome::Ignore
    );

    m.authorized = true;
    ctl.store_mut().put_member(&mut m).unwrap();
    let cfg = config(
        ctl.handle_request(nwid, &ztb, &md, 3, 5000, &mut rnd)
            .unwrap(),
    );
    // The real controller gave ztb 10.147.17.244 and zta 10.147.17.251 from this pool.
    assert_eq!(cfg.static_ips[0].to_string(), "10.147.17.244/24");
    let stored = stored_member(&ctl, nwid, ztb.address());
    assert_eq!(stored.ip_assignments, vec!["10.147.17.244".to_string()]);
    assert_eq!(
        (stored.v_major, stored.v_minor, stored.v_rev, stored.v_proto),
        (1, 14, 1, 12)
    );
    assert!(cfg.com.as_ref().unwrap().verify(&zta));
    assert!(cfg.certificates_of_ownership[0].verify(&zta));
    assert!(cfg.certificates_of_ownership[0].owns_ip(&[10, 147, 17, 244]));

    // Everything but the timestamp and signatures equals what ZeroTier sent ztb.
    let recorded =
        NetworkConfig::decode(&zt_one("api-json/netconf/ztb-e6acfe87fc3adaf6.conf")).unwrap();
    let mut mine = cfg.clone();
    mine.timestamp = recorded.timestamp;
    mine.com = recorded.com.clone();
    mine.certificates_of_ownership = recorded.certificates_of_ownership.clone();
    assert_eq!(mine, recorded);
    let (a, b) = (cfg.com.as_ref().unwrap(), recorded.com.as_ref().unwrap());
    assert_eq!(a.qualifiers[1..], b.qualifiers[1..]);
    assert_eq!(
        cfg.certificates_of_ownership[0].things,
        recorded.certificates_of_ownership[0].things
    );

    // The controller's own member gets .251 next.
    let mut me = Member::new(nwid, zta.address(), 0);
    me.authorized = true;
    ctl.store_mut().put_member(&mut me).unwrap();
    let cfg = config(
        ctl.handle_request(nwid, &zta.to_public(), &md, 9, 9000, &mut rnd)
            .unwrap(),
    );
    assert_eq!(cfg.static_ips[0].to_string(), "10.147.17.251/24");
}

#[test]
fn identity_pinning_unknown_network_and_foreign_ids() {
    let (mut ctl, _zta, ztb, nwid) = lab();
    let mut rnd = || 0u64;
    let md = metadata();
    let _ = ctl.handle_request(nwid, &ztb, &md, 1, 0, &mut rnd).unwrap();
    let mut m = stored_member(&ctl, nwid, ztb.address());
    m.identity = Some(ident("identities/identity-2.public").to_string().replacen(
        &ident("identities/identity-2.public").address().to_string(),
        &ztb.address().to_string(),
        1,
    ));
    m.authorized = true;
    ctl.store_mut().put_member(&mut m).unwrap();
    let out = ctl
        .handle_request(nwid, &ztb, &md, 2, 5000, &mut rnd)
        .unwrap();
    assert_eq!(out, RequestOutcome::Refuse(RequestRefusal::AccessDenied));
    let other: NetworkId = "e6acfe87fc000001".parse().unwrap();
    assert_eq!(
        ctl.handle_request(other, &ztb, &md, 3, 9000, &mut rnd)
            .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::ObjectNotFound)
    );
    let foreign: NetworkId = "1122334455000001".parse().unwrap();
    assert_eq!(
        ctl.handle_request(foreign, &ztb, &md, 4, 20000, &mut rnd)
            .unwrap(),
        RequestOutcome::Ignore
    );
}

struct Vouch(Address);

impl MemberAuthorizer for Vouch {
    fn authorize(
        &self,
        _: &Network,
        _: &Member,
        requester: &Identity,
        _: &Dictionary,
        _: i64,
    ) -> bool {
        requester.address() == self.0
    }
}

#[test]
fn public_networks_vouchers_tags_capabilities_and_v6_modes() {
    let (mut ctl, zta, ztb, nwid) = lab();
    let mut rnd = || 0u64;
    ctl.add_authorizer(Box::new(Vouch(ztb.address())));
    let cfg = config(
        ctl.handle_request(nwid, &ztb, &metadata(), 1, 0, &mut rnd)
            .unwrap(),
    );
    let m = stored_member(&ctl, nwid, ztb.address());
    assert_eq!(m.last_authorized_credential_type.as_deref(), Some("vouch"));
    assert!(cfg.com.is_some());

    let mut n = ctl.store().get_network(nwid).unwrap().unwrap();
    n.private = false;
    n.v6_assign_mode.rfc4193 = true;
    n.v6_assign_mode.sixplane = true;
    add_capability_tag_and_dns(&mut n);
    ctl.store_mut().put_network(&mut n).unwrap();
    let someone = ident("identities/identity-4.public");
    let cfg = config(
        ctl.handle_request(nwid, &someone, &metadata(), 1, 100, &mut rnd)
            .unwrap(),
    );
    let m = stored_member(&ctl, nwid, someone.address());
    assert_eq!(m.last_authorized_credential_type.as_deref(), Some("public"));
    assert_eq!(m.capabilities, vec![7]);
    assert_eq!(m.tags, vec![(3, 9)]);
    assert_eq!(cfg.flags & 0x4, 0x4);
    assert_eq!(cfg.static_ips.len(), 3);
    assert_eq!(cfg.capabilities[0].holder(), Some(someone.address()));
    assert!(cfg.capabilities[0].verify(|a| (a == zta.address()).then_some(&zta)));
    assert!(cfg.tags[0].verify(&zta) && cfg.tags[0].value == 9);
    assert_eq!(cfg.dns.domain, "lab");
    assert!(!cfg.private);
    assert_eq!(cfg.revision, 2);
    let rev = ctl.revoke(nwid, someone.address(), 5, 200).unwrap();
    assert!(rev.verify(&zta));
}

/// Host `ztb` is an authorized member; `pod` asks with a vouch `ztb` signed for it.
fn vouch_metadata(v: &flatwire_vl2::vouch::Vouch) -> Dictionary {
    let mut md = metadata();
    md.add(flatwire_vl2::vouch::METADATA_KEY, &v.encode());
    // Through the wire form, as the member sends it.
    Dictionary::parse(&md.encode())
}

#[test]
fn node_vouch_authorizes_pods_of_authorized_hosts_only() {
    use flatwire_vl2::vouch::{MAX_SKEW_MS, Vouch, VouchError};
    let (mut ctl, _, _, nwid) = lab();
    let host = ident("capture/node-identities/ztb-e28e6b73a1.secret");
    let pod = ident("identities/identity-1.secret");
    let intruder = ident("identities/identity-2.secret");
    let mut rnd = || 5u64;
    let t0 = 1_000_000;
    let v = Vouch::sign(&host, pod.address(), nwid, "default/web/uid-1", t0).unwrap();

    // The host is not an authorized member yet: its vouch counts for nothing.
    assert_eq!(
        ctl.handle_request(nwid, &pod, &vouch_metadata(&v), 1, t0, &mut rnd)
            .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::AccessDenied)
    );
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::UntrustedHost(host.address()))
    );
    // The host asks (pinning its identity) and is authorized by the operator.
    ctl.handle_request(nwid, &host, &metadata(), 2, t0, &mut rnd)
        .unwrap();
    let mut h = stored_member(&ctl, nwid, host.address());
    h.authorized = true;
    ctl.store_mut().put_member(&mut h).unwrap();

    // A vouch signed by someone else in the host's name is refused.
    let forged = Vouch::sign(&intruder, pod.address(), nwid, "default/web/uid-1", t0).unwrap();
    let mut bytes = forged.encode();
    bytes[1..6].copy_from_slice(&host.address().to_bytes());
    let mut md = metadata();
    md.add(flatwire_vl2::vouch::METADATA_KEY, &bytes);
    assert_eq!(
        ctl.handle_request(nwid, &pod, &md, 3, t0 + 2000, &mut rnd)
            .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::AccessDenied)
    );
    assert_eq!(
        ctl.last_vouch_error(),
        Some(&VouchError::BadSignature(host.address()))
    );
    // The pod's vouch presented by another identity is refused.
    assert_eq!(
        ctl.handle_request(nwid, &intruder, &vouch_metadata(&v), 4, t0 + 2000, &mut rnd)
            .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::AccessDenied)
    );
    assert!(matches!(
        ctl.last_vouch_error(),
        Some(VouchError::WrongMember { .. })
    ));
    // A stale vouch is refused.
    let stale = Vouch::sign(
        &host,
        pod.address(),
        nwid,
        "default/web/uid-1",
        t0 - MAX_SKEW_MS - 10,
    )
    .unwrap();
    assert_eq!(
        ctl.handle_request(nwid, &pod, &vouch_metadata(&stale), 5, t0 + 4000, &mut rnd)
            .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::AccessDenied)
    );
    assert!(matches!(ctl.last_vouch_error(), Some(VouchError::Stale(_))));

    // The genuine vouch authorizes the pod, named after it.
    let cfg = config(
        ctl.handle_request(nwid, &pod, &vouch_metadata(&v), 6, t0 + 8000, &mut rnd)
            .unwrap(),
    );
    assert!(cfg.com.is_some());
    let m = stored_member(&ctl, nwid, pod.address());
    assert!(m.authorized);
    assert_eq!(m.last_authorized_credential_type.as_deref(), Some("vouch"));
    assert_eq!(m.name.as_deref(), Some("default/web/uid-1"));

    // An older vouch of the same host for the same pod, now for another identity, is a replay.
    let old = Vouch::sign(&host, intruder.address(), nwid, "default/web/uid-1", t0 - 1).unwrap();
    assert_eq!(
        ctl.handle_request(
            nwid,
            &intruder,
            &vouch_metadata(&old),
            7,
            t0 + 9000,
            &mut rnd
        )
        .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::AccessDenied)
    );
    assert!(matches!(
        ctl.last_vouch_error(),
        Some(VouchError::Replayed { .. })
    ));
    // Garbage in the vouch key is refused, not a crash.
    let mut md = metadata();
    md.add(flatwire_vl2::vouch::METADATA_KEY, b"\x01garbage");
    assert_eq!(
        ctl.handle_request(nwid, &intruder, &md, 8, t0 + 11_000, &mut rnd)
            .unwrap(),
        RequestOutcome::Refuse(RequestRefusal::AccessDenied)
    );
    assert!(matches!(
        ctl.last_vouch_error(),
        Some(VouchError::Malformed(_))
    ));
}
