//! Per-network indexes over the stored members and pod bindings, so that a config request
//! does not read every member or binding: the active bridges (specialists of every config),
//! the assigned IPs and the IPs pod bindings reserve (both checked for each candidate
//! address of a pool assignment). A store keeps one up to date on every member and binding
//! write and delete and rebuilds it when it opens.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use flatwire_vl1::Address;

use super::{Member, PodBinding};
use crate::NetworkId;

/// Active bridges and assigned IPs of the members of each network, and the IPs its pod
/// bindings reserve.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemberIndex {
    networks: HashMap<NetworkId, NetworkIndex>,
}

#[derive(Clone, Debug, Default)]
struct NetworkIndex {
    bridges: BTreeSet<Address>,
    /// `(ip, member)` for every parseable entry of a member's `ipAssignments`.
    ips: BTreeSet<(IpAddr, Address)>,
    /// `(ip, uid)` for every parseable entry of a pod binding's `ipAssignments`.
    reserved: BTreeSet<(IpAddr, String)>,
}

impl NetworkIndex {
    fn is_empty(&self) -> bool {
        self.bridges.is_empty() && self.ips.is_empty() && self.reserved.is_empty()
    }
}

/// The IPs of `m` the controller counts as assigned (unparseable entries are skipped,
/// as the request path skips them).
pub(crate) fn member_ips(m: &Member) -> impl Iterator<Item = IpAddr> + '_ {
    m.ip_assignments.iter().filter_map(|s| s.parse().ok())
}

/// The IPs pod binding `b` reserves (unparseable entries are skipped).
pub(crate) fn binding_ips(b: &PodBinding) -> impl Iterator<Item = IpAddr> + '_ {
    b.ip_assignments.iter().filter_map(|s| s.parse().ok())
}

impl MemberIndex {
    /// Records that member `a` of `nwid` changed from `old` to `new` (`None`: absent).
    pub(crate) fn update(
        &mut self,
        nwid: NetworkId,
        a: Address,
        old: Option<&Member>,
        new: Option<&Member>,
    ) {
        let net = self.networks.entry(nwid).or_default();
        if let Some(o) = old {
            net.bridges.remove(&a);
            for ip in member_ips(o) {
                net.ips.remove(&(ip, a));
            }
        }
        if let Some(n) = new {
            if n.active_bridge {
                net.bridges.insert(a);
            }
            for ip in member_ips(n) {
                net.ips.insert((ip, a));
            }
        }
        if net.is_empty() {
            self.networks.remove(&nwid);
        }
    }

    /// Records that the binding of pod `uid` on `nwid` changed from `old` to `new`
    /// (`None`: absent).
    pub(crate) fn update_pod(
        &mut self,
        nwid: NetworkId,
        uid: &str,
        old: Option<&PodBinding>,
        new: Option<&PodBinding>,
    ) {
        let net = self.networks.entry(nwid).or_default();
        for ip in old.into_iter().flat_map(binding_ips) {
            net.reserved.remove(&(ip, uid.to_owned()));
        }
        for ip in new.into_iter().flat_map(binding_ips) {
            net.reserved.insert((ip, uid.to_owned()));
        }
        if net.is_empty() {
            self.networks.remove(&nwid);
        }
    }

    /// Forgets every member and binding of `nwid`.
    pub(crate) fn remove_network(&mut self, nwid: NetworkId) {
        self.networks.remove(&nwid);
    }

    /// The active bridges of `nwid`, sorted.
    pub(crate) fn active_bridges(&self, nwid: NetworkId) -> Vec<Address> {
        self.networks
            .get(&nwid)
            .map(|n| n.bridges.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether a member of `nwid` other than `except` has `ip` assigned.
    pub(crate) fn ip_assigned(&self, nwid: NetworkId, ip: IpAddr, except: Address) -> bool {
        self.networks.get(&nwid).is_some_and(|n| {
            n.ips
                .range((ip, Address::default())..)
                .take_while(|(i, _)| *i == ip)
                .any(|(_, a)| *a != except)
        })
    }

    /// Whether a pod binding of `nwid` other than that of pod `except` reserves `ip`.
    pub(crate) fn ip_reserved(&self, nwid: NetworkId, ip: IpAddr, except: Option<&str>) -> bool {
        self.networks.get(&nwid).is_some_and(|n| {
            n.reserved
                .range((ip, String::new())..)
                .take_while(|(i, _)| *i == ip)
                .any(|(_, uid)| Some(uid.as_str()) != except)
        })
    }
}
