//! The host side of primary mode: IP forwarding on, forwarded traffic through the gateway TAP
//! accepted, and pod traffic that leaves the flat network masqueraded behind the host's own
//! address.
//!
//! The NAT rules live in a chain of our own, [`CHAIN`], in the `nat` table of `iptables` (IPv4)
//! and `ip6tables` (IPv6), jumped to from `POSTROUTING`: one rule per network prefix,
//! `-s PREFIX ! -d PREFIX -j MASQUERADE`. The accept rules live in [`FORWARD_CHAIN`] in the
//! `filter` table, jumped to from the top of `FORWARD` (so a `FORWARD` policy of `DROP`, as
//! Docker and kube-proxy set, does not cut the pods off): `-i TAP -j ACCEPT` and
//! `-o TAP -j ACCEPT` for the host member's TAP (`flatwire0`). Every rule is tagged with the
//! comment `flatwire:<nwid>` so a network's rules are found again without knowing its prefixes.
//! Every step checks before it adds (`-C`, `-S`), so enabling twice (as after an agent restart,
//! when the kernel kept the rules) changes nothing. The chains and their jumps go when the last
//! network is disabled. Forwarding is switched on and left on (other parts of the host may rely
//! on it).
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
/// The agent's chain in the `filter` table.
pub const FORWARD_CHAIN: &str = "FLATWIRE-FORWARD";

/// Our chains: (table, chain, the built-in chain that jumps to it, whether the jump goes first).
const CHAINS: [(&str, &str, &str, bool); 2] = [
    ("nat", CHAIN, "POSTROUTING", false),
    ("filter", FORWARD_CHAIN, "FORWARD", true),
];

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

    /// Runs `<program> -w -t TABLE ARGS`; `Ok(false)` when it exits with status 1 (a `-C`
    /// that found no rule, a chain that does not exist), an error for any other failure.
    fn run(self, table: &str, args: &[&str]) -> Result<bool, GatewayError> {
        let program = self.program();
        let out = Command::new(program)
            .args(["-w", "-t", table])
            .args(args)
            .output()
            .map_err(|source| GatewayError::Spawn { program, source })?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(GatewayError::Command {
                command: format!("{program} -t {table} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    /// Like [`Family::run`], but status 1 is a failure too.
    fn run_ok(self, table: &str, args: &[&str]) -> Result<(), GatewayError> {
        if self.run(table, args)? {
            Ok(())
        } else {
            Err(GatewayError::Command {
                command: format!("{} -t {table} {}", self.program(), args.join(" ")),
                stderr: "exit status 1".into(),
            })
        }
    }

    /// Adds the rule `args` (after the chain name) to `chain` of `table` unless it is there.
    fn ensure(self, table: &str, chain: &str, args: &[String]) -> Result<(), GatewayError> {
        let with = |op: &'static str| {
            let mut a = vec![op, chain];
            a.extend(args.iter().map(String::as_str));
            a
        };
        if !self.run(table, &with("-C"))? {
            self.run_ok(table, &with("-A"))?;
        }
        Ok(())
    }

    /// The rules of our `chain` in `table` (`-S` lines), `None` when the chain does not exist.
    fn rules(self, table: &str, chain: &str) -> Result<Option<Vec<String>>, GatewayError> {
        let program = self.program();
        let out = Command::new(program)
            .args(["-w", "-t", table, "-S", chain])
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

/// The accept rules of the gateway TAP `tap`, as `-A`/`-C` arguments after the chain name.
fn forward_rules(nwid: NetworkId, tap: &str) -> [Vec<String>; 2] {
    ["-i", "-o"].map(|dir| {
        [
            dir,
            tap,
            "-m",
            "comment",
            "--comment",
            &tag(nwid),
            "-j",
            "ACCEPT",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    })
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
/// `nwid`, on its TAP `tap`), accepts forwarded traffic in and out of `tap` and masquerades
/// traffic from each prefix's network to anywhere outside it. Idempotent. Blocking (runs
/// commands): call it off the tokio workers.
pub fn enable(nwid: NetworkId, tap: &str, prefixes: &[IpPrefix]) -> Result<(), GatewayError> {
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
        for (table, chain, from, first) in CHAINS {
            if family.rules(table, chain)?.is_none() {
                family.run_ok(table, &["-N", chain])?;
            }
            if !family.run(table, &["-C", from, "-j", chain])? {
                let jump = if first {
                    vec!["-I", from, "1", "-j", chain]
                } else {
                    vec!["-A", from, "-j", chain]
                };
                family.run_ok(table, &jump)?;
            }
        }
        for r in forward_rules(nwid, tap) {
            family.ensure("filter", FORWARD_CHAIN, &r)?;
        }
        tracing::info!(%nwid, %tap, chain = FORWARD_CHAIN, "accepting forwarded pod traffic");
        for net in nets {
            family.ensure("nat", CHAIN, &rule(nwid, net))?;
            tracing::info!(%nwid, %net, chain = CHAIN, "masquerading pod traffic leaving the network");
        }
    }
    Ok(())
}

/// Removes the rules of `nwid`; with `last`, also the chains and their jumps (no primary
/// network is left). Idempotent. Blocking: call it off the tokio workers.
pub fn disable(nwid: NetworkId, last: bool) -> Result<(), GatewayError> {
    let tag = tag(nwid);
    for family in Family::ALL {
        for (table, chain, from, _) in CHAINS {
            let Some(rules) = family.rules(table, chain)? else {
                continue;
            };
            for line in rules {
                // `-A CHAIN ARGS` as listed (the comment in quotes, which are not part of it):
                // delete with the same arguments.
                let mut args: Vec<&str> = line
                    .split_whitespace()
                    .map(|w| w.trim_matches('"'))
                    .collect();
                if !args.contains(&tag.as_str()) {
                    continue;
                }
                args[0] = "-D";
                family.run_ok(table, &args)?;
            }
            if last {
                while family.run(table, &["-D", from, "-j", chain])? {}
                family.run_ok(table, &["-F", chain])?;
                family.run_ok(table, &["-X", chain])?;
                tracing::info!(chain, program = family.program(), "chain removed");
            }
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
        let [i, o] = forward_rules(nwid, "flatwire0").map(|r| r.join(" "));
        assert_eq!(
            i,
            "-i flatwire0 -m comment --comment flatwire:8056c2e21c000001 -j ACCEPT"
        );
        assert!(o.starts_with("-o flatwire0 "), "{o}");
    }
}
