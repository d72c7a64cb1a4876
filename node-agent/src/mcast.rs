//! The multicast groups a TAP's kernel interface joined (`ip maddr`, a socket joining
//! 239.1.2.3, IPv6 neighbour discovery), so its member subscribes to them on the network.
//!
//! Read, as ZeroTier One does on Linux, from `/proc/net/dev_mcast`: the link-layer multicast
//! addresses of every interface of a network namespace (IPv4 groups appear as `01:00:5e:..`,
//! IPv6 ones as `33:33:..`), one small file for both families. `/proc/net` shows the namespace
//! of the task that opened it and a file once opened keeps reading that namespace, so a pod's
//! file is opened once, on a thread inside the pod's namespace ([`crate::tap::in_netns`]), and
//! then re-read from the data-plane thread (a seek and a read): about once a second, and at
//! once when the interface sends a membership report (IGMP, MLD), as the kernel does when it
//! joins or leaves a group, so that a subscription follows a join within milliseconds.

use std::fs::File;
use std::io::{self, Read, Seek};

use flatwire_vl2::{Mac, MulticastGroup};

/// How often the memberships are read (ms).
pub(crate) const POLL_INTERVAL: u64 = 1000;

/// The file to open, relative to the calling thread's network namespace.
const DEV_MCAST: &str = "/proc/thread-self/net/dev_mcast";

/// The multicast memberships of one interface, by name, in the namespace [`Memberships::open`]
/// ran in.
#[derive(Debug)]
pub struct Memberships {
    file: File,
    ifname: String,
    text: String,
}

impl Memberships {
    /// Opens the memberships list of the calling thread's namespace for interface `ifname`.
    pub fn open(ifname: &str) -> io::Result<Self> {
        Ok(Self {
            file: File::open(DEV_MCAST)?,
            ifname: ifname.to_string(),
            text: String::new(),
        })
    }

    /// Reads the interface's groups now into `out` (cleared first; sorted, no duplicates).
    pub(crate) fn read(&mut self, out: &mut Vec<MulticastGroup>) -> io::Result<()> {
        self.text.clear();
        self.file.rewind()?;
        self.file.read_to_string(&mut self.text)?;
        out.clear();
        out.extend(groups_of(&self.text, &self.ifname));
        out.sort_unstable_by_key(|g| g.to_bytes());
        out.dedup();
        Ok(())
    }
}

/// The groups of `ifname` in `dev_mcast` text (`index name users global-users hex-address`
/// per line).
fn groups_of<'a>(text: &'a str, ifname: &'a str) -> impl Iterator<Item = MulticastGroup> + 'a {
    text.lines().filter_map(move |l| {
        let mut f = l.split_whitespace();
        let (_, name, _, _, hex) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        if name != ifname || hex.len() != 12 {
            return None;
        }
        let v = u64::from_str_radix(hex, 16).ok()?;
        let b = v.to_be_bytes();
        Some(MulticastGroup::for_mac(Mac([
            b[2], b[3], b[4], b[5], b[6], b[7],
        ])))
    })
}

/// Whether an Ethernet frame from a TAP is a multicast membership report or leave: IPv4 with
/// protocol IGMP, or IPv6 to the MLDv2 reports address (`ff02::16`) or with a hop-by-hop
/// header (which MLDv1 messages carry).
pub(crate) fn is_membership_report(frame: &[u8]) -> bool {
    const MLD2_REPORTS: [u8; 6] = [0x33, 0x33, 0, 0, 0, 0x16];
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(14 + 9) == Some(&2),
        Some([0x86, 0xdd]) => frame[..6] == MLD2_REPORTS || frame.get(14 + 6) == Some(&0),
        _ => false,
    }
}

/// What to subscribe to and unsubscribe from to go from `old` to `new` (both sorted as
/// [`Memberships::read`] leaves them).
pub(crate) fn difference<'a>(
    old: &'a [MulticastGroup],
    new: &'a [MulticastGroup],
) -> (
    impl Iterator<Item = MulticastGroup> + 'a,
    impl Iterator<Item = MulticastGroup> + 'a,
) {
    (
        new.iter().filter(|g| !old.contains(g)).copied(),
        old.iter().filter(|g| !new.contains(g)).copied(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
1    lo              1     0     333300000001
4    fw1c000001      1     0     333300000001
4    fw1c000001      1     0     01005e000001
4    fw1c000001      2     0     01005e4d0001
4    fw1c000001      1     0     3333ff4d0005
5    fw1c0000011     1     0     01005e010203
";

    fn mac(s: &str) -> MulticastGroup {
        MulticastGroup::for_mac(s.parse().unwrap())
    }

    #[test]
    fn groups_are_read_for_one_interface() {
        let g: Vec<MulticastGroup> = groups_of(TEXT, "fw1c000001").collect();
        assert_eq!(
            g,
            [
                mac("33:33:00:00:00:01"),
                mac("01:00:5e:00:00:01"),
                mac("01:00:5e:4d:00:01"),
                mac("33:33:ff:4d:00:05"),
            ]
        );
        assert_eq!(groups_of(TEXT, "eth0").count(), 0);
        assert_eq!(groups_of("garbage\n4 x 1 0 zz\n", "x").count(), 0);
    }

    #[test]
    fn the_difference_says_what_to_join_and_leave() {
        let old = [mac("01:00:5e:00:00:01"), mac("01:00:5e:4d:00:01")];
        let new = [mac("01:00:5e:00:00:01"), mac("01:00:5e:4d:00:02")];
        let (join, leave) = difference(&old, &new);
        assert_eq!(join.collect::<Vec<_>>(), [mac("01:00:5e:4d:00:02")]);
        assert_eq!(leave.collect::<Vec<_>>(), [mac("01:00:5e:4d:00:01")]);
    }

    #[test]
    fn membership_reports_are_recognized() {
        let mut igmp = vec![0u8; 14 + 20 + 8];
        igmp[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 0x16]);
        igmp[12..14].copy_from_slice(&[0x08, 0x00]);
        igmp[14 + 9] = 2;
        assert!(is_membership_report(&igmp));
        igmp[14 + 9] = 1; // ICMP
        assert!(!is_membership_report(&igmp));
        let mut mld = vec![0u8; 14 + 40 + 8];
        mld[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 0x16]);
        mld[12..14].copy_from_slice(&[0x86, 0xdd]);
        mld[14 + 6] = 58;
        assert!(is_membership_report(&mld));
        mld[..6].copy_from_slice(&[0x33, 0x33, 0xff, 0, 0, 5]);
        assert!(!is_membership_report(&mld), "a neighbour solicitation");
        mld[14 + 6] = 0; // hop-by-hop: MLDv1
        assert!(is_membership_report(&mld));
        assert!(!is_membership_report(&[0u8; 10]));
    }

    #[test]
    fn the_own_namespace_file_is_read_again_and_again() {
        let text = std::fs::read_to_string(DEV_MCAST).unwrap();
        let ifname = text
            .split_whitespace()
            .nth(1)
            .expect("no interface of this namespace has a multicast address");
        let mut m = Memberships::open(ifname).unwrap();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        m.read(&mut first).unwrap();
        m.read(&mut second).unwrap();
        assert!(!first.is_empty(), "no groups read for {ifname}:\n{text}");
        assert_eq!(first, second, "a second read (after a rewind) differs");
    }
}
