//! The controller's request procedure: authorization, IP assignment and building the
//! signed network config (EmbeddedNetworkController semantics).
//!
//! A flatwire extension: a request whose metadata carries [`vouch::RELEASE_KEY`] asks the
//! controller to delete the requester's member (a pod that goes; see
//! [Release](crate::vouch#release)). A record authorized by a vouch is deleted (its IPs
//! return to the pool; a pod binding keeps its `ipAssignments` reservation for the pod's next
//! member) and the answer is [`RequestRefusal::Released`], whose caller revokes the member's
//! certificate as for a deletion through the API; other members are kept
//! ([`RequestRefusal::AccessDenied`]), and a requester without a record gets
//! [`RequestRefusal::ObjectNotFound`], so a repeated release is acknowledged too.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flatwire_vl1::{Address, Identity};
use serde_json::Value;

use super::index::{binding_ips, member_ips};
use super::pods::pod_uid;
use super::{ControllerStore, Member, Network, PodBinding, StoreError};
use crate::NetworkId;
use crate::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, CredentialType, Revocation,
    SignError, Tag,
};
use crate::dictionary::Dictionary;
use crate::ip::{InetAddress, in_prefix, rfc4193, sixplane};
use crate::jsonutil::{json_bool, json_int};
use crate::netconf::{
    Dns, FLAG_ENABLE_BROADCAST, FLAG_NDP_EMULATION, NetworkConfig, Route, SPECIALIST_ACTIVE_BRIDGE,
};
use crate::rules::{MAX_CAPABILITY_RULES, MAX_RULES, Rule, RuleKind, rules_from_json};
use crate::vouch::{self, Vouch, VouchError};

/// Default credential time max delta.
pub const DEFAULT_CTMD: i64 = 1_800_000;
/// Accepted vouches remembered before those older than the skew window are forgotten.
const VOUCH_MEMORY: usize = 4096;

/// Why the controller refuses a request (the VL2 ERROR code to send).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestRefusal {
    /// 0x03: the network does not exist.
    ObjectNotFound,
    /// 0x07: the member is not authorized (or its identity does not match the pinned one),
    /// or it asked to be released but was not authorized by a vouch (it is kept).
    AccessDenied,
    /// 0x03 (as [`RequestRefusal::ObjectNotFound`]): the member asked to be released and its
    /// record was deleted; revoke its certificate (see [Release](crate::vouch#release)).
    Released,
}

impl RequestRefusal {
    /// The VL1 ERROR code byte.
    pub fn error_code(self) -> u8 {
        match self {
            Self::ObjectNotFound | Self::Released => 0x03,
            Self::AccessDenied => 0x07,
        }
    }
}

/// What to do with a config request.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestOutcome {
    /// Not for us, or a duplicate within 1000 ms: send nothing.
    Ignore,
    /// Send ERROR with this code (only when the request had a packet id).
    Refuse(RequestRefusal),
    /// Send this config.
    Config(Box<NetworkConfig>),
}

/// Why the controller could not process a request.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed (the controller identity has no secret).
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// An extension point that may authorize a member the network would refuse, e.g. a
/// flatwire node vouching for a pod it hosts.
pub trait MemberAuthorizer {
    /// True to authorize `requester` as `member` on `network`, given its request metadata.
    fn authorize(
        &self,
        network: &Network,
        member: &Member,
        requester: &Identity,
        metadata: &Dictionary,
        now: i64,
    ) -> bool;
    /// The `lastAuthorizedCredentialType` recorded for such an authorization.
    fn credential_type(&self) -> &str {
        "vouch"
    }
}

/// A network controller over a store. Sans-I/O: the caller passes `now` and randomness.
pub struct Controller<S: ControllerStore> {
    identity: Identity,
    store: S,
    authorizers: Vec<Box<dyn MemberAuthorizer>>,
    last_request: HashMap<(NetworkId, Address), i64>,
    /// (host, pod) -> (member, vouch timestamp) of accepted vouches, to refuse replays.
    vouches: HashMap<(Address, String), (Address, i64)>,
    last_vouch_error: Option<VouchError>,
}

