//! The compiler for ZeroTier's rule definition language (tags, capabilities, macros).
//!
//! It follows `rule-compiler/rule-compiler.js` and `cli.js` of ZeroTier One: the same
//! tokenizer (including its block quirks), the same JSON output, field order and
//! JavaScript 32-bit arithmetic artefacts. Differences: error columns are 1-based on every
//! line (the reference is 0-based on line 1 only) and CR does not count as a line break.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use super::{Rule, rule_from_json};

/// An ordered JSON value (object keys keep insertion order, as JavaScript prints them).
#[derive(Clone, Debug, PartialEq)]
pub enum OJson {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<OJson>),
    /// An object with ordered keys.
    Obj(Vec<(String, OJson)>),
}

impl OJson {
    fn obj(pairs: Vec<(&str, OJson)>) -> OJson {
        OJson::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Converts to a `serde_json::Value` (key order is lost).
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            OJson::Null => Value::Null,
            OJson::Bool(b) => Value::Bool(*b),
            OJson::Int(i) => Value::from(*i),
            OJson::Str(s) => Value::String(s.clone()),
            OJson::Arr(a) => Value::Array(a.iter().map(OJson::to_value).collect()),
            OJson::Obj(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
        }
    }

    /// Prints like `JSON.stringify(value, null, indent)`.
    pub fn pretty(&self, indent: usize) -> String {
        let mut s = String::new();
        self.write(&mut s, indent, 0);
        s
    }

    fn write(&self, out: &mut String, indent: usize, depth: usize) {
        let pad = |out: &mut String, d: usize| {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', indent * d));
        };
        match self {
            OJson::Null => out.push_str("null"),
            OJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            OJson::Int(i) => out.push_str(&i.to_string()),
            OJson::Str(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
            OJson::Arr(a) if a.is_empty() => out.push_str("[]"),
            OJson::Obj(o) if o.is_empty() => out.push_str("{}"),
            OJson::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    pad(out, depth + 1);
                    v.write(out, indent, depth + 1);
                }
                pad(out, depth);
                out.push(']');
            }
            OJson::Obj(o) => {
                out.push('{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    pad(out, depth + 1);
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push_str(": ");
                    v.write(out, indent, depth + 1);
                }
                pad(out, depth);
                out.push('}');
            }
        }
    }
}

/// A compile error with its 1-based position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CompileError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {} column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// A named tag definition.
#[derive(Clone, Debug, PartialEq)]
pub struct TagDef {
    /// Tag id.
    pub id: i64,
    /// Default value (`None` when not given).
    pub default: Option<i64>,
    /// Enum names and values, in definition order.
    pub enums: Vec<(String, i64)>,
    /// Flag names and masks, in definition order.
    pub flags: Vec<(String, i64)>,
}

/// A named capability definition with its compiled rules (JSON form).
#[derive(Clone, Debug, PartialEq)]
pub struct CapDef {
    /// Capability id.
    pub id: i64,
    /// Issued to new members automatically.
    pub default: bool,
    /// Compiled rules in the compiler's JSON form.
    pub rules: Vec<OJson>,
}

/// The result of compiling a rule source.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    /// Base rules in the compiler's JSON form.
    pub rules: Vec<OJson>,
    /// Capabilities by name, in definition order.
    pub capabilities: Vec<(String, CapDef)>,
    /// Tags by name, in definition order.
    pub tags: Vec<(String, TagDef)>,
}

impl Compiled {
    /// The object `cli.js` prints: `config`, `capabilitiesByName`, `tagsByName`.
    pub fn to_cli_json(&self) -> OJson {
        let caps: Vec<OJson> = self
            .capabilities
            .iter()
            .map(|(_, c)| {
                OJson::obj(vec![
                    ("id", OJson::Int(c.id)),
                    ("default", OJson::Bool(c.default)),
                    ("rules", OJson::Arr(c.rules.clone())),
                ])
            })
            .collect();
        // cli.js writes `(dfl || dfl === 0) ? dfl : null`: a default of 0 stays 0.
        let tags: Vec<OJson> = self
            .tags
            .iter()
            .map(|(_, t)| {
                OJson::obj(vec![
                    ("id", OJson::Int(t.id)),
                    ("default", t.default.map_or(OJson::Null, OJson::Int)),
                ])
            })
            .collect();
        let caps_by_name = OJson::Obj(
            self.capabilities
                .iter()
                .map(|(n, c)| (n.clone(), OJson::Int(c.id)))
                .collect(),
        );
        let tags_by_name = OJson::Obj(
            self.tags
                .iter()
                .map(|(n, t)| {
                    let pairs = |v: &Vec<(String, i64)>| {
                        OJson::Obj(v.iter().map(|(k, x)| (k.clone(), OJson::Int(*x))).collect())
                    };
                    (
                        n.clone(),
                        OJson::obj(vec![
                            ("id", OJson::Int(t.id)),
                            ("default", t.default.map_or(OJson::Null, OJson::Int)),
                            ("enums", pairs(&t.enums)),
                            ("flags", pairs(&t.flags)),
                        ]),
                    )
                })
                .collect(),
        );
        OJson::obj(vec![
            (
                "config",
                OJson::obj(vec![
                    ("rules", OJson::Arr(self.rules.clone())),
                    ("capabilities", OJson::Arr(caps)),
                    ("tags", OJson::Arr(tags)),
                ]),
            ),
            ("capabilitiesByName", caps_by_name),
            ("tagsByName", tags_by_name),
        ])
    }

