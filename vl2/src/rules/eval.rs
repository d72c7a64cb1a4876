//! The rules evaluator: ZeroTier One's `_doZtFilter` semantics, plus the outbound and
//! inbound filters that combine base rules and capabilities.
//!
//! Evaluation allocates nothing: it walks a slice of decoded [`Rule`]s over a borrowed
//! [`Frame`] and asks a [`Credentials`] view about tags and certificates of ownership.

use flatwire_vl1::Address;

use super::{Rule, RuleKind, TagOp, characteristics as chr};
use crate::Mac;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// Config flag: unsupported match types evaluate as "match".
pub const FLAG_UNSUPPORTED_MATCH: u64 = 0x8;

/// A parsed Ethernet frame as the rules engine sees it.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// Source MAC.
    pub source_mac: Mac,
    /// Destination MAC.
    pub dest_mac: Mac,
    /// Ethertype.
    pub ethertype: u16,
    /// VLAN id (0 in ZeroTier 1.x).
    pub vlan_id: u16,
    /// The Ethernet payload (bytes after the ethertype).
    pub payload: &'a [u8],
}

/// Which version's semantics to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Semantics {
    /// ZeroTier One 1.14.0 and later: forced outcomes and skip-drop.
    #[default]
    V1_14,
    /// ZeroTier One 1.10.0 – 1.12.x: every outcome is a plain 0/1 subject to NOT.
    Pre1_14,
}

/// What the evaluator needs to know about credentials: the local node's own tags and
/// certificates of ownership, and the remote peer's (time-valid) ones.
pub trait Credentials {
    /// The local node's tag value for `id`.
    fn local_tag(&self, id: u32) -> Option<u32>;
    /// The remote peer's time-valid tag value for `id` (`None` if unknown or no peer).
    fn remote_tag(&self, id: u32) -> Option<u32>;
    /// Whether the sender (remote when inbound, self when outbound) owns IP `ip`
    /// (4 or 16 bytes) by a valid certificate of ownership, or by NDP emulation (inbound).
    fn sender_owns_ip(&self, inbound: bool, ip: &[u8]) -> bool;
    /// Whether the sender owns MAC `mac` by a valid certificate of ownership.
    fn sender_owns_mac(&self, inbound: bool, mac: Mac) -> bool;
}

/// A credentials view with no tags and no certificates of ownership.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCredentials;

impl Credentials for NoCredentials {
    fn local_tag(&self, _: u32) -> Option<u32> {
        None
    }
    fn remote_tag(&self, _: u32) -> Option<u32> {
        None
    }
    fn sender_owns_ip(&self, _: bool, _: &[u8]) -> bool {
        false
    }
    fn sender_owns_mac(&self, _: bool, _: Mac) -> bool {
        false
    }
}

/// The evaluation environment of one frame.
pub struct Env<'a> {
    /// This node's address.
    pub own_address: Address,
    /// The network config flags (`f`).
    pub config_flags: u64,
    /// Tag and ownership lookups.
    pub credentials: &'a dyn Credentials,
    /// A source of 32-bit random numbers for `MATCH_RANDOM`.
    pub random: &'a mut dyn FnMut() -> u32,
    /// Which version's semantics to follow.
    pub semantics: Semantics,
}

/// The verdict of one rule list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No action applied (end of list or BREAK).
    NoMatch,
    /// DROP.
    Drop,
    /// REDIRECT to the new ztDest.
    Redirect,
    /// ACCEPT.
    Accept,
    /// ACCEPT while being a TEE/REDIRECT/WATCH target: bypass MAC and bridging checks.
    SuperAccept,
}

/// The rule action that decided a frame (or a copy it made), for per-action counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleAction {
    /// ACCEPT (or PRIORITY) ended the evaluation.
    Accept,
    /// DROP ended the evaluation.
    Drop,
    /// A TEE sent a copy of the frame.
    Tee,
    /// REDIRECT sent the frame elsewhere (or accepted it as the redirect target).
    Redirect,
    /// A WATCH sent a copy of the frame.
    Watch,
    /// BREAK ended the list without a verdict (the frame is dropped unless a capability
    /// accepts it).
    Break,
    /// No action matched: the default drop (unless a capability accepted it).
    NoMatch,
}