pub(super) fn parse_cidr(s: &str) -> Option<(IpAddr, u16)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: IpAddr = ip.trim().parse().ok()?;
    let bits: u16 = bits.trim().parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn network_of(ip: IpAddr, bits: u16) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl<S: ControllerStore> Controller<S> {
    /// A controller signing with `identity` (must hold its secret key).
    pub fn new(identity: Identity, store: S) -> Self {
        Self {
            identity,
            store,
            authorizers: Vec::new(),
            last_request: HashMap::new(),
            vouches: HashMap::new(),
            last_vouch_error: None,
        }
    }

    /// Adds an authorizer consulted for members that are not otherwise authorized.
    pub fn add_authorizer(&mut self, a: Box<dyn MemberAuthorizer>) {
        self.authorizers.push(a);
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (API writes).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The controller's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Why the last vouch presented to this controller was refused, if it was.
    pub fn last_vouch_error(&self) -> Option<&VouchError> {
        self.last_vouch_error.as_ref()
    }

    /// The vouch in `metadata` if it lets `who` onto `network` (see [`crate::vouch`]), with
    /// the pod binding it needed (on a `vouchRequiresPod` network); a vouch that does not is
    /// remembered in [`Controller::last_vouch_error`].
    fn vouched(
        &mut self,
        network: &Network,
        nwid: NetworkId,
        who: Address,
        metadata: &Dictionary,
        now: i64,
    ) -> Result<Option<(Vouch, Option<PodBinding>)>, ControllerError> {
        let Some(bytes) = metadata.get(vouch::METADATA_KEY) else {
            return Ok(None);
        };
        let checked = match Vouch::decode(bytes) {
            Ok(v) => self.check_vouch(v, network.vouch_requires_pod, nwid, who, now)?,
            Err(e) => Err(e),
        };
        Ok(match checked {
            Ok(v) => {
                self.last_vouch_error = None;
                Some(v)
            }
            Err(e) => {
                self.last_vouch_error = Some(e);
                None
            }
        })
    }

    /// The binding of the vouch's pod if it places the pod on the vouching host.
    fn binding_for(
        &self,
        nwid: NetworkId,
        v: &Vouch,
    ) -> Result<Result<PodBinding, VouchError>, StoreError> {
        let unbound = || VouchError::NoPodBinding(v.pod.clone());
        let Some(uid) = pod_uid(&v.pod) else {
            return Ok(Err(unbound()));
        };
        let Some(b) = self.store.get_pod(nwid, uid)? else {
            return Ok(Err(unbound()));
        };
        if b.pod_id() != v.pod {
            return Ok(Err(unbound()));
        }
        if b.host != v.host.to_string() {
            return Ok(Err(VouchError::WrongHost {
                pod: v.pod.clone(),
                host: v.host,
                bound: b.host,
            }));
        }
        Ok(Ok(b))
    }

    fn check_vouch(
        &mut self,
        v: Vouch,
        requires_pod: bool,
        nwid: NetworkId,
        who: Address,
        now: i64,
    ) -> Result<Result<(Vouch, Option<PodBinding>), VouchError>, ControllerError> {
        let host = self
            .store
            .get_member(nwid, v.host)?
            .filter(|h| h.authorized)
            .and_then(|h| h.identity)
            .and_then(|id| id.parse::<Identity>().ok());
        let Some(host) = host else {
            return Ok(Err(VouchError::UntrustedHost(v.host)));
        };
        if let Err(e) = v.verify(&host, who, nwid, now) {
            return Ok(Err(e));
        }
        let binding = if requires_pod {
            match self.binding_for(nwid, &v)? {
                Ok(b) => Some(b),
                Err(e) => return Ok(Err(e)),
            }
        } else {
            None
        };
        let key = (v.host, v.pod.clone());
        if let Some(&(member, t)) = self.vouches.get(&key)
            && member != who
            && t >= v.timestamp
        {
            return Ok(Err(VouchError::Replayed {
                host: v.host,
                pod: v.pod,
                member,
            }));
        }
        if self.vouches.len() >= VOUCH_MEMORY {
            self.vouches
                .retain(|_, (_, t)| *t >= now.saturating_sub(vouch::MAX_SKEW_MS));
        }
        self.vouches.insert(key, (who, v.timestamp));
        Ok(Ok((v, binding)))
    }

    /// Handles NETWORK_CONFIG_REQUEST from `requester` (call when one arrives, or with
    /// `packet_id` 0 to build a push after a change; a push does not accept a vouch). `random`
    /// supplies 64-bit randomness for IPv6 pool assignment. A request carrying
    /// [`vouch::RELEASE_KEY`] is a release (see [Release](crate::vouch#release)): on
    /// [`RequestRefusal::Released`] revoke the member.
    pub fn handle_request(
        &mut self,
        nwid: NetworkId,
        requester: &Identity,
        metadata: &Dictionary,
        packet_id: u64,
        now: i64,
        random: &mut dyn FnMut() -> u64,
    ) -> Result<RequestOutcome, ControllerError> {
        if nwid.controller() != self.identity.address() || !self.identity.has_secret() {
            return Ok(RequestOutcome::Ignore);
        }
        let who = requester.address();
        if metadata.get(vouch::RELEASE_KEY).is_some() {
            // Idempotent, so repeats within the duplicate window are answered too. A push
            // (replayed metadata) never releases.
            return if packet_id == 0 {
                Ok(RequestOutcome::Ignore)
            } else {
                self.release(nwid, requester)
            };
        }
        if packet_id != 0 {
            if let Some(t) = self.last_request.get(&(nwid, who))
                && now - t < 1000
            {
                return Ok(RequestOutcome::Ignore);
            }
            self.last_request.insert((nwid, who), now);
        }
        let Some(network) = self.store.get_network(nwid)? else {
            return Ok(RequestOutcome::Refuse(RequestRefusal::ObjectNotFound));
        };
        let (mut member, is_new) = match self.store.get_member(nwid, who)? {
            Some(m) => (m, false),
            None => (Member::new(nwid, who, now), true),
        };
        let public = requester.to_string();
        match &member.identity {
            Some(pinned) if *pinned != public => {
                return Ok(RequestOutcome::Refuse(RequestRefusal::AccessDenied));
            }
            Some(_) => {}
            None => member.identity = Some(public),
        }
        member.id = who.to_string();
        member.address = who.to_string();
        member.nwid = nwid.to_string();

        // The binding that authorized the member, when it is needed: on authorization by
        // vouch, and (looked up by `build_config`) to assign IPs.
        let mut bound = None;
        let mut vouched = false;
        if !member.authorized {
            let auto = if !network.private {
                Some(("public".to_owned(), None))
            } else if let Some(token) = metadata
                .get_str("a")
                .and_then(|a| a.strip_prefix("token:").map(str::to_owned))
                && network.auth_tokens.get(&token).is_some_and(|exp| {
                    exp.as_i64()
                        .or_else(|| exp.as_u64().map(|u| u as i64))
                        .is_some_and(|e| e == 0 || e > now)
                })
            {
                Some(("token".to_owned(), Some(token)))
            } else if packet_id != 0
                // A push replays remembered metadata: its vouch may belong to an attachment
                // that is gone, so only the member's own request is let in by a vouch.
                && let Some((v, binding)) = self.vouched(&network, nwid, who, metadata, now)?
            {
                member.name.get_or_insert_with(|| v.pod.clone());
                if let Some(b) = binding {
                    // The binding's tags from the first config on; the binding remembers
                    // the member (below) so that its changes and deletion reach it.
                    member.tags.clone_from(&b.tags);
                    bound = Some(b);
                    vouched = true;
                }
                Some(("vouch".to_owned(), Some(format!("{}/{}", v.host, v.pod))))
            } else {
                self.authorizers
                    .iter()
                    .find(|a| a.authorize(&network, &member, requester, metadata, now))
                    .map(|a| (a.credential_type().to_owned(), None))
            };
            if let Some((kind, cred)) = auto {
                member.authorized = true;
                member.last_authorized_time = now;
                member.last_authorized_credential_type = Some(kind);
                member.last_authorized_credential = cred;
            }
        }
        if !member.authorized {
            // A newcomer's record waits for an admin to authorize it, as ZeroTier's controller
            // keeps it; but not one from a push (the member is gone) nor one presenting a
            // vouch: a pod's identity lives only as long as its attachment, so nobody would
            // ever authorize that record.
            if !is_new || (packet_id != 0 && metadata.get(vouch::METADATA_KEY).is_none()) {
                self.store.put_member(&mut member)?;
            }
            return Ok(RequestOutcome::Refuse(RequestRefusal::AccessDenied));
        }
        if packet_id != 0 {
            let v = |k: &str| {
                metadata
                    .get(k)
                    .map(|_| metadata.get_u64(k, 0) as i64)
                    .unwrap_or(-1)
            };
            member.v_major = v("majv");
            member.v_minor = v("minv");
            member.v_rev = v("revv");
            member.v_proto = v("pv");
        }
        let ips_before = member.ip_assignments.clone();
        let config = self.build_config(
            &network,
            &mut member,
            &mut bound,
            is_new,
            requester,
            metadata,
            now,
            random,
        )?;
        self.store.put_member(&mut member)?;
        if let Some(b) = bound
            && (vouched || member.ip_assignments != ips_before)
        {
            self.record_in_binding(nwid, b, &member)?;
        }
        Ok(RequestOutcome::Config(Box::new(config)))
    }

    /// Deletes `requester`'s own member of `nwid` if a vouch authorized it (see the
    /// [module docs](self)).
    fn release(
        &mut self,
        nwid: NetworkId,
        requester: &Identity,
    ) -> Result<RequestOutcome, ControllerError> {
        let who = requester.address();
        let Some(member) = self.store.get_member(nwid, who)? else {
            return Ok(RequestOutcome::Refuse(RequestRefusal::ObjectNotFound));
        };
        let pinned = member.identity.as_deref() == Some(requester.to_string().as_str());
        if !pinned || member.last_authorized_credential_type.as_deref() != Some("vouch") {
            return Ok(RequestOutcome::Refuse(RequestRefusal::AccessDenied));
        }
        self.store.delete_member(nwid, who)?;
        self.last_request.remove(&(nwid, who));
        Ok(RequestOutcome::Refuse(RequestRefusal::Released))
    }

    /// The config for `member`, assigning it IPs as needed. `bound` is the binding that
    /// authorized it; when it is `None` and IPs are to be assigned, it is looked up.
    #[allow(clippy::too_many_arguments)]
    fn build_config(
        &mut self,
        network: &Network,
        member: &mut Member,
        bound: &mut Option<PodBinding>,
        is_new: bool,
        requester: &Identity,
        metadata: &Dictionary,
        now: i64,
        random: &mut dyn FnMut() -> u64,
    ) -> Result<NetworkConfig, ControllerError> {
        let nwid: NetworkId = network.id.parse().unwrap_or_default();
        let who = requester.address();
        let ctmd = network
            .extra
            .get("certificateTimeoutWindowSize")
            .map(|v| json_int(Some(v), DEFAULT_CTMD as u64) as i64)
            .unwrap_or(DEFAULT_CTMD)
            .clamp(300_000, 7_200_000);
        let trace = |t: &Option<String>| {
            t.as_deref()
                .and_then(|s| s.parse::<Address>().ok())
                .filter(|a| a.to_u64() != 0)
        };
        let (tt, tl) = match trace(&member.remote_trace_target) {
            Some(a) => (a, member.remote_trace_level),
            None => (
                trace(&network.remote_trace_target).unwrap_or_default(),
                network.remote_trace_level,
            ),
        };
        let mut cfg = NetworkConfig {
            network_id: nwid,
            timestamp: now,
            credential_time_max_delta: ctmd,
            revision: network.revision,
            issued_to: who,
            remote_trace_target: tt,
            remote_trace_level: tl.max(0) as u64,
            flags: if network.enable_broadcast {
                FLAG_ENABLE_BROADCAST
            } else {
                0
            },
            multicast_limit: network.multicast_limit.max(0) as u64,
            private: network.private,
            name: network.name.clone(),
            mtu: network.mtu.clamp(1280, 10000) as u32,
            ..NetworkConfig::default()
        };
        // Specialists: every active bridge of the network (the requester as it is now).
        let mut bridges = self.store.active_bridges(nwid)?;
        bridges.retain(|a| *a != who);
        if member.active_bridge {
            bridges.push(who);
            bridges.sort();
        }
        cfg.specialists = bridges
            .iter()
            .map(|a| SPECIALIST_ACTIVE_BRIDGE | a.to_u64())
            .collect();

        // Rules, capabilities and tags.
        if metadata.get_u64("revr", 0) == 0 {
            cfg.rules = vec![Rule::new(RuleKind::Accept)];
        } else {
            cfg.rules = rules_from_json(&Value::Array(network.rules.clone()), MAX_RULES);
            let caps: Vec<(u64, &Value)> = network
                .capabilities
                .iter()
                .filter_map(|c| c.get("id").map(|id| (json_int(Some(id), 0), c)))
                .collect();
            if is_new {
                for (id, c) in &caps {
                    if json_bool(c.get("default"), false) && !member.capabilities.contains(id) {
                        member.capabilities.push(*id);
                    }
                }
            }
            member.capabilities.sort_unstable();
            member.capabilities.dedup();
            for id in &member.capabilities {
                if let Some((_, c)) = caps.iter().find(|(cid, _)| cid == id) {
                    let rules = rules_from_json(
                        c.get("rules").unwrap_or(&Value::Null),
                        MAX_CAPABILITY_RULES,
                    );
                    let mut cap = Capability::new(nwid, now, *id as u32, rules, 1);
                    cap.add_custody(&self.identity, who)?;
                    if cfg.capabilities.len() < 128 {
                        cfg.capabilities.push(cap);
                    }
                }
            }
            for t in &network.tags {
                let id = json_int(t.get("id"), 0);
                if let Some(d) = t.get("default").filter(|d| d.is_number())
                    && !member.tags.iter().any(|(tid, _)| *tid == id)
                {
                    member.tags.push((id, json_int(Some(d), 0)));
                }
            }
            let mut tags: Vec<(u64, u64)> = member.tags.clone();
            tags.sort_unstable();
            tags.dedup_by_key(|t| t.0);
            for (id, value) in tags.into_iter().take(128) {
                let mut tag = Tag::new(nwid, now, who, id as u32, value as u32);
                tag.sign(&self.identity)?;
                cfg.tags.push(tag);
            }
        }

        // Routes.
        for r in network.routes.iter().take(128) {
            let Some((target, bits)) = parse_cidr(&r.target) else {
                continue;
            };
            let via = r
                .via
                .as_deref()
                .and_then(|v| v.parse::<IpAddr>().ok())
                .filter(|v| v.is_ipv4() == target.is_ipv4())
                .map(|v| InetAddress::new(v, 0));
            cfg.routes.push(Route {
                target: InetAddress::new(target, bits),
                via,
                flags: 0,
                metric: 0,
            });
        }

        // Static IPs (§14.4).
        if !member.no_auto_assign_ips {
            if network.v6_assign_mode.rfc4193 {
                cfg.static_ips
                    .push(InetAddress::new(IpAddr::V6(rfc4193(nwid, who)), 88));
                cfg.flags |= FLAG_NDP_EMULATION;
            }
            if network.v6_assign_mode.sixplane {
                cfg.static_ips
                    .push(InetAddress::new(IpAddr::V6(sixplane(nwid, who)), 40));
                cfg.flags |= FLAG_NDP_EMULATION;
            }
        }
        let (mut have4, mut have6) = (false, false);
        for ip in &member.ip_assignments {
            let Ok(ip) = ip.parse::<IpAddr>() else {
                continue;
            };
            let best = cfg
                .routes
                .iter()
                .filter(|r| in_prefix(ip, r.target.ip, r.target.port))
                .map(|r| r.target.port)
                .max();
            if let Some(bits) = best
                && cfg.static_ips.len() < 32
            {
                cfg.static_ips.push(InetAddress::new(ip, bits));
                if ip.is_ipv4() {
                    have4 = true;
                } else {
                    have6 = true;
                }
            }
        }
        let want6 = network.v6_assign_mode.zt && !have6;
        let want4 = network.v4_assign_mode.zt && !have4;
        if !member.no_auto_assign_ips && (want4 || want6) {
            if bound.is_none() {
                *bound = self.binding_of(network, nwid, member)?;
            }
            let store = &self.store;
            // First the IPs the member's binding reserves (in a pool, not another member's).
            let (mut got4, mut got6) = (false, false);
            for ip in bound.iter().flat_map(binding_ips) {
                let want = if ip.is_ipv4() { want4 } else { want6 };
                if !want
                    || !pools::<IpAddr>(network).any(|(s, e)| s <= ip && ip <= e)
                    || member_ips(member).any(|x| x == ip)
                    || store.ip_assigned(nwid, ip, who)?
                {
                    continue;
                }
                if let Some(bits) = route_bits(&cfg, ip) {
                    member.ip_assignments.push(ip.to_string());
                    cfg.static_ips.push(InetAddress::new(ip, bits));
                    if ip.is_ipv4() {
                        got4 = true;
                    } else {
                        got6 = true;
                    }
                }
            }
            // Taken by another member or reserved by another binding: two index lookups
            // per candidate.
            let own = bound.as_ref().map(|b| b.uid.as_str());
            let taken = |ip: IpAddr| {
                Ok(store.ip_assigned(nwid, ip, who)? || store.ip_reserved(nwid, ip, own)?)
            };
            if want6
                && !got6
                && let Some((ip, bits)) = pick_v6(network, &cfg, who, &taken, member, random)?
            {
                member.ip_assignments.push(ip.to_string());
                cfg.static_ips.push(InetAddress::new(IpAddr::V6(ip), bits));
            }
            if want4
                && !got4
                && let Some((ip, bits)) = pick_v4(network, &cfg, who, &taken, member)?
            {
                member.ip_assignments.push(ip.to_string());
                cfg.static_ips.push(InetAddress::new(IpAddr::V4(ip), bits));
            }
        }
        cfg.static_ips.truncate(32);
        if !cfg.static_ips.is_empty() {
            let mut coo = CertificateOfOwnership::new(nwid, now, who, 1);
            for ip in &cfg.static_ips {
                coo.add_ip(ip.ip);
            }
            coo.sign(&self.identity)?;
            cfg.certificates_of_ownership.push(coo);
        }

        // DNS.
        if let Some(obj) = network.dns.as_object() {
            cfg.dns = Dns {
                domain: obj
                    .get("domain")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                servers: obj
                    .get("servers")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str()?.parse().ok())
                            .take(4)
                            .collect()
                    })
                    .unwrap_or_default(),
            };
        }

        let mut com = CertificateOfMembership::new(
            now as u64,
            ctmd as u64,
            nwid,
            who,
            requester.public_key(),
        );
        com.sign(&self.identity)?;
        cfg.com = Some(com);
        Ok(cfg)
    }

    /// A signed revocation of `member`'s COM, to send when it is de-authorized (§14.7).
    pub fn revoke(
        &self,
        nwid: NetworkId,
        member: Address,
        revocation_id: u32,
        now: i64,
    ) -> Result<Revocation, SignError> {
        let mut r = Revocation::new(
            revocation_id,
            nwid,
            0,
            now,
            Revocation::FAST_PROPAGATE,
            member,
            CredentialType::Com,
        );
        r.sign(&self.identity)?;
        Ok(r)
    }
}

