//! Per-network indexes over the stored members, so that a config request does not read
//! every member: the active bridges (specialists of every config) and the assigned IPs
//! (checked for each candidate address of a pool assignment). A store keeps one up to
//! date on every member write and delete and rebuilds it when it opens.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use flatwire_vl1::Address;

use super::Member;
use crate::NetworkId;

/// Active bridges and assigned IPs of the members of each network.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemberIndex {
    networks: HashMap<NetworkId, NetworkIndex>,
}

#[derive(Clone, Debug, Default)]
struct NetworkIndex {
    bridges: BTreeSet<Address>,
    /// `(ip, member)` for every parseable entry of a member's `ipAssignments`.
    ips: BTreeSet<(IpAddr, Address)>,
}

impl NetworkIndex {
    fn is_empty(&self) -> bool {
        self.bridges.is_empty() && self.ips.is_empty()
    }
}

/// The IPs of `m` the controller counts as assigned (unparseable entries are skipped,
/// as the request path skips them).
pub(crate) fn member_ips(m: &Member) -> impl Iterator<Item = IpAddr> + '_ {
    m.ip_assignments.iter().filter_map(|s| s.parse().ok())
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

    /// Forgets every member of `nwid`.
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
}
