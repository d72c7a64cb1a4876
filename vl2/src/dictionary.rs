//! ZeroTier's Dictionary text format: `key=value` lines with escaped values.

/// Capacity of a config request metadata dictionary.
pub const METADATA_CAPACITY: usize = 1024;

/// An ordered dictionary; lookups return the first entry with a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dictionary {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Escapes one value byte by byte.
pub fn escape(value: &[u8], out: &mut Vec<u8>) {
    for &b in value {
        match b {
            0 => out.extend_from_slice(b"\\0"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'=' => out.extend_from_slice(b"\\e"),
            _ => out.push(b),
        }
    }
}

/// Parses integers like `strtoull(s, 16)` (what the reference's readers do).
fn hex_value(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    if s.trim().is_empty() {
        return None;
    }
    Some(crate::jsonutil::parse_hex_u64(s))
}

impl Dictionary {
    /// An empty dictionary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses bytes; input past `capacity - 1` bytes is cut off, like the reference's
    /// fixed buffers. Never fails: malformed lines are skipped.
    pub fn parse_with_capacity(data: &[u8], capacity: usize) -> Self {
        let data = &data[..data.len().min(capacity.saturating_sub(1))];
        Self::parse(data)
    }

    /// Parses bytes. A NUL ends the dictionary; LF or CR ends an entry.
    pub fn parse(data: &[u8]) -> Self {
        let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
        let data = &data[..end];
        let mut entries = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let line_end = data[i..]
                .iter()
                .position(|b| *b == b'\n' || *b == b'\r')
                .map_or(data.len(), |p| i + p);
            let line = &data[i..line_end];
            if let Some(eq) = line.iter().position(|b| *b == b'=') {
                let key = line[..eq].to_vec();
                let mut value = Vec::with_capacity(line.len() - eq);
                let mut it = line[eq + 1..].iter();
                while let Some(&b) = it.next() {
                    if b == b'\\' {
                        match it.next() {
                            Some(b'r') => value.push(b'\r'),
                            Some(b'n') => value.push(b'\n'),
                            Some(b'0') => value.push(0),
                            Some(b'e') => value.push(b'='),
                            Some(&o) => value.push(o),
                            None => {}
                        }
                    } else {
                        value.push(b);
                    }
                }
                if !key.is_empty() {
                    entries.push((key, value));
                }
            }
            i = line_end + 1;
        }
        Self { entries }
    }

    /// The serialized form (no trailing LF, no NUL).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            out.extend_from_slice(k);
            out.push(b'=');
            escape(v, &mut out);
        }
        out
    }

    /// Adds raw value bytes. Keys containing NUL, CR, LF or `=` are refused (returns false).
    pub fn add(&mut self, key: &str, value: &[u8]) -> bool {
        if key.is_empty() || key.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n' | b'=')) {
            return false;
        }
        self.entries.push((key.as_bytes().to_vec(), value.to_vec()));
        true
    }

    /// Adds an unsigned integer as 16 lowercase hex digits.
    pub fn add_u64(&mut self, key: &str, v: u64) -> bool {
        self.add(key, format!("{v:016x}").as_bytes())
    }

    /// Adds a boolean as `1` or `0`.
    pub fn add_bool(&mut self, key: &str, v: bool) -> bool {
        self.add(key, if v { b"1" } else { b"0" })
    }

    /// Adds a string.
    pub fn add_str(&mut self, key: &str, v: &str) -> bool {
        self.add(key, v.as_bytes())
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// An unsigned integer (hex), or `default` when missing or empty.
    pub fn get_u64(&self, key: &str, default: u64) -> u64 {
        self.get(key).and_then(hex_value).unwrap_or(default)
    }

    /// A boolean: true iff the value starts with `1`, `t` or `T`.
    pub fn get_bool(&self, key: &str, default: bool) -> bool {
        match self.get(key) {
            Some(v) if !v.is_empty() => matches!(v[0], b'1' | b't' | b'T'),
            _ => default,
        }
    }

    /// A string value (lossy UTF-8).
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().map(|(k, _)| k.as_slice())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