    /// The base rules as binary-ready [`Rule`]s (through the controller's JSON parser).
    pub fn base_rules(&self) -> Vec<Rule> {
        self.rules
            .iter()
            .filter_map(|r| rule_from_json(&r.to_value()))
            .collect()
    }

    /// A capability's rules as [`Rule`]s.
    pub fn capability_rules(&self, cap: &CapDef) -> Vec<Rule> {
        cap.rules
            .iter()
            .filter_map(|r| rule_from_json(&r.to_value()))
            .collect()
    }
}

#[derive(Clone, Debug)]
struct Tok {
    text: String,
    line: usize,
    col: usize,
}

#[derive(Clone, Debug)]
enum Node {
    Tok(Tok),
    Block(Vec<Node>),
}

impl Node {
    fn text(&self) -> Option<&str> {
        match self {
            Node::Tok(t) => Some(&t.text),
            Node::Block(_) => None,
        }
    }
    fn pos(&self) -> (usize, usize) {
        match self {
            Node::Tok(t) => (t.line, t.col),
            Node::Block(b) => b.first().map_or((0, 0), Node::pos),
        }
    }
}

fn err<T>(at: (usize, usize), msg: impl Into<String>) -> Result<T, CompileError> {
    Err(CompileError {
        line: at.0,
        column: at.1,
        message: msg.into(),
    })
}

const OPEN_BLOCK: &[&str] = &[
    "macro", "tag", "cap", "drop", "accept", "tee", "watch", "redirect", "break", "priority",
];

const RESERVED: &[&str] = &[
    "macro",
    "tag",
    "cap",
    "default",
    "drop",
    "accept",
    "tee",
    "watch",
    "redirect",
    "break",
    "priority",
    "ztsrc",
    "ztdest",
    "vlan",
    "vlanpcp",
    "vlandei",
    "ethertype",
    "macsrc",
    "macdest",
    "ipsrc",
    "ipdest",
    "iptos",
    "ipprotocol",
    "icmp",
    "sport",
    "dport",
    "chr",
    "framesize",
    "random",
    "tand",
    "tor",
    "txor",
    "tdiff",
    "teq",
    "tseq",
    "treq",
    "type",
    "enum",
    "class",
    "define",
    "import",
    "include",
    "log",
    "not",
    "xor",
    "or",
    "and",
    "set",
    "var",
    "let",
];

const CHARACTERISTIC_BITS: &[(&str, i64)] = &[
    ("inbound", 63),
    ("multicast", 62),
    ("broadcast", 61),
    ("ipauth", 60),
    ("macauth", 59),
    ("tcp_fin", 0),
    ("tcp_syn", 1),
    ("tcp_rst", 2),
    ("tcp_psh", 3),
    ("tcp_ack", 4),
    ("tcp_urg", 5),
    ("tcp_ece", 6),
    ("tcp_cwr", 7),
    ("tcp_ns", 8),
    ("tcp_rs2", 9),
    ("tcp_rs1", 10),
    ("tcp_rs0", 11),
];

const ETHERTYPES: &[(&str, i64)] = &[
    ("ipv4", 0x0800),
    ("arp", 0x0806),
    ("wol", 0x0842),
    ("rarp", 0x8035),
    ("ipv6", 0x86dd),
    ("atalk", 0x809b),
    ("aarp", 0x80f3),
    ("ipx_a", 0x8137),
    ("ipx_b", 0x8138),
];

const IP_PROTOCOLS: &[(&str, i64)] = &[
    ("icmp", 1),
    ("icmp4", 1),
    ("icmpv4", 1),
    ("igmp", 2),
    ("ipip", 4),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("udp", 17),
    ("rdp", 27),
    ("esp", 50),
    ("ah", 51),
    ("icmp6", 58),
    ("icmpv6", 58),
    ("l2tp", 115),
    ("sctp", 132),
    ("udplite", 136),
];

fn lookup(table: &[(&str, i64)], k: &str) -> Option<i64> {
    table.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
}

fn match_info(kw: &str) -> Option<(usize, &'static str)> {
    Some(match kw {
        "ztsrc" => (1, "MATCH_SOURCE_ZEROTIER_ADDRESS"),
        "ztdest" => (1, "MATCH_DEST_ZEROTIER_ADDRESS"),
        "vlan" => (1, "MATCH_VLAN_ID"),
        "vlanpcp" => (1, "MATCH_VLAN_PCP"),
        "vlandei" => (1, "MATCH_VLAN_DEI"),
        "ethertype" => (1, "MATCH_ETHERTYPE"),
        "macsrc" => (1, "MATCH_MAC_SOURCE"),
        "macdest" => (1, "MATCH_MAC_DEST"),
        "ipsrc" => (1, ""),
        "ipdest" => (1, ""),
        "iptos" => (2, "MATCH_IP_TOS"),
        "ipprotocol" => (1, "MATCH_IP_PROTOCOL"),
        "icmp" => (2, "MATCH_ICMP"),
        "sport" => (1, "MATCH_IP_SOURCE_PORT_RANGE"),
        "dport" => (1, "MATCH_IP_DEST_PORT_RANGE"),
        "chr" => (1, "MATCH_CHARACTERISTICS"),
        "framesize" => (1, "MATCH_FRAME_SIZE_RANGE"),
        "random" => (1, "MATCH_RANDOM"),
        "tand" => (2, "MATCH_TAGS_BITWISE_AND"),
        "tor" => (2, "MATCH_TAGS_BITWISE_OR"),
        "txor" => (2, "MATCH_TAGS_BITWISE_XOR"),
        "tdiff" => (2, "MATCH_TAGS_DIFFERENCE"),
        "teq" => (2, "MATCH_TAGS_EQUAL"),
        "tseq" => (2, "MATCH_TAG_SENDER"),
        "treq" => (2, "MATCH_TAG_RECEIVER"),
        _ => return None,
    })
}

