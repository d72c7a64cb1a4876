//! Pod bindings (a flatwire extension, see the [module docs](super#pod-bindings)): the
//! object, its API writes, and what they do to the members a binding authorized.

use std::collections::BTreeSet;
use std::net::IpAddr;

use flatwire_vl1::Address;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::api::{ApiError, check_id, field, merge, parse_body, too_many};
use super::index::member_ips;
use super::{Controller, ControllerStore, MAX_NETWORK_ITEMS, Member, Network, StoreError};
use crate::NetworkId;

/// Longest pod uid (Kubernetes uids are 36-byte UUIDs).
const MAX_UID: usize = 128;
/// Longest namespace or pod name (a DNS subdomain).
const MAX_NAME: usize = 253;
/// Most entries in a pod binding's `ipAssignments`.
pub const MAX_POD_IPS: usize = 16;

/// Whether `uid` can key a binding: 1 to 128 of `[A-Za-z0-9._-]`, not starting with `.`
/// (so it is a safe file name).
pub fn valid_pod_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID
        && !uid.starts_with('.')
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where the API server places a pod, and the tags its member gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodBinding {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's uid (the key).
    pub uid: String,
    /// The 10-hex address of the host identity of the node running the pod.
    pub host: String,
    /// Tags the pod's member gets, as `[id, value]` pairs.
    #[serde(default)]
    pub tags: Vec<(u64, u64)>,
    /// Members this binding authorized (10-hex addresses; written by the controller, a
    /// POST cannot set them).
    #[serde(default)]
    pub members: Vec<String>,
    /// The IPs of the members this binding authorized, sorted (IPv4 first) and without
    /// duplicates, at most [`MAX_POD_IPS`]; written by the controller whenever it assigns
    /// or changes them. A POST creating the binding may set them as a reservation (e.g.
    /// restored after the controller lost its store): no other member is assigned them,
    /// and the first member the binding authorizes gets those that lie in a pool.
    #[serde(default)]
    pub ip_assignments: Vec<String>,
}

impl PodBinding {
    /// The pod string a node vouches with: `namespace/name/uid`.
    pub fn pod_id(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.name, self.uid)
    }

    /// The `lastAuthorizedCredential` of a member this binding's vouch authorized.
    fn credential(&self) -> String {
        format!("{}/{}", self.host, self.pod_id())
    }

    /// Whether `m` was authorized by a vouch of this binding's host for this pod.
    pub(super) fn authorized(&self, m: &Member) -> bool {
        m.authorized
            && m.last_authorized_credential_type.as_deref() == Some("vouch")
            && m.last_authorized_credential.as_deref() == Some(self.credential().as_str())
    }
}

/// `ips` in the form a binding stores them: canonical text, sorted (IPv4 first), without
/// duplicates, at most [`MAX_POD_IPS`].
fn binding_ip_list(ips: impl IntoIterator<Item = IpAddr>) -> Vec<String> {
    let set: BTreeSet<IpAddr> = ips.into_iter().collect();
    set.iter()
        .take(MAX_POD_IPS)
        .map(ToString::to_string)
        .collect()
}