impl RuleAction {
    /// Every action, in counter order.
    pub const ALL: [RuleAction; 7] = [
        RuleAction::Accept,
        RuleAction::Drop,
        RuleAction::Tee,
        RuleAction::Redirect,
        RuleAction::Watch,
        RuleAction::Break,
        RuleAction::NoMatch,
    ];

    /// The lowercase name used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Accept => "accept",
            RuleAction::Drop => "drop",
            RuleAction::Tee => "tee",
            RuleAction::Redirect => "redirect",
            RuleAction::Watch => "watch",
            RuleAction::Break => "break",
            RuleAction::NoMatch => "no_match",
        }
    }
}

/// Frames counted per [`RuleAction`] and direction: plain counters, no allocation, cheap
/// enough to update for every frame. A frame counts once for the action that decided it
/// and once more for a TEE/WATCH copy it made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleHits {
    /// `[outbound, inbound]`, each indexed like [`RuleAction::ALL`].
    counts: [[u64; 7]; 2],
}

impl RuleHits {
    /// Counts the decision of one filter run (`inbound`: from [`filter_inbound`]).
    pub fn record(&mut self, inbound: bool, d: &FilterDecision) {
        let c = &mut self.counts[usize::from(inbound)];
        c[d.action as usize] += 1;
        if let Some(copy) = d.copy {
            let watch = matches!(copy.flags, copy_flags::WATCH_OUT | copy_flags::WATCH_IN);
            c[if watch {
                RuleAction::Watch
            } else {
                RuleAction::Tee
            } as usize] += 1;
        }
    }

    /// Frames counted for `action` in one direction.
    pub fn get(&self, inbound: bool, action: RuleAction) -> u64 {
        self.counts[usize::from(inbound)][action as usize]
    }

    /// The counts that grew since `earlier` (saturating), for exporting deltas.
    pub fn since(&self, earlier: &RuleHits) -> RuleHits {
        let mut d = RuleHits::default();
        for (dir, row) in d.counts.iter_mut().enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = self.counts[dir][i].saturating_sub(earlier.counts[dir][i]);
            }
        }
        d
    }
}

/// A TEE or WATCH copy requested by the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyTarget {
    /// Where to send the copy.
    pub address: Address,
    /// How many payload bytes to copy.
    pub length: usize,
    /// True for WATCH, false for TEE.
    pub watch: bool,
}

/// The result of evaluating one rule list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The verdict.
    pub verdict: Verdict,
    /// The action that ended the evaluation ([`RuleAction::NoMatch`] at the end of the
    /// list; TEE/WATCH copies are in `copy`).
    pub action: RuleAction,
    /// The last TEE/WATCH target seen, if any.
    pub copy: Option<CopyTarget>,
    /// The destination after evaluation (changed by REDIRECT).
    pub zt_dest: u64,
}

/// A match result: plain (subject to NOT) or forced (NOT ignored).
#[derive(Clone, Copy, PartialEq, Eq)]
enum M {
    Plain(bool),
    Forced(bool),
    /// Forced true that also arms skip-drop.
    ForcedSkip,
}