/// Whether the rule language accepts `n` as a tag, enum, capability or macro name: letters,
/// digits and `_`, not starting with a digit.
pub fn is_valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    match chars.next() {
        None => false,
        Some(c) if c.is_ascii_digit() => false,
        Some(c) => {
            (c == '_' || c.is_alphanumeric()) && chars.all(|c| c == '_' || c.is_alphanumeric())
        }
    }
}

/// JavaScript `parseInt(s, radix)`: optional sign, digits of the radix up to the first
/// other character; `None` for NaN.
fn js_parse_int(s: &str, radix: u32) -> Option<i64> {
    let s = s.trim_start();
    let (neg, mut t) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let mut radix = radix;
    if (radix == 16 || radix == 0)
        && let Some(r) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"))
    {
        t = r;
        radix = 16;
    }
    if radix == 0 {
        radix = 10;
    }
    let mut v: i64 = 0;
    let mut any = false;
    for c in t.chars() {
        match c.to_digit(radix) {
            Some(d) => {
                v = v
                    .saturating_mul(i64::from(radix))
                    .saturating_add(i64::from(d));
                any = true;
            }
            None => break,
        }
    }
    any.then_some(if neg { -v } else { v })
}

/// The compiler's `_parseNum`: `0x` hex or decimal, -1 for anything unparsable.
fn parse_num(s: &str) -> i64 {
    if s.is_empty() {
        return -1;
    }
    let l = s.to_lowercase();
    let r = if l.len() > 2 && l.starts_with("0x") {
        js_parse_int(&l[2..], 16)
    } else {
        js_parse_int(&l, 10)
    };
    r.unwrap_or(-1)
}

/// JavaScript `parseFloat`: the longest numeric prefix, NaN as `None`.
fn js_parse_float(s: &str) -> Option<f64> {
    let s = s.trim_start();
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    if s[i..].starts_with("Infinity") {
        return Some(if b.first() == Some(&b'-') {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    let digits_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut mant = i > digits_start;
    if i < b.len() && b[i] == b'.' {
        let f = i + 1;
        let mut j = f;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > f || mant {
            mant = mant || j > f;
            i = j;
        }
    }
    if !mant {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let ds = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > ds {
            i = j;
        }
    }
    s[..i].parse::<f64>().ok()
}

fn ipv4_regex() -> Option<&'static regex::Regex> {
    static R: OnceLock<Option<regex::Regex>> = OnceLock::new();
    R.get_or_init(|| {
        regex::Regex::new(
            r"((25[0-5]|(2[0-4]|1{0,1}[0-9]){0,1}[0-9])\.){3,3}(25[0-5]|(2[0-4]|1{0,1}[0-9]){0,1}[0-9])",
        )
        .ok()
    })
    .as_ref()
}

fn ipv6_regex() -> Option<&'static regex::Regex> {
    static R: OnceLock<Option<regex::Regex>> = OnceLock::new();
    R.get_or_init(|| {
        regex::Regex::new(concat!(
            r"(([0-9a-fA-F]{1,4}:){7,7}[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,7}:|",
            r"([0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,5}(:[0-9a-fA-F]{1,4}){1,2}|",
            r"([0-9a-fA-F]{1,4}:){1,4}(:[0-9a-fA-F]{1,4}){1,3}|([0-9a-fA-F]{1,4}:){1,3}(:[0-9a-fA-F]{1,4}){1,4}|",
            r"([0-9a-fA-F]{1,4}:){1,2}(:[0-9a-fA-F]{1,4}){1,5}|[0-9a-fA-F]{1,4}:((:[0-9a-fA-F]{1,4}){1,6})|",
            r":((:[0-9a-fA-F]{1,4}){1,7}|:)|fe80:(:[0-9a-fA-F]{0,4}){0,4}%[0-9a-zA-Z]{1,}|",
            r"::(ffff(:0{1,4}){0,1}:){0,1}((25[0-5]|(2[0-4]|1{0,1}[0-9]){0,1}[0-9])\.){3,3}(25[0-5]|(2[0-4]|1{0,1}[0-9]){0,1}[0-9])|",
            r"([0-9a-fA-F]{1,4}:){1,4}:((25[0-5]|(2[0-4]|1{0,1}[0-9]){0,1}[0-9])\.){3,3}(25[0-5]|(2[0-4]|1{0,1}[0-9]){0,1}[0-9]))"
        ))
        .ok()
    })
    .as_ref()
}

fn tokenize(src: &str) -> Vec<Node> {
    let mut stack: Vec<Vec<Node>> = vec![Vec::new()];
    let mut cur = String::new();
    let mut cur_pos = (0usize, 0usize);
    let mut skip_line = false;
    let mut line = 1usize;
    let mut col = 0usize;
    let flush = |stack: &mut Vec<Vec<Node>>, cur: &mut String, pos: (usize, usize)| {
        if cur.is_empty() {
            return;
        }
        let mut end_of_block = false;
        if cur.ends_with(';') {
            end_of_block = true;
            cur.pop();
        }
        let text = std::mem::take(cur);
        let is_open = OPEN_BLOCK.contains(&text.as_str());
        if !text.is_empty()
            && let Some(top) = stack.last_mut()
        {
            top.push(Node::Tok(Tok {
                text,
                line: pos.0,
                col: pos.1,
            }));
        }
        if end_of_block && stack.len() > 1 && stack.last().is_some_and(|b| !b.is_empty()) {
            if let Some(b) = stack.pop()
                && let Some(parent) = stack.last_mut()
            {
                parent.push(Node::Block(b));
            }
        } else if is_open {
            stack.push(Vec::new());
        }
    };
    for ch in src.chars() {
        col += 1;
        if skip_line {
            if ch == '\n' {
                skip_line = false;
                line += 1;
                col = 0;
            }
            continue;
        }
        match ch {
            '\n' | '\r' | '\t' | ' ' => {
                flush(&mut stack, &mut cur, cur_pos);
                if ch == '\n' {
                    line += 1;
                    col = 0;
                }
            }
            _ => {
                if cur.is_empty() {
                    if ch == '#' {
                        skip_line = true;
                        continue;
                    }
                    cur_pos = (line, col);
                }
                cur.push(ch);
            }
        }
    }
    if !cur.is_empty() {
        if cur.ends_with(';') {
            cur.pop();
        }
        if !cur.is_empty()
            && let Some(top) = stack.last_mut()
        {
            top.push(Node::Tok(Tok {
                text: cur,
                line: cur_pos.0,
                col: cur_pos.1,
            }));
        }
    }
    while stack.len() > 1 && stack.last().is_some_and(|b| !b.is_empty()) {
        if let Some(b) = stack.pop()
            && let Some(parent) = stack.last_mut()
        {
            parent.push(Node::Block(b));
        }
    }
    stack.into_iter().next().unwrap_or_default()
}

struct Macro {
    params: Vec<(String, usize)>,
    rules: Vec<Node>,
}

struct Ctx<'a> {
    macros: &'a HashMap<String, Macro>,
    tags: &'a [(String, TagDef)],
}

