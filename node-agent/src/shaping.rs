//! Pod bandwidth limits (the CNI `bandwidth` capability), enforced inside the pod's network
//! namespace.
//!
//! The reference `bandwidth` plugin shapes the host end of a veth pair; a flatwire pod
//! interface is a TAP whose other end is the agent, so the agent shapes the pod side instead,
//! with the kernel's token bucket filter (`tbf`, queueing rather than dropping):
//! - egress (pod → network): a `tbf` root qdisc on the pod interface;
//! - ingress (network → pod): the interface's ingress is redirected (`u32` match-all filter,
//!   `mirred`) to an `ifb` device of its own in the pod namespace (`fwb` and a hash of the
//!   interface name), whose root qdisc is a `tbf`.
//!
//! A pod without `CAP_NET_ADMIN` cannot undo it. Rates are bits per second and bursts bits, as
//! Kubernetes and the CNI convention give them; 0 means unlimited. The work is done by
//! iproute2's `ip` and `tc`, run on a thread inside the namespace ([`crate::tap::in_netns_as`]).

use std::path::Path;
use std::process::Command;

use flatwire_api::v1;
use serde_json::Value;

use crate::tap::{TapError, in_netns_as, inspect_link};

/// How long a packet may wait in a token bucket (as the reference plugin: 25 ms).
const LATENCY: &str = "25ms";
/// Largest burst `tbf` can hold, in bits (its buffer is a 32-bit byte count).
const MAX_BURST_BITS: u64 = u32::MAX as u64 * 8;
/// Bytes of an Ethernet header, on top of the MTU in a frame.
const ETHERNET_HEADER: u64 = 14;

/// A pod's bandwidth limits: rates in bits per second, bursts in bits; 0 = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Rate of traffic into the pod.
    pub ingress_rate: u64,
    /// Burst of traffic into the pod.
    pub ingress_burst: u64,
    /// Rate of traffic out of the pod.
    pub egress_rate: u64,
    /// Burst of traffic out of the pod.
    pub egress_burst: u64,
}

/// Why limits could not be checked, applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    /// The limits make no sense; the message names the field.
    #[error("bandwidth: {0}")]
    Invalid(String),
    /// The interface is not in the namespace.
    #[error("bandwidth: no interface {0:?} in the pod's namespace")]
    NoInterface(String),
    /// `ip` or `tc` failed.
    #[error("bandwidth: `{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr (or why it did not run).
        stderr: String,
    },
    /// The shaping found differs from the limits asked for.
    #[error("bandwidth: {0}")]
    Mismatch(String),
    /// Entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] TapError),
}

impl Bandwidth {
    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }

    /// Checks that each direction has both a rate and a burst or neither, and that a burst
    /// fits `tbf`; with `mtu`, also that it holds at least one frame.
    pub fn validate(&self, mtu: Option<u32>) -> Result<(), ShapingError> {
        for (dir, rate, burst) in [
            ("ingress", self.ingress_rate, self.ingress_burst),
            ("egress", self.egress_rate, self.egress_burst),
        ] {
            let frame_bits = mtu.map(|m| (u64::from(m) + ETHERNET_HEADER) * 8);
            let problem = match (rate, burst) {
                (0, 0) => continue,
                (0, _) => format!("{dir}Burst is set but {dir}Rate is not"),
                (_, 0) => format!("{dir}Rate is set but {dir}Burst is not"),
                (_, b) if b > MAX_BURST_BITS => {
                    format!("{dir}Burst of {b} bits is more than the {MAX_BURST_BITS} tbf can hold")
                }
                (_, b) if frame_bits.is_some_and(|f| b < f) => format!(
                    "{dir}Burst of {b} bits is less than one frame ({} bits at MTU {}); \
                     nothing could pass",
                    frame_bits.unwrap_or_default(),
                    mtu.unwrap_or_default()
                ),
                _ => continue,
            };
            return Err(ShapingError::Invalid(problem));
        }
        Ok(())
    }
}

impl From<&v1::Bandwidth> for Bandwidth {
    fn from(b: &v1::Bandwidth) -> Self {
        Self {
            ingress_rate: b.ingress_rate,
            ingress_burst: b.ingress_burst,
            egress_rate: b.egress_rate,
            egress_burst: b.egress_burst,
        }
    }
}

impl From<Bandwidth> for v1::Bandwidth {
    fn from(b: Bandwidth) -> Self {
        Self {
            ingress_rate: b.ingress_rate,
            ingress_burst: b.ingress_burst,
            egress_rate: b.egress_rate,
            egress_burst: b.egress_burst,
        }
    }
}

/// The `ifb` device that shapes traffic into interface `ifname`: `fwb` and an FNV-1a hash of
/// the name, so it is found again after the interface was recreated.
fn ifb_name(ifname: &str) -> String {
    let hash = ifname.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("fwb{hash:08x}")
}

