//! Lenient JSON value coercions matching the reference controller's helpers.

use serde_json::Value;

/// `strtoull(s, 16)` semantics: leading spaces, optional `0x`, hex digits up to the first
/// other character; 0 when there are none; saturates on overflow.
pub fn parse_hex_u64(s: &str) -> u64 {
    let t = s.trim_start();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let mut v: u64 = 0;
    for c in t.chars() {
        match c.to_digit(16) {
            Some(d) => {
                v = v
                    .checked_mul(16)
                    .and_then(|x| x.checked_add(u64::from(d)))
                    .unwrap_or(u64::MAX)
            }
            None => break,
        }
    }
    v
}

/// `strtoull(s, 10)` semantics (leading spaces, digits up to the first other character).
pub fn parse_dec_u64(s: &str) -> u64 {
    let mut v: u64 = 0;
    for c in s.trim_start().chars() {
        match c.to_digit(10) {
            Some(d) => {
                v = v
                    .checked_mul(10)
                    .and_then(|x| x.checked_add(u64::from(d)))
                    .unwrap_or(u64::MAX)
            }
            None => break,
        }
    }
    v
}

/// An integer from a JSON number, decimal string or boolean; `default` otherwise.
pub fn json_int(v: Option<&Value>, default: u64) -> u64 {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .or_else(|| n.as_f64().map(|f| f as u64))
            .unwrap_or(default),
        Some(Value::String(s)) => parse_dec_u64(s),
        Some(Value::Bool(b)) => u64::from(*b),
        _ => default,
    }
}

/// A boolean from a JSON bool, number (> 0) or string starting with `t`, `T` or `1`.
pub fn json_bool(v: Option<&Value>, default: bool) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f > 0.0),
        Some(Value::String(s)) => matches!(s.bytes().next(), Some(b't' | b'T' | b'1')),
        _ => default,
    }
}