type Arg = (String, (usize, usize));

fn render_matches(
    mtree: &[Node],
    rules: &mut Vec<OJson>,
    ctx: &Ctx<'_>,
    params: &HashMap<String, String>,
) -> Result<(), CompileError> {
    let mut not = false;
    let mut or = false;
    let mut k = 0;
    while k < mtree.len() {
        let m = mtree[k].text().map(str::to_lowercase).unwrap_or_default();
        if m.is_empty() || m == "and" {
            k += 1;
            continue;
        }
        if m == "not" {
            not = true;
            k += 1;
            continue;
        }
        if m == "or" {
            or = true;
            k += 1;
            continue;
        }
        let Some((argc, api)) = match_info(&m) else {
            return err(mtree[k].pos(), format!("Unrecognized match type \"{m}\"."));
        };
        let mut args: Vec<Arg> = Vec::with_capacity(argc);
        for _ in 0..argc {
            k += 1;
            let Some(node) = mtree.get(k) else {
                return err(
                    mtree[k - 1].pos(),
                    format!("Missing argument(s) to match \"{m}\": it takes {argc}."),
                );
            };
            let arg = match node.text() {
                Some(a) if !a.is_empty() && !RESERVED.contains(&a) => a,
                _ => {
                    return err(
                        mtree[k - 1].pos(),
                        "Missing argument(s) to match (invalid argument or argument is reserved word).",
                    );
                }
            };
            if arg.starts_with('$') {
                match params.get(arg) {
                    Some(v) => args.push((v.clone(), node.pos())),
                    None => return err(node.pos(), format!("Undefined variable name \"{arg}\".")),
                }
            } else {
                args.push((arg.to_owned(), node.pos()));
            }
        }
        let base = |t: &str| {
            vec![
                ("type".to_owned(), OJson::Str(t.to_owned())),
                ("not".to_owned(), OJson::Bool(not)),
                ("or".to_owned(), OJson::Bool(or)),
            ]
        };
        let (a0, p0) = (&args[0].0, args[0].1);
        let mut obj = base(api);
        let push = |obj: &mut Vec<(String, OJson)>, k: &str, v: OJson| obj.push((k.to_owned(), v));
        match m.as_str() {
            "ztsrc" | "ztdest" => {
                let zt: String = a0
                    .to_lowercase()
                    .chars()
                    .filter(char::is_ascii_hexdigit)
                    .collect();
                if zt.len() != 10 {
                    return err(p0, "Invalid ZeroTier address (expected 10 hex digits).");
                }
                push(&mut obj, "zt", OJson::Str(zt));
            }
            "vlan" | "vlanpcp" | "vlandei" | "ethertype" | "ipprotocol" => {
                let named = match m.as_str() {
                    "ethertype" => lookup(ETHERTYPES, a0),
                    "ipprotocol" => lookup(IP_PROTOCOLS, a0),
                    _ => None,
                };
                let num = named.unwrap_or_else(|| parse_num(a0));
                if !(0..=0xffff_ffff).contains(&num) {
                    return err(p0, "Invalid numeric value.");
                }
                let key = match m.as_str() {
                    "vlan" => "vlanId",
                    "vlanpcp" => "vlanPcp",
                    "vlandei" => "vlanDei",
                    "ethertype" => "etherType",
                    _ => "ipProtocol",
                };
                push(&mut obj, key, OJson::Int(num));
            }
            "random" => {
                let mut p = js_parse_float(a0).filter(|f| !f.is_nan()).unwrap_or(0.0);
                if p == 0.0 {
                    p = 0.0;
                }
                let p = p.clamp(0.0, 1.0);
                push(
                    &mut obj,
                    "probability",
                    OJson::Int((4_294_967_295.0 * p).floor() as i64),
                );
            }
            "macsrc" | "macdest" => {
                let mut mac = String::new();
                let mut count = 0;
                for c in a0.to_lowercase().chars() {
                    if mac.len() >= 17 {
                        break;
                    }
                    if c.is_ascii_hexdigit() {
                        mac.push(c);
                        count += 1;
                        if mac.len() != 17 && count >= 2 {
                            mac.push(':');
                            count = 0;
                        }
                    }
                }
                if mac.len() != 17 {
                    return err(p0, "Invalid MAC address (expected 6 hex bytes).");
                }
                push(&mut obj, "mac", OJson::Str(mac));
            }
            "ipsrc" | "ipdest" => {
                let slash = a0.find('/').unwrap_or(0);
                if slash == 0 {
                    return err(p0, "Missing /bits netmask length designation in IP.");
                }
                let ip_only = &a0[..slash];
                let src = m == "ipsrc";
                let ty = if ipv6_regex().is_some_and(|r| r.is_match(ip_only)) {
                    if src {
                        "MATCH_IPV6_SOURCE"
                    } else {
                        "MATCH_IPV6_DEST"
                    }
                } else if ipv4_regex().is_some_and(|r| r.is_match(ip_only)) {
                    if src {
                        "MATCH_IPV4_SOURCE"
                    } else {
                        "MATCH_IPV4_DEST"
                    }
                } else {
                    return err(p0, "Invalid IP address (not valid IPv4 or IPv6).");
                };
                obj = base(ty);
                push(&mut obj, "ip", OJson::Str(a0.clone()));
            }
            "icmp" => {
                let t = parse_num(a0);
                if !(0..=0xff).contains(&t) {
                    return err(p0, "Missing or invalid ICMP type.");
                }
                let code = parse_num(&args[1].0);
                if code > 0xff {
                    return err(args[1].1, "Invalid ICMP code (use -1 for none).");
                }
                push(&mut obj, "icmpType", OJson::Int(t));
                push(
                    &mut obj,
                    "icmpCode",
                    if code < 0 {
                        OJson::Null
                    } else {
                        OJson::Int(code)
                    },
                );
            }
            "sport" | "dport" | "framesize" | "iptos" => {
                let (arg, pos, max) = if m == "iptos" {
                    (&args[1].0, args[1].1, 0xff)
                } else {
                    (a0, p0, 0xffff)
                };
                let what = if m == "iptos" { "value" } else { "numeric" };
                if m == "iptos" {
                    let mask = parse_num(a0);
                    if !(0..=0xff).contains(&mask) {
                        return err(p0, "Invalid mask.");
                    }
                    push(&mut obj, "mask", OJson::Int(mask));
                }
                let (lo, hi) = if arg.find('-').is_some_and(|i| i > 0) {
                    let parts: Vec<&str> = arg.split('-').collect();
                    if parts.len() != 2 {
                        return err(pos, format!("Invalid {what} range."));
                    }
                    (parse_num(parts[0]), parse_num(parts[1]))
                } else {
                    let n = parse_num(arg);
                    (n, n)
                };
                if lo < 0 || lo > max || hi < 0 || hi > max || hi < lo {
                    return err(pos, format!("Invalid {what} range."));
                }
                push(&mut obj, "start", OJson::Int(lo));
                push(&mut obj, "end", OJson::Int(hi));
            }
            "chr" => {
                // JavaScript 32-bit bitwise arithmetic, reproduced on purpose.
                let mut hi: i32 = 0;
                let mut lo: i32 = 0;
                for part in a0.split(',').filter(|s| !s.is_empty()) {
                    let bit = lookup(CHARACTERISTIC_BITS, part).unwrap_or_else(|| parse_num(part));
                    if !(0..=63).contains(&bit) {
                        return err(p0, "Invalid bit index (range 0-63) or unrecognized name.");
                    }
                    let shifted = |b: i64| -> i32 {
                        let v = (1i32 << (b & 31)).unsigned_abs();
                        v as i32
                    };
                    if bit >= 32 {
                        hi |= shifted(bit - 32);
                    } else {
                        lo |= shifted(bit);
                    }
                }
                let mask = format!(
                    "{:08x}{:08x}",
                    i64::from(hi).unsigned_abs(),
                    i64::from(lo).unsigned_abs()
                );
                push(&mut obj, "mask", OJson::Str(mask));
            }
            _ => {
                // tag matches
                let (id, value) = match ctx.tags.iter().find(|(n, _)| n == a0) {
                    Some((_, t)) => {
                        let v = &args[1].0;
                        let value = t
                            .flags
                            .iter()
                            .find(|(n, _)| n == v)
                            .or_else(|| t.enums.iter().find(|(n, _)| n == v))
                            .map(|(_, x)| *x)
                            .unwrap_or_else(|| parse_num(v));
                        (t.id, value)
                    }
                    None => (parse_num(a0), parse_num(&args[1].0)),
                };
                if !(0..=0xffff_ffff).contains(&id) {
                    return err(p0, "Undefined tag name and invalid tag value.");
                }
                if !(0..=0xffff_ffff).contains(&value) {
                    return err(
                        args[1].1,
                        "Invalid tag value or unrecognized flag/enum name.",
                    );
                }
                push(&mut obj, "id", OJson::Int(id));
                push(&mut obj, "value", OJson::Int(value));
            }
        }
        rules.push(OJson::Obj(obj));
        not = false;
        or = false;
        k += 1;
    }
    Ok(())
}

