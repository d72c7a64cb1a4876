//! Aligned text tables and `key  value` blocks for the human-readable output.

use std::fmt::Write as _;

/// Renders `rows` under `header`, columns padded to their widest cell (the last column is
/// not padded).
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < N {
                let _ = write!(l, "{cell:<w$}  ", w = width[i]);
            } else {
                l.push_str(cell);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Renders `key  value` lines with the keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

/// A JSON array of strings (or other scalars) joined with `sep`; `-` when empty.
pub fn list(v: &serde_json::Value, sep: &str) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(sep)
    }
}

/// Pretty JSON with a final newline (the `-j` output).
pub fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_the_last_is_not_padded() {
        let t = table(
            ["A", "LONGER", "C"],
            &[
                ["xyz".into(), "1".into(), "end".into()],
                ["q".into(), "22".into(), String::new()],
            ],
        );
        assert_eq!(t, "A    LONGER  C\nxyz  1       end\nq    22\n");
    }

    #[test]
    fn fields_align_keys() {
        assert_eq!(
            fields(&[("a", "1".into()), ("long", "2".into())]),
            "a     1\nlong  2\n"
        );
    }

    #[test]
    fn lists_of_scalars() {
        assert_eq!(list(&serde_json::json!(["a", 1]), ", "), "a, 1");
        assert_eq!(list(&serde_json::json!([]), ", "), "-");
        assert_eq!(list(&serde_json::Value::Null, ", "), "-");
    }
}
