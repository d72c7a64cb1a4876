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