fn render_actions(
    rtree: &[Node],
    rules: &mut Vec<OJson>,
    ctx: &Ctx<'_>,
    params: &HashMap<String, String>,
    depth: usize,
) -> Result<(), CompileError> {
    if depth > 64 {
        return err(
            rtree.first().map_or((0, 0), Node::pos),
            "Macros include each other too deeply (recursive include?).",
        );
    }
    let mut k = 0;
    while k < rtree.len() {
        let action = rtree[k].text().map(str::to_lowercase).unwrap_or_default();
        let here = rtree[k].pos();
        let next_block = match rtree.get(k + 1) {
            Some(Node::Block(b)) => Some(b.as_slice()),
            _ => None,
        };
        match action.as_str() {
            "" => {}
            "include" => {
                let Some(name_node) = rtree.get(k + 1) else {
                    return err(here, "Include directive is missing a macro name.");
                };
                k += 1;
                let mut name = name_node.text().unwrap_or("").to_owned();
                let mut args = Vec::new();
                if let Some(paren) = name.find('(').filter(|i| *i > 0) {
                    args = name[paren + 1..]
                        .split([',', ')'])
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                    name.truncate(paren);
                }
                let Some(mac) = ctx.macros.get(&name) else {
                    return err(name_node.pos(), format!("Macro name \"{name}\" not found."));
                };
                let mut mp = HashMap::new();
                for (p, idx) in &mac.params {
                    match args.get(*idx) {
                        Some(a) => {
                            mp.insert(p.clone(), a.clone());
                        }
                        None => {
                            return err(
                                name_node.pos(),
                                "Missing one or more required macro parameter.",
                            );
                        }
                    }
                }
                render_actions(&mac.rules, rules, ctx, &mp, depth + 1)?;
            }
            "drop" | "accept" | "break" => {
                if let Some(b) = next_block {
                    k += 1;
                    render_matches(b, rules, ctx, params)?;
                }
                let t = match action.as_str() {
                    "drop" => "ACTION_DROP",
                    "accept" => "ACTION_ACCEPT",
                    _ => "ACTION_BREAK",
                };
                rules.push(OJson::obj(vec![("type", OJson::Str(t.into()))]));
            }
            "tee" | "watch" => {
                let Some(b) = next_block.filter(|b| b.len() >= 2) else {
                    return err(
                        here,
                        "The tee and watch actions require two parameters (max length or 0 for all, target).",
                    );
                };
                k += 1;
                let max_len = b[0].text().map_or(-1, parse_num);
                if !(-1..=0xffff).contains(&max_len) {
                    return err(
                        b[0].pos(),
                        "Tee/watch max packet length to forward invalid or out of range.",
                    );
                }
                let target = match b[1].text() {
                    Some(t) if t.chars().count() == 10 => t.to_owned(),
                    _ => {
                        return err(
                            b[1].pos(),
                            "Missing or invalid ZeroTier address target for tee/watch.",
                        );
                    }
                };
                render_matches(&b[2..], rules, ctx, params)?;
                rules.push(OJson::obj(vec![
                    (
                        "type",
                        OJson::Str(
                            if action == "tee" {
                                "ACTION_TEE"
                            } else {
                                "ACTION_WATCH"
                            }
                            .into(),
                        ),
                    ),
                    ("address", OJson::Str(target)),
                    ("length", OJson::Int(max_len)),
                ]));
            }
            "redirect" => {
                let Some(b) = next_block.filter(|b| !b.is_empty()) else {
                    return err(here, "The redirect action requires a target parameter.");
                };
                k += 1;
                let target = match b[0].text() {
                    Some(t) if t.chars().count() == 10 => t.to_owned(),
                    _ => {
                        return err(
                            b[0].pos(),
                            "Missing or invalid ZeroTier address target for redirect.",
                        );
                    }
                };
                render_matches(&b[1..], rules, ctx, params)?;
                rules.push(OJson::obj(vec![
                    ("type", OJson::Str("ACTION_REDIRECT".into())),
                    ("address", OJson::Str(target)),
                ]));
            }
            other => {
                return err(
                    here,
                    format!(
                        "Unrecognized action or directive \"{other}\" in rule set (expected drop, accept, break, tee, watch, redirect or include)."
                    ),
                );
            }
        }
        k += 1;
    }
    Ok(())
}