fn ipv6_payload(p: &[u8]) -> Option<(usize, u8)> {
    if p.len() < 40 {
        return None;
    }
    let mut proto = p[6];
    let mut pos = 40usize;
    while pos <= p.len() {
        match proto {
            0 | 43 | 60 | 135 => {
                if pos + 8 > p.len() {
                    return None;
                }
                proto = p[pos];
                pos += usize::from(p[pos + 1]) * 8 + 8;
            }
            _ => return Some((pos, proto)),
        }
    }
    None
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let bits = bits.min((a.len() * 8) as u32) as usize;
    for i in 0..a.len().min(b.len()) {
        let take = bits.saturating_sub(i * 8).min(8);
        let mask: u8 = if take == 0 { 0 } else { 0xffu8 << (8 - take) };
        if a[i] & mask != b[i] & mask {
            return false;
        }
    }
    true
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

fn characteristics(inbound: bool, frame: &Frame<'_>, env: &Env<'_>) -> u64 {
    let p = frame.payload;
    let len = p.len();
    let mut cf = if inbound { chr::INBOUND } else { 0 };
    if frame.dest_mac.is_multicast() {
        cf |= chr::MULTICAST;
    }
    if frame.dest_mac.is_broadcast() {
        cf |= chr::BROADCAST;
    }
    let src: Option<&[u8]> = match frame.ethertype {
        ETHERTYPE_IPV4 if len >= 20 => Some(&p[12..16]),
        ETHERTYPE_IPV6 if len >= 40 => {
            if len >= 64 && p[6] == 58 && (p[40] == 135 || p[40] == 136) {
                if p[40] == 135 {
                    cf |= chr::SENDER_IP_AUTHENTICATED;
                    None
                } else {
                    Some(&p[48..64])
                }
            } else {
                Some(&p[8..24])
            }
        }
        ETHERTYPE_ARP if len >= 28 => Some(&p[14..18]),
        _ => None,
    };
    if let Some(ip) = src
        && env.credentials.sender_owns_ip(inbound, ip)
    {
        cf |= chr::SENDER_IP_AUTHENTICATED;
    }
    if env.credentials.sender_owns_mac(inbound, frame.source_mac) {
        cf |= chr::SENDER_MAC_AUTHENTICATED;
    }
    match frame.ethertype {
        ETHERTYPE_IPV4 if len >= 20 && p[9] == 6 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if len >= ihl + 14 {
                cf |= u64::from(p[ihl + 13]) | (u64::from(p[ihl + 12] & 0x0f) << 8);
            }
        }
        ETHERTYPE_IPV6 => {
            if let Some((pos, 6)) = ipv6_payload(p)
                && len > pos + 14
            {
                cf |= u64::from(p[pos + 13]) | (u64::from(p[pos + 12] & 0x0f) << 8);
            }
        }
        _ => {}
    }
    cf
}