/// The `ipAssignments` of a binding POST body, checked and normalised.
fn posted_ips(v: Value) -> Result<Vec<String>, ApiError> {
    let given: Vec<String> = serde_json::from_value(v)
        .map_err(|e| field("ipAssignments", format!("not a list of strings: {e}")))?;
    too_many("ipAssignments", given.len(), MAX_POD_IPS)?;
    let ips = given
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| field("ipAssignments", format!("{s:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(binding_ip_list(ips))
}

/// The uid of a vouch's pod string `namespace/name/uid`, if it has that form.
pub(super) fn pod_uid(pod: &str) -> Option<&str> {
    let mut it = pod.split('/');
    let (Some(ns), Some(name), Some(uid), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    (!ns.is_empty() && !name.is_empty() && valid_pod_uid(uid)).then_some(uid)
}

/// What [`Controller::api_pod_post`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PodWrite {
    /// The stored binding.
    pub binding: PodBinding,
    /// Members the binding authorized whose tags changed (push them a fresh config).
    pub retagged: Vec<Address>,
    /// Members removed because the binding moved to another host (revoke the authorized
    /// ones).
    pub removed: Vec<Member>,
}

/// What [`Controller::api_pod_delete`] removed.
#[derive(Clone, Debug, PartialEq)]
pub struct PodDeleted {
    /// The deleted binding.
    pub binding: PodBinding,
    /// The members it had authorized, as they were before deletion (revoke them).
    pub removed: Vec<Member>,
}

fn check_binding(b: &PodBinding) -> Result<(), ApiError> {
    for (name, v) in [("namespace", &b.namespace), ("name", &b.name)] {
        if v.is_empty() || v.len() > MAX_NAME || v.contains('/') {
            return Err(field(
                name,
                format!("must be 1 to {MAX_NAME} bytes without '/'"),
            ));
        }
    }
    if b.host.parse::<Address>().is_err() {
        return Err(field(
            "host",
            format!("{:?} is not a 10-hex address", b.host),
        ));
    }
    too_many("tags", b.tags.len(), MAX_NETWORK_ITEMS)?;
    if b.tags
        .iter()
        .any(|&(id, v)| id > u64::from(u32::MAX) || v > u64::from(u32::MAX))
    {
        return Err(field("tags", "ids and values must fit in 32 bits"));
    }
    Ok(())
}

impl<S: ControllerStore> Controller<S> {
    /// The binding through whose vouch `m` was authorized (only on a `vouchRequiresPod`
    /// network, where bindings count).
    pub(super) fn binding_of(
        &self,
        network: &Network,
        nwid: NetworkId,
        m: &Member,
    ) -> Result<Option<PodBinding>, StoreError> {
        if !network.vouch_requires_pod
            || m.last_authorized_credential_type.as_deref() != Some("vouch")
        {
            return Ok(None);
        }
        let Some(uid) = m
            .last_authorized_credential
            .as_deref()
            .and_then(|c| c.split_once('/'))
            .and_then(|(_, pod)| pod_uid(pod))
        else {
            return Ok(None);
        };
        Ok(self.store().get_pod(nwid, uid)?.filter(|b| b.authorized(m)))
    }

    /// Records `member`, authorized through `b`, in `b`'s `members`, sets `b`'s
    /// `ipAssignments` to the IPs of the members it authorized (`member` as given, the
    /// others as stored) and stores `b` if that changed it (call when such a member is
    /// authorized or its IPs change).
    pub(super) fn record_in_binding(
        &mut self,
        nwid: NetworkId,
        mut b: PodBinding,
        member: &Member,
    ) -> Result<(), StoreError> {
        if !b.members.contains(&member.id) {
            b.members.push(member.id.clone());
        }
        let mut ips: Vec<IpAddr> = member_ips(member).collect();
        for a in b.members.iter().filter(|s| **s != member.id) {
            if let Ok(a) = a.parse::<Address>()
                && let Some(m) = self.store().get_member(nwid, a)?
                && b.authorized(&m)
            {
                ips.extend(member_ips(&m));
            }
        }
        b.ip_assignments = binding_ip_list(ips);
        self.store_mut().put_pod(nwid, &b)?;
        Ok(())
    }

    /// Removes the members `binding` authorized (call when the binding goes or moves).
    fn remove_bound_members(
        &mut self,
        nwid: NetworkId,
        binding: &PodBinding,
    ) -> Result<Vec<Member>, StoreError> {
        let mut removed = Vec::new();
        for a in binding
            .members
            .iter()
            .filter_map(|a| a.parse::<Address>().ok())
        {
            if let Some(m) = self.store().get_member(nwid, a)?
                && binding.authorized(&m)
            {
                self.store_mut().delete_member(nwid, a)?;
                removed.push(m);
            }
        }
        Ok(removed)
    }

    /// Applies a pod binding POST body for pod `uid` of `nwid` (call for every API write of
    /// a binding; creates it if it is new). Fields: `namespace`, `name`, `host` (10 hex),
    /// `tags` (`[[id, value], ...]`), `uid` (must match); `members` is ignored.
    /// `ipAssignments` (at most [`MAX_POD_IPS`] IP addresses) reserves IPs for a new
    /// binding; for an existing one it may only repeat the stored value
    /// ([`ApiError::PodIpsSetByController`] otherwise). Members the binding authorized get
    /// its tags; if `host` changed they are removed (a pod never moves, so a new host means
    /// a new pod under a reused uid) and the binding keeps its `ipAssignments` for the next.
    pub fn api_pod_post(
        &mut self,
        nwid: NetworkId,
        uid: &str,
        body: &[u8],
    ) -> Result<PodWrite, ApiError> {
        let mut body = parse_body(body)?;
        if !valid_pod_uid(uid) {
            return Err(field("uid", format!("{uid:?} is not a pod uid")));
        }
        check_id(&body, "uid", uid.to_owned())?;
        let posted_ips = body.remove("ipAssignments").map(posted_ips).transpose()?;
        if self.store().get_network(nwid)?.is_none() {
            return Err(ApiError::NoSuchNetwork(nwid));
        }
        body.remove("members");
        let current = self.store().get_pod(nwid, uid)?;
        let base = current.clone().unwrap_or_else(|| PodBinding {
            uid: uid.to_owned(),
            ..PodBinding::default()
        });
        let mut b: PodBinding = merge(&base, &body)?;
        check_binding(&b)?;
        match (&current, posted_ips) {
            (Some(c), Some(ips)) if ips != c.ip_assignments => {
                return Err(ApiError::PodIpsSetByController(uid.to_owned()));
            }
            (None, Some(ips)) => b.ip_assignments = ips,
            _ => {}
        }
        if let Ok(h) = b.host.parse::<Address>() {
            b.host = h.to_string();
        }
        b.tags.sort_unstable();
        b.tags.dedup_by_key(|t| t.0);
        let mut removed = Vec::new();
        let mut retagged = Vec::new();
        if let Some(old) = current.as_ref().filter(|o| o.host != b.host) {
            removed = self.remove_bound_members(nwid, old)?;
            b.members.clear();
        } else {
            let mut kept = Vec::new();
            for s in std::mem::take(&mut b.members) {
                let Ok(a) = s.parse::<Address>() else {
                    continue;
                };
                let Some(mut m) = self.store().get_member(nwid, a)? else {
                    continue;
                };
                if b.authorized(&m) && m.tags != b.tags {
                    m.tags.clone_from(&b.tags);
                    self.store_mut().put_member(&mut m)?;
                    retagged.push(a);
                }
                kept.push(s);
            }
            b.members = kept;
        }
        self.store_mut().put_pod(nwid, &b)?;
        Ok(PodWrite {
            binding: b,
            retagged,
            removed,
        })
    }

    /// Deletes the binding of pod `uid` of `nwid` and every member it authorized (so their
    /// IPs return to the pool); `None` if there was none. The caller revokes the removed
    /// members' certificates.
    pub fn api_pod_delete(
        &mut self,
        nwid: NetworkId,
        uid: &str,
    ) -> Result<Option<PodDeleted>, ApiError> {
        if !valid_pod_uid(uid) {
            return Ok(None);
        }
        let Some(binding) = self.store().get_pod(nwid, uid)? else {
            return Ok(None);
        };
        let removed = self.remove_bound_members(nwid, &binding)?;
        self.store_mut().delete_pod(nwid, uid)?;
        Ok(Some(PodDeleted { binding, removed }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_and_pod_strings() {
        assert!(valid_pod_uid("0b7c0f1e-1111-2222-3333-444455556666"));
        for bad in ["", ".x", "a/b", "..", "a b", &"a".repeat(129)] {
            assert!(!valid_pod_uid(bad), "{bad:?}");
        }
        assert_eq!(pod_uid("default/web/u-1"), Some("u-1"));
        for bad in ["default/web", "default/web/", "/web/u", "a/b/c/d", "c0ffee"] {
            assert_eq!(pod_uid(bad), None, "{bad:?}");
        }
    }
}