fn block_after(parsed: &[Node], i: usize) -> Option<&[Node]> {
    match parsed.get(i + 1) {
        Some(Node::Block(b)) if !b.is_empty() => Some(b),
        _ => None,
    }
}

fn parse_tag(tag: &[Node], tags: &[(String, TagDef)]) -> Result<(String, TagDef), CompileError> {
    let Some(name) = tag[0].text().map(str::to_lowercase) else {
        return err(tag[0].pos(), "Tag definition is missing name.");
    };
    if !is_valid_name(&name) {
        return err(tag[0].pos(), "Invalid tag name.");
    }
    if RESERVED.contains(&name.as_str()) {
        return err(tag[0].pos(), "Tag name is a reserved word.");
    }
    if tags.iter().any(|(n, _)| *n == name) {
        return err(tag[0].pos(), "Multiple definition of tag name.");
    }
    let mut flags: Vec<(String, i64)> = Vec::new();
    let mut enums: Vec<(String, i64)> = Vec::new();
    let mut id = -1i64;
    let mut dfl: Option<String> = None;
    let text = |k: usize| tag.get(k).and_then(Node::text);
    let mut k = 1;
    while k < tag.len() {
        let Some(kw) = text(k).map(str::to_lowercase) else {
            return err(tag[k].pos(), "Unexpected block in tag definition.");
        };
        match kw.as_str() {
            "id" => {
                if id >= 0 {
                    return err(tag[k].pos(), "Duplicate tag id definition.");
                }
                if k + 1 >= tag.len() {
                    return err(tag[k].pos(), "Missing numeric value for ID.");
                }
                k += 1;
                id = text(k).map_or(-1, parse_num);
                if !(0..=0xffff_ffff).contains(&id) {
                    return err(tag[k].pos(), "Invalid or out of range tag ID.");
                }
            }
            "default" => {
                if dfl.is_some() {
                    return err(tag[k].pos(), "Duplicate tag default directive.");
                }
                if k + 1 >= tag.len() {
                    return err(tag[k].pos(), "Missing value for default.");
                }
                k += 1;
                dfl = Some(text(k).unwrap_or("").to_owned());
            }
            "flag" => {
                if k + 2 >= tag.len() {
                    return err(tag[k].pos(), "Missing tag flag name or bit index.");
                }
                k += 1;
                let mut mask: i32 = 0;
                for b in text(k).unwrap_or("").split(',').filter(|s| !s.is_empty()) {
                    let b = b.to_lowercase();
                    if let Some((_, v)) = flags.iter().find(|(n, _)| *n == b) {
                        mask |= *v as i32;
                    } else {
                        let bit = parse_num(&b);
                        if !(0..=31).contains(&bit) {
                            return err(
                                tag[k].pos(),
                                "Bit index invalid, out of range, or references an undefined flag name.",
                            );
                        }
                        mask |= 1i32 << bit;
                    }
                }
                k += 1;
                let fname = text(k).unwrap_or("").to_lowercase();
                if !is_valid_name(&fname) {
                    return err(tag[k].pos(), "Invalid or reserved flag name.");
                }
                if flags.iter().any(|(n, _)| *n == fname) {
                    return err(tag[k].pos(), "Duplicate flag name in tag definition.");
                }
                flags.push((fname, i64::from(mask)));
            }
            "enum" => {
                if k + 2 >= tag.len() {
                    return err(tag[k].pos(), "Missing tag enum name or value.");
                }
                k += 1;
                let value = text(k).map_or(-1, parse_num);
                if !(0..=0xffff_ffff).contains(&value) {
                    return err(tag[k].pos(), "Tag enum value invalid or out of range.");
                }
                k += 1;
                let ename = text(k).unwrap_or("").to_lowercase();
                if !is_valid_name(&ename) {
                    return err(tag[k].pos(), "Invalid or reserved tag enum name.");
                }
                if enums.iter().any(|(n, _)| *n == ename) {
                    return err(tag[k].pos(), "Duplicate enum name in tag definition.");
                }
                enums.push((ename, value));
            }
            other => {
                return err(
                    tag[k].pos(),
                    format!(
                        "Unrecognized keyword \"{other}\" in tag definition (expected id, default, flag or enum)."
                    ),
                );
            }
        }
        k += 1;
    }
    if id < 0 {
        return err(tag[0].pos(), "Tag definition is missing a numeric ID.");
    }
    let default = dfl.map(|d| {
        enums
            .iter()
            .chain(flags.iter())
            .find(|(n, _)| *n == d)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| {
                // Math.abs(parseInt(d) || 0) & 0xffffffff, with JavaScript int32 results.
                let v = js_parse_int(&d, 0).unwrap_or(0).unsigned_abs();
                i64::from(v as u32 as i32)
            })
    });
    Ok((
        name,
        TagDef {
            id,
            default,
            enums,
            flags,
        },
    ))
}