#[allow(clippy::too_many_arguments)]
fn eval_match(
    rule: &Rule,
    inbound: bool,
    zt_source: u64,
    zt_dest: u64,
    frame: &Frame<'_>,
    env: &mut Env<'_>,
    super_accept: bool,
) -> M {
    use M::*;
    use RuleKind::*;
    let p = frame.payload;
    let len = p.len();
    let et = frame.ethertype;
    let ff = Forced(false);
    match &rule.kind {
        SourceZt(a) => Plain(a.to_u64() == zt_source),
        DestZt(a) => Plain(a.to_u64() == zt_dest),
        VlanId(v) => Plain(*v == frame.vlan_id),
        VlanPcp(v) | VlanDei(v) => Plain(*v == 0),
        MacSource(m) => Plain(*m == frame.source_mac),
        MacDest(m) => Plain(*m == frame.dest_mac),
        Ipv4Source(ip, bits) | Ipv4Dest(ip, bits) => {
            if et == ETHERTYPE_IPV4 && len >= 20 {
                let at = if matches!(rule.kind, Ipv4Source(..)) {
                    12
                } else {
                    16
                };
                Plain(prefix_eq(&ip.octets(), &p[at..at + 4], u32::from(*bits)))
            } else {
                ff
            }
        }
        Ipv6Source(ip, bits) | Ipv6Dest(ip, bits) => {
            if et == ETHERTYPE_IPV6 && len >= 40 {
                let at = if matches!(rule.kind, Ipv6Source(..)) {
                    8
                } else {
                    24
                };
                // (addr & netmask) == rule_ip for every byte: host bits of the rule address
                // must be zero to match anything.
                let rip = ip.octets();
                let bits = usize::from(*bits).min(128);
                let ok = (0..16).all(|i| {
                    let take = bits.saturating_sub(i * 8).min(8);
                    let mask: u8 = if take == 0 { 0 } else { 0xffu8 << (8 - take) };
                    p[at + i] & mask == rip[i]
                });
                Plain(ok)
            } else {
                ff
            }
        }
        IpTos { mask, start, end } => {
            let tos = if et == ETHERTYPE_IPV4 && len >= 20 {
                p[1] & mask
            } else if et == ETHERTYPE_IPV6 && len >= 40 {
                (((p[0] << 4) & 0xf0) | (p[1] >> 4)) & mask
            } else {
                return ff;
            };
            Plain(tos >= *start && tos <= *end)
        }
        IpProtocol(v) => {
            if et == ETHERTYPE_IPV4 && len >= 20 {
                Plain(p[9] == *v)
            } else if et == ETHERTYPE_IPV6 {
                match ipv6_payload(p) {
                    Some((_, proto)) => Plain(proto == *v),
                    None => ff,
                }
            } else {
                ff
            }
        }
        Ethertype(v) => Plain(*v == et),
        Icmp {
            icmp_type,
            code,
            flags,
        } => {
            let at = if et == ETHERTYPE_IPV4 && len >= 20 && p[9] == 1 {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if len < ihl + 2 {
                    return ff;
                }
                ihl
            } else if et == ETHERTYPE_IPV6 {
                match ipv6_payload(p) {
                    Some((pos, 58)) if len >= pos + 2 => pos,
                    _ => return ff,
                }
            } else {
                return ff;
            };
            if p[at] != *icmp_type {
                ff
            } else if flags & 1 != 0 {
                Plain(p[at + 1] == *code)
            } else {
                Forced(true)
            }
        }
        SourcePortRange(lo, hi) | DestPortRange(lo, hi) => {
            let dest = matches!(rule.kind, DestPortRange(..));
            let has_ports = |proto: u8| matches!(proto, 6 | 17 | 132 | 136);
            if et == ETHERTYPE_IPV4 && len >= 20 {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if has_ports(p[9]) && len > ihl + 4 {
                    let port = be16(p, ihl + if dest { 2 } else { 0 }).unwrap_or(0);
                    Plain(port >= *lo && port <= *hi)
                } else {
                    Plain(false)
                }
            } else if et == ETHERTYPE_IPV6 {
                match ipv6_payload(p) {
                    None => ff,
                    Some((pos, proto)) => {
                        if has_ports(proto) && len > pos + 4 {
                            let port = be16(p, pos + if dest { 2 } else { 0 }).unwrap_or(0);
                            Plain(port > 0 && port >= *lo && port <= *hi)
                        } else {
                            Plain(false)
                        }
                    }
                }
            } else {
                ff
            }
        }
        Characteristics(mask) => Plain(characteristics(inbound, frame, env) & mask != 0),
        FrameSizeRange(lo, hi) => Plain(len >= usize::from(*lo) && len <= usize::from(*hi)),
        Random(prob) => Plain((env.random)() <= *prob),
        Tags { op, id, value } => {
            let creds = env.credentials;
            match op {
                TagOp::Sender | TagOp::Receiver => {
                    if super_accept {
                        return ForcedSkip;
                    }
                    let remote_side =
                        (*op == TagOp::Sender && inbound) || (*op == TagOp::Receiver && !inbound);
                    if remote_side {
                        match creds.remote_tag(*id) {
                            Some(v) => Plain(v == *value),
                            None if *op == TagOp::Receiver => ForcedSkip,
                            None => ff,
                        }
                    } else {
                        match creds.local_tag(*id) {
                            Some(v) => Plain(v == *value),
                            None => ff,
                        }
                    }
                }
                _ => {
                    let Some(l) = creds.local_tag(*id) else {
                        return ff;
                    };
                    match creds.remote_tag(*id) {
                        Some(r) => Plain(match op {
                            TagOp::Difference => l.abs_diff(r) <= *value,
                            TagOp::BitwiseAnd => l & r == *value,
                            TagOp::BitwiseOr => l | r == *value,
                            TagOp::BitwiseXor => l ^ r == *value,
                            _ => l == *value && r == *value,
                        }),
                        None if inbound && !super_accept => ff,
                        None => ForcedSkip,
                    }
                }
            }
        }
        IntegerRange {
            start,
            span,
            index,
            format,
        } => {
            let bits = u32::from(format & 63) + 1;
            let bytes = bits.div_ceil(8) as usize;
            let mut v: u64 = 0;
            if format & 0x80 == 0 {
                let idx = usize::from(*index) + (8 - bytes);
                if let Some(s) = p.get(idx..idx + bytes) {
                    v = s.iter().fold(0, |a, b| (a << 8) | u64::from(*b));
                }
            } else {
                let idx = usize::from(*index);
                if let Some(s) = p.get(idx..idx + bytes) {
                    v = s.iter().rev().fold(0, |a, b| (a << 8) | u64::from(*b));
                }
            }
            v &= u64::MAX >> (64 - bits);
            Plain(v >= *start && v <= start.wrapping_add(u64::from(*span)))
        }
        _ => Plain(env.config_flags & FLAG_UNSUPPORTED_MATCH != 0),
    }
}