/// Whether a member other than the requester holds an address (or a binding other than
/// the requester's reserves it).
type Taken<'a> = dyn Fn(IpAddr) -> Result<bool, StoreError> + 'a;

/// The pools of `network` whose ends both parse as `T`, as `(start, end)`.
fn pools<T: std::str::FromStr>(network: &Network) -> impl Iterator<Item = (T, T)> + '_ {
    network
        .ip_assignment_pools
        .iter()
        .filter_map(|p| Some((p.ip_range_start.parse().ok()?, p.ip_range_end.parse().ok()?)))
}

/// The prefix length of the route a pool IP `ip` gets in `cfg`: for IPv6 the last
/// route without a gateway that holds it, for IPv4 the first route of the same network;
/// `None` when that route is missing or has length 0.
fn route_bits(cfg: &NetworkConfig, ip: IpAddr) -> Option<u16> {
    let route = if ip.is_ipv4() {
        cfg.routes.iter().find(|r| {
            r.target.ip.is_ipv4()
                && network_of(ip, r.target.port) == network_of(r.target.ip, r.target.port)
        })
    } else {
        cfg.routes
            .iter()
            .rfind(|r| r.via.is_none() && in_prefix(ip, r.target.ip, r.target.port))
    };
    route.map(|r| r.target.port).filter(|&bits| bits > 0)
}

