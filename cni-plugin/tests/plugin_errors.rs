//! The real `flatwire-cni` binary on bad input and without an agent: every failure is a
//! spec-shaped error object on stdout with a non-zero exit and a message that says what to do;
//! DEL stays idempotent; the install step is atomic and idempotent.

use std::path::Path;
use std::time::Duration;

mod common;

use common::{PLUGIN, assert_cni_error, netconf, plugin};

/// An existing network namespace path that needs no setup.
const SELF_NETNS: &str = "/proc/self/ns/net";

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

#[test]
fn bad_input_gets_spec_error_codes() {
    let missing = Path::new("/nonexistent/flatwire/agent.sock");
    let good = netconf("1.0.0", missing, serde_json::json!({}));

    let run = plugin(&add_env(SELF_NETNS), "{not json");
    assert_cni_error(&run, 6);

    let run = plugin(
        &add_env(SELF_NETNS),
        &netconf("0.3.1", missing, serde_json::json!({})),
    );
    let err = assert_cni_error(&run, 1);
    assert!(err["details"].as_str().unwrap().contains("1.1.0"), "{err}");

    let run = plugin(
        &add_env(SELF_NETNS),
        &netconf(
            "1.1.0",
            missing,
            serde_json::json!({"network": "not-an-id"}),
        ),
    );
    assert_cni_error(&run, 7);

    // Missing environment: no container ID.
    let mut env = add_env(SELF_NETNS);
    env.retain(|(k, _)| *k != "CNI_CONTAINERID");
    let run = plugin(&env, &good);
    let err = assert_cni_error(&run, 4);
    assert!(err["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    // The error speaks the caller's version.
    assert_eq!(err["cniVersion"], "1.0.0");

    let run = plugin(&add_env("/run/netns/flatwire-no-such-ns"), &good);
    let err = assert_cni_error(&run, 3);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("/run/netns/flatwire-no-such-ns"),
        "{err}"
    );
}

#[test]
fn a_missing_agent_socket_names_the_socket_and_the_fix() {
    let missing = Path::new("/nonexistent/flatwire/agent.sock");
    let conf = netconf("1.1.0", missing, serde_json::json!({}));
    let run = plugin(&add_env(SELF_NETNS), &conf);
    let err = assert_cni_error(&run, 11);
    let text = err.to_string();
    assert!(text.contains("/nonexistent/flatwire/agent.sock"), "{text}");
    assert!(text.contains("start flatwire-agent"), "{text}");
    assert!(run.took < Duration::from_secs(5), "took {:?}", run.took);

    let status = plugin(&[("CNI_COMMAND", "STATUS")], &conf);
    let err = assert_cni_error(&status, 50);
    assert!(err.to_string().contains("agent.sock"), "{err}");

    let gc = plugin(&[("CNI_COMMAND", "GC")], &conf);
    assert_cni_error(&gc, 11);

    let mut check_env = add_env(SELF_NETNS);
    check_env[0].1 = "CHECK";
    let prev = netconf(
        "1.1.0",
        missing,
        serde_json::json!({"prevResult": {"cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mac": "32:00:00:00:00:01", "sandbox": SELF_NETNS}],
            "ips": [{"address": "10.77.0.5/24", "interface": 0}]}}),
    );
    assert_cni_error(&plugin(&check_env, &prev), 11);
}

#[test]
fn del_without_an_agent_succeeds_every_time() {
    let conf = netconf(
        "1.1.0",
        Path::new("/nonexistent/flatwire/agent.sock"),
        serde_json::json!({}),
    );
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_IFNAME", "eth0"),
    ];
    for _ in 0..2 {
        let run = plugin(&env, &conf);
        assert!(run.ok, "{run:?}");
        assert!(run.stdout.is_empty(), "DEL prints nothing: {run:?}");
        assert!(run.stderr.contains("no flatwire agent runs"), "{run:?}");
    }
}