/// Evaluates one rule list (`_doZtFilter`). `zt_dest` is 0 when unknown.
pub fn evaluate(
    rules: &[Rule],
    inbound: bool,
    zt_source: Address,
    zt_dest: u64,
    frame: &Frame<'_>,
    env: &mut Env<'_>,
) -> Outcome {
    let own = env.own_address.to_u64();
    let src = zt_source.to_u64();
    let mut out = Outcome {
        verdict: Verdict::NoMatch,
        action: RuleAction::NoMatch,
        copy: None,
        zt_dest,
    };
    let mut super_accept = false;
    let mut set = true;
    let mut skip_drop = false;
    for rule in rules {
        if rule.is_action() {
            if set {
                match &rule.kind {
                    RuleKind::Priority => {
                        out.verdict = Verdict::Accept;
                        out.action = RuleAction::Accept;
                        return out;
                    }
                    RuleKind::Drop => {
                        if skip_drop {
                            skip_drop = false;
                            continue;
                        }
                        out.verdict = Verdict::Drop;
                        out.action = RuleAction::Drop;
                        return out;
                    }
                    RuleKind::Accept => {
                        out.verdict = if super_accept {
                            Verdict::SuperAccept
                        } else {
                            Verdict::Accept
                        };
                        out.action = RuleAction::Accept;
                        return out;
                    }
                    RuleKind::Tee {
                        address, length, ..
                    }
                    | RuleKind::Watch {
                        address, length, ..
                    }
                    | RuleKind::Redirect {
                        address, length, ..
                    } => {
                        let f = *address;
                        if f == src {
                            continue;
                        }
                        if f == own {
                            if inbound {
                                out.verdict = Verdict::SuperAccept;
                                out.action = match rule.kind {
                                    RuleKind::Tee { .. } => RuleAction::Tee,
                                    RuleKind::Watch { .. } => RuleAction::Watch,
                                    _ => RuleAction::Redirect,
                                };
                                return out;
                            }
                            continue;
                        }
                        if f == out.zt_dest {
                            continue;
                        }
                        let Ok(target) = Address::new(f) else {
                            continue;
                        };
                        if let RuleKind::Redirect { .. } = rule.kind {
                            out.zt_dest = f;
                            out.verdict = Verdict::Redirect;
                            out.action = RuleAction::Redirect;
                            return out;
                        }
                        let len = frame.payload.len();
                        out.copy = Some(CopyTarget {
                            address: target,
                            length: if *length == 0 {
                                len
                            } else {
                                len.min(usize::from(*length))
                            },
                            watch: matches!(rule.kind, RuleKind::Watch { .. }),
                        });
                    }
                    RuleKind::Break => {
                        out.action = RuleAction::Break;
                        return out;
                    }
                    _ => {}
                }
            } else {
                if inbound
                    && let RuleKind::Tee { address, .. }
                    | RuleKind::Watch { address, .. }
                    | RuleKind::Redirect { address, .. } = rule.kind
                    && address == own
                {
                    super_accept = true;
                }
                set = true;
            }
            continue;
        }
        if !set && !rule.or {
            continue;
        }
        let m = eval_match(rule, inbound, src, out.zt_dest, frame, env, super_accept);
        let r = match (env.semantics, m) {
            (Semantics::V1_14, M::Plain(b)) => b ^ rule.not,
            (Semantics::V1_14, M::Forced(b)) => b,
            (Semantics::V1_14, M::ForcedSkip) => {
                skip_drop = true;
                true
            }
            (Semantics::Pre1_14, M::Plain(b) | M::Forced(b)) => b ^ rule.not,
            (Semantics::Pre1_14, M::ForcedSkip) => !rule.not,
        };
        if rule.or {
            set |= r;
        } else {
            set &= r;
        }
    }
    out
}