/// Compiles rule-language source.
pub fn compile(src: &str) -> Result<Compiled, CompileError> {
    let parsed = tokenize(src);
    let mut base: Vec<Node> = Vec::new();
    let mut macros: HashMap<String, Macro> = HashMap::new();
    let mut tags: Vec<(String, TagDef)> = Vec::new();
    let mut caps: Vec<(String, bool, i64, Vec<Node>)> = Vec::new();
    let mut i = 0;
    while i < parsed.len() {
        let kw = parsed[i].text().map(str::to_lowercase);
        match kw.as_deref() {
            Some("macro") => {
                let Some(m) = block_after(&parsed, i) else {
                    return err(parsed[i].pos(), "Macro definition is missing name.");
                };
                i += 1;
                let Some(mut name) = m[0].text().map(str::to_lowercase) else {
                    return err(m[0].pos(), "Macro definition is missing name.");
                };
                let mut params = Vec::new();
                if let Some(paren) = name.find('(').filter(|i| *i > 0) {
                    for (k, p) in name[paren + 1..].split([',', ')']).enumerate() {
                        if !p.is_empty() {
                            params.push((p.to_owned(), k));
                        }
                    }
                    name.truncate(paren);
                }
                if !is_valid_name(&name) {
                    return err(m[0].pos(), "Invalid macro name.");
                }
                if RESERVED.contains(&name.as_str()) {
                    return err(m[0].pos(), "Macro name is a reserved word.");
                }
                if macros.contains_key(&name) {
                    return err(m[0].pos(), "Multiple definition of macro name.");
                }
                macros.insert(
                    name,
                    Macro {
                        params,
                        rules: m[1..].to_vec(),
                    },
                );
            }
            Some("tag") => {
                let Some(t) = block_after(&parsed, i) else {
                    return err(parsed[i].pos(), "Tag definition is missing name.");
                };
                i += 1;
                let def = parse_tag(t, &tags)?;
                tags.push(def);
            }
            Some("cap") => {
                let Some(c) = block_after(&parsed, i) else {
                    return err(parsed[i].pos(), "Capability definition is missing name.");
                };
                i += 1;
                let Some(name) = c[0].text().map(str::to_lowercase) else {
                    return err(c[0].pos(), "Capability definition is missing name.");
                };
                if !is_valid_name(&name) {
                    return err(c[0].pos(), "Invalid capability name.");
                }
                if RESERVED.contains(&name.as_str()) {
                    return err(c[0].pos(), "Capability name is a reserved word.");
                }
                if caps.iter().any(|(n, ..)| *n == name) {
                    return err(c[0].pos(), "Multiple definition of capability name.");
                }
                let mut id = -1i64;
                let mut dfl = false;
                let mut body = Vec::new();
                let mut k = 1;
                while k < c.len() {
                    match c[k].text().map(str::to_lowercase).as_deref() {
                        Some("id") => {
                            if id >= 0 {
                                return err(
                                    c[k].pos(),
                                    "Duplicate id directive in capability definition.",
                                );
                            }
                            if k + 1 >= c.len() {
                                return err(c[k].pos(), "Missing value for ID.");
                            }
                            k += 1;
                            id = c[k].text().map_or(-1, parse_num);
                            if !(0..=0xffff_ffff).contains(&id) {
                                return err(
                                    c[k - 1].pos(),
                                    "Invalid or out of range capability ID.",
                                );
                            }
                            if caps.iter().any(|(_, _, cid, _)| *cid == id) {
                                return err(c[k - 1].pos(), "Duplicate capability ID.");
                            }
                        }
                        Some("default") => dfl = true,
                        _ => body.push(c[k].clone()),
                    }
                    k += 1;
                }
                if id < 0 {
                    return err(c[0].pos(), "Capability definition is missing a numeric ID.");
                }
                caps.push((name, dfl, id, body));
            }
            _ => base.push(parsed[i].clone()),
        }
        i += 1;
    }
    let ctx = Ctx {
        macros: &macros,
        tags: &tags,
    };
    let mut capabilities = Vec::new();
    for (name, dfl, id, body) in &caps {
        let mut r = Vec::new();
        render_actions(body, &mut r, &ctx, &HashMap::new(), 0)?;
        capabilities.push((
            name.clone(),
            CapDef {
                id: *id,
                default: *dfl,
                rules: r,
            },
        ));
    }
    let mut rules = Vec::new();
    render_actions(&base, &mut rules, &ctx, &HashMap::new(), 0)?;
    Ok(Compiled {
        rules,
        capabilities,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_number_parsing() {
        assert_eq!(parse_num("0x10"), 16);
        assert_eq!(parse_num("22abc"), 22);
        assert_eq!(parse_num("-1"), -1);
        assert_eq!(parse_num("x"), -1);
        assert_eq!(parse_num(""), -1);
        assert_eq!(js_parse_float("0.5"), Some(0.5));
        assert_eq!(js_parse_float(".5x"), Some(0.5));
        assert_eq!(js_parse_float("abc"), None);
    }

    #[test]
    fn chr_reproduces_int32_artefacts() {
        let c = compile("accept chr inbound,multicast;").unwrap();
        assert_eq!(c.rules[0].to_value()["mask"], "4000000000000000");
        let c = compile("accept chr inbound;").unwrap();
        assert_eq!(c.rules[0].to_value()["mask"], "8000000000000000");
        let c = compile("accept chr tcp_syn,tcp_ack;").unwrap();
        assert_eq!(c.rules[0].to_value()["mask"], "0000000000000012");
    }
}