#[test]
fn version_and_the_about_text() {
    let run = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    assert!(run.ok, "{run:?}");
    let v = run.json.unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
    );

    let about = plugin(&[], "");
    assert!(about.ok, "{about:?}");
    assert!(about.stdout.is_empty());
    assert!(
        about
            .stderr
            .contains("CNI protocol versions supported: 0.4.0, 1.0.0, 1.1.0"),
        "{about:?}"
    );
    assert!(about.stderr.contains("flatwire-cni install"), "{about:?}");

    let unknown = common::run_cmd(
        {
            let mut c = std::process::Command::new(PLUGIN);
            c.arg("frobnicate").env_remove("CNI_COMMAND");
            c
        },
        b"",
    );
    assert!(!unknown.ok);
    assert!(unknown.stderr.contains("unknown command \"frobnicate\""));
}

#[test]
fn install_is_atomic_idempotent_and_explains_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("opt/cni/bin");
    let conf_dir = dir.path().join("etc/cni/net.d");
    let install = |extra: &[&str]| {
        let mut c = std::process::Command::new(PLUGIN);
        c.arg("install")
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--conf-dir")
            .arg(&conf_dir)
            .args(extra)
            .env_remove("CNI_COMMAND");
        common::run_cmd(c, b"")
    };
    let args = [
        "--network",
        "8056c2e21c000001",
        "--agent-socket",
        "/run/fw/agent.sock",
    ];
    let first = install(&args);
    assert!(first.ok, "{first:?}");
    assert_eq!(first.stdout.matches("installed:").count(), 2, "{first:?}");
    let installed = bin_dir.join("flatwire-cni");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(PLUGIN).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-flatwire.conflist")).unwrap())
            .unwrap();
    assert_eq!(conflist["plugins"][0]["network"], "8056c2e21c000001");
    assert_eq!(conflist["plugins"][0]["agentSocket"], "/run/fw/agent.sock");
    assert_eq!(conflist["plugins"][1]["type"], "portmap");

    // The installed copy is a working plugin.
    let version = common::run_cmd(
        {
            let mut c = std::process::Command::new(&installed);
            c.env("CNI_COMMAND", "VERSION");
            c
        },
        b"{}",
    );
    assert!(version.ok, "{version:?}");

    let again = install(&args);
    assert!(again.ok, "{again:?}");
    assert_eq!(again.stdout.matches("up to date:").count(), 2, "{again:?}");
    // Only the two files: no temporary file is left behind.
    assert_eq!(std::fs::read_dir(&bin_dir).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(&conf_dir).unwrap().count(), 1);

    // Another network rewrites the conflist only.
    let other = install(&["--network", "8056c2e21c000002"]);
    assert!(other.ok, "{other:?}");
    assert!(other.stdout.contains("up to date:"), "{other:?}");
    assert!(other.stdout.contains("installed:"), "{other:?}");

    let bad = install(&["--network", "zz"]);
    assert!(!bad.ok);
    assert!(bad.stderr.contains("--network \"zz\""), "{bad:?}");
    let missing_flag = common::run_cmd(
        {
            let mut c = std::process::Command::new(PLUGIN);
            c.args(["install", "--conf-dir", "/tmp"])
                .env_remove("CNI_COMMAND");
            c
        },
        b"",
    );
    assert!(!missing_flag.ok);
    assert!(
        missing_flag.stderr.contains("--bin-dir"),
        "{missing_flag:?}"
    );
    let unwritable = common::run_cmd(
        {
            let mut c = std::process::Command::new(PLUGIN);
            c.arg("install")
                .arg("--bin-dir")
                .arg(installed.join("not-a-dir"))
                .arg("--conf-dir")
                .arg(&conf_dir)
                .env_remove("CNI_COMMAND");
            c
        },
        b"",
    );
    assert!(!unwritable.ok);
    assert!(
        unwritable.stderr.contains("cannot create the directory"),
        "{unwritable:?}"
    );
}