/// EXT_FRAME flag bytes for the copies the filters ask for.
pub mod copy_flags {
    /// TEE copy, sender side.
    pub const TEE_OUT: u8 = 0x02;
    /// REDIRECT, sender side.
    pub const REDIRECT_OUT: u8 = 0x04;
    /// WATCH copy, sender side.
    pub const WATCH_OUT: u8 = 0x16;
    /// TEE copy, receiver side.
    pub const TEE_IN: u8 = 0x08;
    /// REDIRECT, receiver side.
    pub const REDIRECT_IN: u8 = 0x0a;
    /// WATCH copy, receiver side.
    pub const WATCH_IN: u8 = 0x1c;
}

/// A copy of the frame to send as EXT_FRAME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyAction {
    /// Recipient.
    pub to: Address,
    /// Payload bytes to include.
    pub length: usize,
    /// EXT_FRAME flags byte.
    pub flags: u8,
}

/// The decision of a filter on one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterDecision {
    /// Outbound: send the frame normally. Inbound: 0 drop, 1 accept, 2 super-accept.
    pub accept: u8,
    /// TEE/WATCH copy to send, if any.
    pub copy: Option<CopyAction>,
    /// REDIRECT copy to send instead of the original, if any.
    pub redirect: Option<CopyAction>,
    /// The action that decided (for [`RuleHits`]): the accepting list's, else the base
    /// rules' (DROP, BREAK or no match).
    pub action: RuleAction,
}

fn copy_of(c: Option<CopyTarget>, inbound: bool) -> Option<CopyAction> {
    c.map(|c| CopyAction {
        to: c.address,
        length: c.length,
        flags: match (inbound, c.watch) {
            (false, false) => copy_flags::TEE_OUT,
            (false, true) => copy_flags::WATCH_OUT,
            (true, false) => copy_flags::TEE_IN,
            (true, true) => copy_flags::WATCH_IN,
        },
    })
}

/// The outbound filter (`filterOutgoingPacket`): base rules, then the node's own
/// capabilities in the order given (ascending id). `no_tee` suppresses TEE copies.
pub fn filter_outbound<'r>(
    base: &[Rule],
    capabilities: impl IntoIterator<Item = &'r [Rule]>,
    no_tee: bool,
    zt_dest: u64,
    frame: &Frame<'_>,
    env: &mut Env<'_>,
) -> FilterDecision {
    let own = env.own_address;
    let base_out = evaluate(base, false, own, zt_dest, frame, env);
    let mut dec = FilterDecision {
        accept: 0,
        copy: None,
        redirect: None,
        action: base_out.action,
    };
    let (accepted, outcome) = match base_out.verdict {
        Verdict::Drop => return dec,
        Verdict::NoMatch => {
            let mut found = None;
            for cap in capabilities {
                let o = evaluate(cap, false, own, zt_dest, frame, env);
                if matches!(
                    o.verdict,
                    Verdict::Accept | Verdict::SuperAccept | Verdict::Redirect
                ) {
                    found = Some(o);
                    break;
                }
            }
            match found {
                Some(o) => (true, o),
                None => return dec,
            }
        }
        _ => (true, base_out),
    };
    dec.action = outcome.action;
    if accepted {
        if !no_tee {
            dec.copy = copy_of(outcome.copy, false);
        }
        if outcome.zt_dest != 0 && outcome.zt_dest != zt_dest {
            if let Ok(to) = Address::new(outcome.zt_dest) {
                dec.redirect = Some(CopyAction {
                    to,
                    length: frame.payload.len(),
                    flags: copy_flags::REDIRECT_OUT,
                });
            }
            return dec;
        }
        dec.accept = 1;
    }
    dec
}

