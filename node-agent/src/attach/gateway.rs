//! The host side of primary mode: IP forwarding on, and pod traffic that leaves the flat network
//! masqueraded behind the host's own address.
//!
//! The NAT rules live in a chain of our own, [`CHAIN`], in the `nat` table of `iptables` (IPv4)
//! and `ip6tables` (IPv6), jumped to from `POSTROUTING`: one rule per network prefix,
//! `-s PREFIX ! -d PREFIX -j MASQUERADE`, tagged with the comment `flatwire:<nwid>` so a
//! network's rules are found again without knowing its prefixes. Every step checks before it
//! adds (`-C`, `-S`), so enabling twice (as after an agent restart, when the kernel kept the
//! rules) changes nothing. The chain and its jump go when the last network is disabled.
//! Forwarding is switched on and left on (other parts of the host may rely on it).
//!
//! The commands are the distribution's `iptables`/`ip6tables` (nft or legacy backend alike),
//! run with `-w` so concurrent callers wait for the xtables lock instead of failing.

use std::io;
use std::net::IpAddr;
use std::process::Command;

use flatwire_vl2::NetworkId;

use crate::tap::IpPrefix;

/// The agent's chain in the `nat` table.
pub const CHAIN: &str = "FLATWIRE-POSTROUTING";

/// Why forwarding or NAT could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A command could not be run at all (e.g. `iptables` is not installed).
    #[error("cannot run {program}: {source} (primary mode needs iptables and ip6tables)")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A forwarding sysctl could not be written.
    #[error("cannot turn on forwarding ({path}): {source}")]
    Sysctl {
        /// The `/proc/sys` file.
        path: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// An address family and its tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn of(p: &IpPrefix) -> Self {
        if p.addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn forwarding(self) -> &'static str {
        match self {
            Family::V4 => "/proc/sys/net/ipv4/ip_forward",
            Family::V6 => "/proc/sys/net/ipv6/conf/all/forwarding",
        }
    }

    /// Runs `<program> -w -t nat ARGS`; `Ok(false)` when it exits with status 1 (a `-C` that
    /// found no rule, a chain that does not exist), an error for any other failure.
    fn nat(self, args: &[&str]) -> Result<bool, GatewayError> {
        let program = self.program();
        let out = Command::new(program)
            .args(["-w", "-t", "nat"])
            .args(args)
            .output()
            .map_err(|source| GatewayError::Spawn { program, source })?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(GatewayError::Command {
                command: format!("{program} -t nat {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    /// Like [`Family::nat`], but status 1 is a failure too.
    fn nat_ok(self, args: &[&str]) -> Result<(), GatewayError> {
        if self.nat(args)? {
            Ok(())
        } else {
            Err(GatewayError::Command {
                command: format!("{} -t nat {}", self.program(), args.join(" ")),
                stderr: "exit status 1".into(),
            })
        }
    }

    /// The rules of our chain (`-S` lines), `None` when the chain does not exist.
    fn rules(self) -> Result<Option<Vec<String>>, GatewayError> {
        let program = self.program();
        let out = Command::new(program)
            .args(["-w", "-t", "nat", "-S", CHAIN])
            .output()
            .map_err(|source| GatewayError::Spawn { program, source })?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .map(str::to_string)
                .collect(),
        ))
    }
}

/// The comment tagging the rules of `nwid`.
fn tag(nwid: NetworkId) -> String {
    format!("flatwire:{nwid}")
}

/// `p` with the host bits cleared, e.g. `198.19.0.11/24` -> `198.19.0.0/24`.
pub fn network_of(p: IpPrefix) -> IpPrefix {
    let addr = match p.addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(p.len.min(32)))
                .unwrap_or(0);
            IpAddr::from((bits & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(p.len.min(128)))
                .unwrap_or(0);
            IpAddr::from((bits & mask).to_be_bytes())
        }
    };
    IpPrefix { addr, len: p.len }
}

