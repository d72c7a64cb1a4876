//! The pinned helm lints and renders a chart.

use std::path::Path;
use std::process::Command;

use flatwire_tests::netns::run_checked;
use flatwire_tests::tools;

fn helm(home: &Path) -> Command {
    let mut cmd = Command::new(tools::bin("helm").expect("helm (run `cargo xtask tools`)"));
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        cmd.env(var, home.join(sub));
    }
    cmd
}

#[test]
fn helm_lints_and_renders_a_minimal_chart() {
    let home = tempfile::tempdir().unwrap();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/minimal-chart");
    let lint = run_checked(helm(home.path()).args(["lint", chart])).unwrap();
    let lint = String::from_utf8_lossy(&lint.stdout);
    assert!(
        lint.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{lint}"
    );

    let out =
        run_checked(helm(home.path()).args(["template", "smoke", chart, "--set", "greeting=hi"]))
            .unwrap();
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(rendered.contains("kind: ConfigMap"), "{rendered}");
    assert!(rendered.contains("name: smoke-minimal"), "{rendered}");
    assert!(rendered.contains("greeting: \"hi\""), "{rendered}");
}

#[test]
fn helm_lint_fails_on_a_broken_chart() {
    let home = tempfile::tempdir().unwrap();
    let chart = tempfile::tempdir().unwrap();
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: [broken\n",
    )
    .unwrap();
    let err = run_checked(helm(home.path()).arg("lint").arg(chart.path())).unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
}