/// Runs `program args` in the current namespace; its stdout on success.
fn run(program: &str, args: &[&str]) -> Result<String, ShapingError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| ShapingError::Command {
            command: command.clone(),
            stderr: format!("could not run it: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ShapingError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The qdiscs of `dev`, as `tc -j` prints them.
fn qdiscs(dev: &str) -> Result<Vec<Value>, ShapingError> {
    let out = run("tc", &["-j", "qdisc", "show", "dev", dev])?;
    serde_json::from_str(&out).map_err(|e| ShapingError::Command {
        command: format!("tc -j qdisc show dev {dev}"),
        stderr: format!("unreadable output: {e}"),
    })
}

/// The rate (bits per second) of the root `tbf` of `dev`, if it has one.
fn tbf_rate(dev: &str) -> Result<Option<u64>, ShapingError> {
    Ok(qdiscs(dev)?.iter().find_map(|q| {
        (q["kind"] == "tbf" && q["root"] == true)
            .then(|| q["options"]["rate"].as_u64())
            .flatten()
            .map(|bytes| bytes * 8)
    }))
}

/// A `tbf` root qdisc on `dev`.
fn put_tbf(dev: &str, rate: u64, burst: u64) -> Result<(), ShapingError> {
    let (rate, burst) = (format!("{rate}bit"), format!("{}b", burst / 8));
    let args = [
        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf",
    ];
    run(
        "tc",
        &[
            &args[..],
            &["rate", &rate, "burst", &burst, "latency", LATENCY],
        ]
        .concat(),
    )
    .map(drop)
}

/// Removes every limit from `ifname` (in the current namespace); missing pieces, the
/// interface included, are fine.
fn clear(ifname: &str) -> Result<(), ShapingError> {
    if inspect_link(ifname)?.is_some() {
        for q in qdiscs(ifname)? {
            if q["kind"] == "tbf" && q["root"] == true {
                run("tc", &["qdisc", "del", "dev", ifname, "root"])?;
            } else if q["kind"] == "ingress" {
                run("tc", &["qdisc", "del", "dev", ifname, "ingress"])?;
            }
        }
    }
    let ifb = ifb_name(ifname);
    if inspect_link(&ifb)?.is_some() {
        run("ip", &["link", "del", &ifb])?;
    }
    Ok(())
}

/// Sets the limits of `bw` on interface `ifname` of the namespace at `netns`, replacing any
/// earlier ones (an unlimited `bw` removes them). `mtu` is the interface's. Blocks: call it
/// from `spawn_blocking`.
pub fn apply(netns: &Path, ifname: &str, bw: Bandwidth, mtu: u32) -> Result<(), ShapingError> {
    bw.validate(Some(mtu))?;
    let ifname = ifname.to_owned();
    in_netns_as(netns, move || {
        if inspect_link(&ifname)?.is_none() {
            return Err(ShapingError::NoInterface(ifname));
        }
        clear(&ifname)?;
        if bw.egress_rate > 0 {
            put_tbf(&ifname, bw.egress_rate, bw.egress_burst)?;
        }
        if bw.ingress_rate > 0 {
            let ifb = ifb_name(&ifname);
            let mtu = mtu.to_string();
            run("ip", &["link", "add", &ifb, "mtu", &mtu, "type", "ifb"])?;
            run("ip", &["link", "set", &ifb, "up"])?;
            put_tbf(&ifb, bw.ingress_rate, bw.ingress_burst)?;
            run(
                "tc",
                &["qdisc", "add", "dev", &ifname, "handle", "ffff:", "ingress"],
            )?;
            let redirect = ["action", "mirred", "egress", "redirect", "dev", &ifb];
            let filter = [
                "filter", "add", "dev", &ifname, "parent", "ffff:", "protocol", "all",
            ];
            let matcher = ["prio", "1", "u32", "match", "u32", "0", "0"];
            run("tc", &[&filter[..], &matcher, &redirect].concat())?;
        }
        Ok(())
    })
}

/// Checks that interface `ifname` of the namespace at `netns` is shaped as `bw` asks (rates
/// compared; bursts are rounded by the kernel).
pub fn check(netns: &Path, ifname: &str, bw: Bandwidth) -> Result<(), ShapingError> {
    let ifname = ifname.to_owned();
    in_netns_as(netns, move || {
        if inspect_link(&ifname)?.is_none() {
            return Err(ShapingError::NoInterface(ifname));
        }
        let egress = tbf_rate(&ifname)?;
        let ifb = ifb_name(&ifname);
        let ingress = match inspect_link(&ifb)? {
            Some(_) => tbf_rate(&ifb)?,
            None => None,
        };
        for (dir, want, found) in [
            ("egress", bw.egress_rate, egress),
            ("ingress", bw.ingress_rate, ingress),
        ] {
            let found = found.unwrap_or(0);
            if want != found {
                return Err(ShapingError::Mismatch(format!(
                    "{dir} rate of {ifname} is {found} bit/s, {want} expected (0 = unlimited)"
                )));
            }
        }
        Ok(())
    })
}

/// Removes the limits of interface `ifname` of the namespace at `netns`, if it still has any
/// (its `ifb` device too when the interface is already gone).
pub fn remove(netns: &Path, ifname: &str) -> Result<(), ShapingError> {
    let ifname = ifname.to_owned();
    in_netns_as(netns, move || clear(&ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_need_rate_and_burst_that_hold_a_frame() {
        let ok = Bandwidth {
            ingress_rate: 10_000_000,
            ingress_burst: i32::MAX as u64,
            egress_rate: 1_000_000,
            egress_burst: 100_000,
        };
        assert!(ok.validate(Some(2800)).is_ok());
        assert!(Bandwidth::default().validate(Some(2800)).is_ok());
        assert!(Bandwidth::default().is_unlimited());
        for (bad, word) in [
            (
                Bandwidth {
                    ingress_rate: 1,
                    ..Default::default()
                },
                "ingressRate is set",
            ),
            (
                Bandwidth {
                    egress_burst: 80_000,
                    ..Default::default()
                },
                "egressBurst is set",
            ),
            (
                Bandwidth {
                    egress_rate: 1_000,
                    egress_burst: 8 * 1000,
                    ..Default::default()
                },
                "less than one frame",
            ),
            (
                Bandwidth {
                    ingress_rate: 1,
                    ingress_burst: MAX_BURST_BITS + 1,
                    ..Default::default()
                },
                "more than",
            ),
        ] {
            let e = bad.validate(Some(2800)).unwrap_err().to_string();
            assert!(e.contains(word), "{bad:?}: {e}");
        }
    }
}
