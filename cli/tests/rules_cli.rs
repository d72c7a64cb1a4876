//! `flatwire rules compile`: output and exit codes.

use std::process::Command;

fn flatwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flatwire"))
}

fn write(src: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), src).unwrap();
    f
}

#[test]
fn compile_prints_cli_js_json() {
    let f = write("drop\n\tnot ethertype ipv4\n\tand not ethertype arp\n;\naccept;\n");
    let out = flatwire()
        .args(["rules", "compile"])
        .arg(f.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("{\n \"config\": {\n  \"rules\": [\n"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["config"]["rules"][0]["etherType"], 2048);
    assert_eq!(v["config"]["rules"][2]["type"], "ACTION_DROP");
    assert_eq!(v["config"]["rules"][3]["type"], "ACTION_ACCEPT");
    assert_eq!(v["tagsByName"], serde_json::json!({}));
}

#[test]
fn check_prints_nothing_and_succeeds() {
    let f = write("accept;\n");
    let out = flatwire()
        .args(["rules", "compile", "--check"])
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn errors_carry_line_and_column_and_fail() {
    let f = write("accept ethertype arp;\ndrop\n  ethertype ipv4\n  bogus 1\n;\n");
    let out = flatwire()
        .args(["rules", "compile"])
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        "line 4 column 3: Unrecognized match type \"bogus\"."
    );

    let f = write("drop;\naccept;\n");
    let out = flatwire()
        .args(["rules", "compile", "--check"])
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        "line 2 column 1: Unrecognized match type \"accept\"."
    );
}

#[test]
fn missing_file_is_an_error() {
    let out = flatwire()
        .args(["rules", "compile", "/nonexistent/rules.ztrules"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Sources compiled by both compilers: every example of the spec's vectors plus a source
/// that uses macros, tag operators and every action.
fn interop_sources() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/spec/vectors/vl2.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut sources: Vec<(String, String)> = v["rule_compiler"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, case)| (name.clone(), case["source"].as_str().unwrap().to_owned()))
        .collect();
    sources.push((
        "macros-tags-actions".into(),
        "tag department\n  id 1000\n  enum 100 engineering\n  enum 200 sales\n  default \
         engineering\n;\ncap ssh\n  id 7\n  accept ipprotocol tcp and dport 22;\n;\nmacro \
         allow($p)\n  accept ipprotocol tcp and dport $p;\n;\ndrop tdiff department 0 or tor \
         department 0x10 not chr inbound;\ninclude allow(80)\ninclude allow(443)\nbreak sport \
         1000-2000;\ntee 128 deadbeef00 ethertype ipv6;\nredirect 1122334455 ipdest \
         10.0.0.1/32;\naccept;\n"
            .into(),
    ));
    sources
}

/// With `FLATWIRE_ZT_RULE_COMPILER_JS` pointing at ZeroTier One's `rule-compiler/cli.js`
/// (and `node` installed), both compilers must print the same bytes for every source and
/// agree on which sources are errors (and where).
#[test]
fn output_is_byte_identical_to_zerotier_cli_js() {
    let Some(cli_js) = std::env::var_os("FLATWIRE_ZT_RULE_COMPILER_JS") else {
        println!(
            "SKIPPED: set FLATWIRE_ZT_RULE_COMPILER_JS to ZeroTier One's rule-compiler/cli.js \
             to compare against the reference compiler"
        );
        return;
    };
    for (name, src) in interop_sources() {
        let f = write(&src);
        let js = Command::new("node")
            .arg(&cli_js)
            .arg(f.path())
            .output()
            .expect("node (Node.js) runs cli.js");
        let ours = flatwire()
            .args(["rules", "compile"])
            .arg(f.path())
            .output()
            .unwrap();
        assert_eq!(
            js.status.success(),
            ours.status.success(),
            "{name}: exit status differs"
        );
        if js.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&js.stdout),
                "{name}: output differs from cli.js"
            );
        } else {
            // cli.js: "ERROR parsing FILE line L column C: msg"; ours: "line L column C: msg".
            let js_err = String::from_utf8_lossy(&js.stderr);
            let ours_err = String::from_utf8_lossy(&ours.stderr);
            let at = |s: &str| {
                let i = s.find("line ").expect("a line number");
                s[i..].split(':').next().unwrap().to_owned()
            };
            assert_eq!(at(&ours_err), at(&js_err), "{name}: error position differs");
        }
    }
}