fn pick_v6(
    network: &Network,
    cfg: &NetworkConfig,
    who: Address,
    taken: &Taken<'_>,
    member: &Member,
    random: &mut dyn FnMut() -> u64,
) -> Result<Option<(Ipv6Addr, u16)>, StoreError> {
    let mine: Vec<IpAddr> = member_ips(member).collect();
    for (s, e) in pools::<Ipv6Addr>(network) {
        let (s, e) = (u128::from(s), u128::from(e));
        let (shi, slo, ehi, elo) = ((s >> 64) as u64, s as u64, (e >> 64) as u64, e as u64);
        for trial in 0..1000 {
            let (hi, lo) = if trial == 0 && elo > slo && elo - slo >= 0xff_ffff_ffff {
                (shi, slo.wrapping_add(who.to_u64()))
            } else {
                let (rh, rl) = (random(), random());
                (
                    if ehi > shi {
                        shi.wrapping_add(rh % (ehi - shi))
                    } else {
                        shi
                    },
                    if elo > slo {
                        slo.wrapping_add(rl % (elo - slo))
                    } else {
                        slo
                    },
                )
            };
            let v6 = Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo));
            let ip = IpAddr::V6(v6);
            if let Some(bits) = route_bits(cfg, ip)
                && !mine.contains(&ip)
                && !taken(ip)?
            {
                return Ok(Some((v6, bits)));
            }
        }
    }
    Ok(None)
}