/// The inbound filter (`filterIncomingPacket`): base rules, then the sender's
/// time-valid capabilities. `accept` is 0 drop, 1 accept, 2 super-accept.
pub fn filter_inbound<'r>(
    base: &[Rule],
    sender_capabilities: impl IntoIterator<Item = &'r [Rule]>,
    sender: Address,
    frame: &Frame<'_>,
    env: &mut Env<'_>,
) -> FilterDecision {
    let own = env.own_address.to_u64();
    let verdict_value = |v: Verdict| match v {
        Verdict::Accept | Verdict::Redirect => 1,
        Verdict::SuperAccept => 2,
        _ => 0,
    };
    let base_out = evaluate(base, true, sender, own, frame, env);
    let mut dec = FilterDecision {
        accept: 0,
        copy: None,
        redirect: None,
        action: base_out.action,
    };
    let outcome = match base_out.verdict {
        Verdict::Drop => return dec,
        Verdict::NoMatch => {
            let mut found = None;
            for cap in sender_capabilities {
                let o = evaluate(cap, true, sender, own, frame, env);
                if verdict_value(o.verdict) > 0 {
                    found = Some(o);
                    break;
                }
            }
            match found {
                Some(o) => o,
                None => return dec,
            }
        }
        _ => base_out,
    };
    dec.accept = verdict_value(outcome.verdict);
    dec.action = outcome.action;
    dec.copy = copy_of(outcome.copy, true);
    if outcome.zt_dest != own
        && let Ok(to) = Address::new(outcome.zt_dest)
    {
        dec.redirect = Some(CopyAction {
            to,
            length: frame.payload.len(),
            flags: copy_flags::REDIRECT_IN,
        });
        dec.accept = 0;
    }
    dec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetworkId;

    fn decide(rules: &[Rule], inbound: bool) -> FilterDecision {
        let nwid = NetworkId::from(0x8056_c2e2_1c00_0001);
        let (own, peer) = (
            Address::new(0x11_2233_4455).unwrap(),
            Address::new(0x22_3344_5566).unwrap(),
        );
        let frame = Frame {
            source_mac: Mac::from_address(peer, nwid),
            dest_mac: Mac::from_address(own, nwid),
            ethertype: 0x0800,
            vlan_id: 0,
            payload: &[0x45; 40],
        };
        let mut rnd = || 4u32;
        let mut env = Env {
            own_address: own,
            config_flags: 0,
            credentials: &NoCredentials,
            random: &mut rnd,
            semantics: Semantics::V1_14,
        };
        if inbound {
            filter_inbound(rules, [], peer, &frame, &mut env)
        } else {
            filter_outbound(rules, [], false, peer.to_u64(), &frame, &mut env)
        }
    }

    #[test]
    fn every_deciding_action_is_counted_per_direction() {
        use RuleKind::*;
        let r = |k| Rule::new(k);
        let tee = |address| Tee {
            address,
            flags: 0,
            length: 0,
        };
        let watch = Watch {
            address: 0x33_4455_6677,
            flags: 0,
            length: 0,
        };
        let redirect = Redirect {
            address: 0x33_4455_6677,
            flags: 0,
            length: 0,
        };
        let cases: Vec<(Vec<Rule>, bool, &[RuleAction])> = vec![
            (vec![r(Accept)], false, &[RuleAction::Accept]),
            (vec![r(Drop)], true, &[RuleAction::Drop]),
            (vec![], false, &[RuleAction::NoMatch]),
            (vec![r(Break), r(Accept)], true, &[RuleAction::Break]),
            (vec![r(redirect)], false, &[RuleAction::Redirect]),
            (
                vec![r(tee(0x33_4455_6677)), r(Accept)],
                false,
                &[RuleAction::Accept, RuleAction::Tee],
            ),
            (
                vec![r(watch), r(Accept)],
                true,
                &[RuleAction::Accept, RuleAction::Watch],
            ),
        ];
        let mut hits = RuleHits::default();
        let mut want = RuleHits::default();
        for (rules, inbound, actions) in &cases {
            let d = decide(rules, *inbound);
            hits.record(*inbound, &d);
            for a in *actions {
                want.counts[usize::from(*inbound)][*a as usize] += 1;
            }
            assert_eq!(hits, want, "{rules:?} inbound={inbound}: {d:?}");
        }
        assert_eq!(hits.get(false, RuleAction::Accept), 2);
        assert_eq!(hits.get(true, RuleAction::Accept), 1);
        assert_eq!(hits.get(true, RuleAction::Drop), 1);
        let earlier = hits;
        hits.record(true, &decide(&[r(Drop)], true));
        let d = hits.since(&earlier);
        assert_eq!(d.get(true, RuleAction::Drop), 1);
        assert_eq!(
            RuleAction::ALL
                .iter()
                .map(|a| d.get(false, *a))
                .sum::<u64>(),
            0
        );
        assert_eq!(RuleAction::ALL.map(|a| a.as_str()).len(), 7);
    }
}
