//! The member counts of a Network's status (`members`, `authorizedMembers`; `kubectl get
//! networks` shows `members`).
//!
//! [`member_counts`] is the pure core. The pod binding pass ([`super::pod`]), which already
//! knows the pod bindings and host members the controller holds, calls it for every Network
//! at the end of a pass and server-side applies the two fields with their own field manager
//! [`COUNTS_FIELD_MANAGER`] only when they changed: the Network reconciler applies the rest
//! of the status with [`super::FIELD_MANAGER`], and as neither manager's apply lists the
//! other's fields, neither removes or takes over what the other wrote.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde_json::json;

use super::member::{AUTHORIZED, READY};
use crate::crd::{Network, NetworkMember};

/// The field manager of the member counts in a Network's status.
pub const COUNTS_FIELD_MANAGER: &str = "flatwire-operator-members";

/// A Network's member counts as its status shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberCounts {
    /// `status.members`.
    pub members: u32,
    /// `status.authorizedMembers`.
    pub authorized: u32,
}

impl MemberCounts {
    /// The counts `net`'s status shows now (`None` when it shows none).
    pub fn shown(net: &Network) -> Option<Self> {
        let s = net.status.as_ref()?;
        Some(Self {
            members: s.members?,
            authorized: s.authorized_members?,
        })
    }
}

/// Whether condition `type_` of `m`'s status is `True`.
fn is_true(m: &NetworkMember, type_: &str) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    })
}

/// The counts of Network `network`: `pods` pod bindings and `hosts` host members the
/// controller holds for it (all authorized: a bound pod's member is admitted on its node's
/// vouch, a node's host member is authorized by the operator), plus the NetworkMembers
/// among `members` that name `network` and that the controller serves (`Ready=True`), of
/// which those with `Authorized=True` are authorized.
pub fn member_counts<'a>(
    network: &str,
    pods: usize,
    hosts: usize,
    members: impl IntoIterator<Item = &'a NetworkMember>,
) -> MemberCounts {
    let own = u32::try_from(pods.saturating_add(hosts)).unwrap_or(u32::MAX);
    let mut counts = MemberCounts {
        members: own,
        authorized: own,
    };
    for m in members
        .into_iter()
        .filter(|m| m.spec.network == network && is_true(m, READY))
    {
        counts.members = counts.members.saturating_add(1);
        if is_true(m, AUTHORIZED) {
            counts.authorized = counts.authorized.saturating_add(1);
        }
    }
    counts
}

/// Server-side applies `counts` to the status of Network `name` with
/// [`COUNTS_FIELD_MANAGER`].
pub async fn apply(client: &Client, name: &str, counts: MemberCounts) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": Network::api_version(&()),
        "kind": Network::kind(&()),
        "status": {"members": counts.members, "authorizedMembers": counts.authorized},
    });
    let pp = PatchParams::apply(COUNTS_FIELD_MANAGER).force();
    Api::<Network>::all(client.clone())
        .patch_status(name, &pp, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn member(network: &str, ready: &str, authorized: Option<&str>) -> NetworkMember {
        let cond = |t: &str, s: &str| {
            json!({"type": t, "status": s, "reason": "R", "message": "",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"})
        };
        let mut conds = vec![cond(READY, ready)];
        conds.extend(authorized.map(|a| cond(AUTHORIZED, a)));
        let v: Value = json!({
            "apiVersion": "flatwire.io/v1alpha1", "kind": "NetworkMember",
            "metadata": {"name": "m"},
            "spec": {"network": network, "address": "0123456789", "authorized": true},
            "status": {"conditions": conds},
        });
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_hosts_and_served_network_members_count() {
        let ms = [
            member("lab", "True", Some("True")),
            member("lab", "True", Some("False")),
            // Not served (e.g. an unknown tag): not in the controller, not counted.
            member("lab", "False", None),
            member("other", "True", Some("True")),
        ];
        assert_eq!(
            member_counts("lab", 3, 2, &ms),
            MemberCounts {
                members: 7,
                authorized: 6
            }
        );
        assert_eq!(
            member_counts("other", 0, 0, &ms),
            MemberCounts {
                members: 1,
                authorized: 1
            }
        );
        assert_eq!(member_counts("none", 0, 0, &ms), MemberCounts::default());
        let mut n = Network::new("lab", serde_json::from_value(json!({})).unwrap());
        assert_eq!(MemberCounts::shown(&n), None);
        n.status = Some(crate::crd::NetworkStatus {
            members: Some(7),
            authorized_members: Some(6),
            ..Default::default()
        });
        assert_eq!(
            MemberCounts::shown(&n),
            Some(member_counts("lab", 3, 2, &ms))
        );
    }
}