/// The masquerade rule of one network prefix, as `-A`/`-C` arguments after the chain name.
fn rule(nwid: NetworkId, net: IpPrefix) -> Vec<String> {
    let net = net.to_string();
    [
        "-s",
        &net,
        "!",
        "-d",
        &net,
        "-m",
        "comment",
        "--comment",
        &tag(nwid),
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Turns on forwarding for the families of `prefixes` (the host member's addresses on
/// `nwid`) and masquerades traffic from each prefix's network to anywhere outside it.
/// Idempotent. Blocking (runs commands): call it off the tokio workers.
pub fn enable(nwid: NetworkId, prefixes: &[IpPrefix]) -> Result<(), GatewayError> {
    for family in Family::ALL {
        let nets: Vec<IpPrefix> = prefixes
            .iter()
            .filter(|p| Family::of(p) == family)
            .map(|p| network_of(*p))
            .collect();
        if nets.is_empty() {
            continue;
        }
        let path = family.forwarding();
        std::fs::write(path, b"1").map_err(|source| GatewayError::Sysctl { path, source })?;
        if family.rules()?.is_none() {
            family.nat_ok(&["-N", CHAIN])?;
        }
        if !family.nat(&["-C", "POSTROUTING", "-j", CHAIN])? {
            family.nat_ok(&["-A", "POSTROUTING", "-j", CHAIN])?;
        }
        for net in nets {
            let rule = rule(nwid, net);
            let args = |op: &'static str| {
                let mut a = vec![op, CHAIN];
                a.extend(rule.iter().map(String::as_str));
                a
            };
            if !family.nat(&args("-C"))? {
                family.nat_ok(&args("-A"))?;
            }
            tracing::info!(%nwid, %net, chain = CHAIN, "masquerading pod traffic leaving the network");
        }
    }
    Ok(())
}

/// Removes the masquerade rules of `nwid`; with `last`, also the chain and its jump (no
/// primary network is left). Idempotent. Blocking: call it off the tokio workers.
pub fn disable(nwid: NetworkId, last: bool) -> Result<(), GatewayError> {
    let tag = tag(nwid);
    for family in Family::ALL {
        let Some(rules) = family.rules()? else {
            continue;
        };
        for line in rules
            .iter()
            .filter(|l| l.split_whitespace().any(|w| w == tag))
        {
            // `-A CHAIN ARGS` as listed: delete with the same arguments.
            let mut args: Vec<&str> = line.split_whitespace().collect();
            args[0] = "-D";
            family.nat_ok(&args)?;
        }
        if last {
            while family.nat(&["-D", "POSTROUTING", "-j", CHAIN])? {}
            family.nat_ok(&["-F", CHAIN])?;
            family.nat_ok(&["-X", CHAIN])?;
            tracing::info!(
                chain = CHAIN,
                program = family.program(),
                "NAT chain removed"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_of_prefixes() {
        for (p, n) in [
            ("198.19.0.11/24", "198.19.0.0/24"),
            ("198.19.7.200/16", "198.19.0.0/16"),
            ("198.19.7.200/32", "198.19.7.200/32"),
            ("198.19.7.200/0", "0.0.0.0/0"),
            ("fd00:f1a7::11/64", "fd00:f1a7::/64"),
            (
                "fd12:3456:789a:bcde:f099:93aa:bbcc:ddee/88",
                "fd12:3456:789a:bcde:f099:9300::/88",
            ),
        ] {
            assert_eq!(network_of(p.parse().unwrap()).to_string(), n, "{p}");
        }
    }

    #[test]
    fn rules_carry_the_network_tag() {
        let nwid: NetworkId = "8056c2e21c000001".parse().unwrap();
        let r = rule(nwid, "198.19.0.0/24".parse().unwrap()).join(" ");
        assert_eq!(
            r,
            "-s 198.19.0.0/24 ! -d 198.19.0.0/24 -m comment --comment \
             flatwire:8056c2e21c000001 -j MASQUERADE"
        );
    }
}