fn pick_v4(
    network: &Network,
    cfg: &NetworkConfig,
    who: Address,
    taken: &Taken<'_>,
    member: &Member,
) -> Result<Option<(Ipv4Addr, u16)>, StoreError> {
    let mine: Vec<IpAddr> = member_ips(member).collect();
    for (s, e) in pools::<Ipv4Addr>(network) {
        let (s, e) = (u32::from(s), u32::from(e));
        if s == 0 || s > e {
            continue;
        }
        let len = e - s;
        let mut counter = (who.to_u64() & 0xffff_ffff) as u32;
        let trials = 1000u64.min(u64::from(len) + 1);
        for _ in 0..trials {
            let cand = if len == 0 {
                s
            } else {
                s.wrapping_add(counter % len)
            };
            counter = counter.wrapping_add(1);
            if cand & 0xff == 0xff {
                continue;
            }
            let ip = IpAddr::V4(Ipv4Addr::from(cand));
            if let Some(bits) = route_bits(cfg, ip)
                && !mine.contains(&ip)
                && !taken(ip)?
            {
                return Ok(Some((Ipv4Addr::from(cand), bits)));
            }
        }
    }
    Ok(None)
}

/// The VL1 payloads delivering `cfg`: with `request_packet_id` each signed chunk is an
/// OK(in-re NETWORK_CONFIG_REQUEST) payload, without it a NETWORK_CONFIG push. Returns
/// `(verb, payload)` pairs to hand to `flatwire_vl1::Node::send`. `update_id` must be
/// random and non-zero.
pub fn config_payloads(
    signer: &Identity,
    cfg: &NetworkConfig,
    request_packet_id: Option<u64>,
    update_id: u64,
) -> Result<Vec<(flatwire_vl1::Verb, Vec<u8>)>, SignError> {
    let dict = cfg.encode();
    let chunks = crate::netconf::ConfigChunk::split(cfg.network_id, &dict, update_id, signer)?;
    Ok(chunks
        .into_iter()
        .map(|c| match request_packet_id {
            Some(id) => {
                let mut p = Vec::new();
                crate::verbs::in_re(flatwire_vl1::Verb::NETWORK_CONFIG_REQUEST.0, id, &mut p);
                p.extend_from_slice(&c.encode());
                (flatwire_vl1::Verb::OK, p)
            }
            None => (flatwire_vl1::Verb::NETWORK_CONFIG, c.encode()),
        })
        .collect())
}

/// The ERROR payload refusing the config request `packet_id` for `nwid`.
pub fn refusal_payload(packet_id: u64, refusal: RequestRefusal, nwid: NetworkId) -> Vec<u8> {
    let mut p = Vec::new();
    crate::verbs::in_re(
        flatwire_vl1::Verb::NETWORK_CONFIG_REQUEST.0,
        packet_id,
        &mut p,
    );
    crate::verbs::Vl2Error {
        code: refusal.error_code(),
        nwid,
        extra: &[],
    }
    .encode(&mut p);
    p
}
