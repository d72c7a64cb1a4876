//! The CRD files in `crds/` are exactly what the Rust types generate.

use std::path::Path;

use flatwire_operator::crd;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut expected: Vec<String> = Vec::new();
    for c in crd::all() {
        let name = crd::name(&c).to_owned();
        let path = dir.join(format!("{name}.yaml"));
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask crds`)", path.display()));
        let generated = crd::to_yaml(&c).unwrap();
        assert!(
            on_disk == generated,
            "{} is stale: run `cargo xtask crds` and commit the result",
            path.display()
        );
        assert_eq!(crd::yaml_of(&name).unwrap(), generated);
        expected.push(format!("{name}.yaml"));
    }
    // No stray CRD files (e.g. one for a type that was renamed).
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    found.sort();
    expected.sort();
    assert_eq!(found, expected);
}

#[test]
fn crds_are_cluster_scoped_with_status_short_names_and_columns() {
    let crds = crd::all();
    let names: Vec<&str> = crds.iter().map(crd::name).collect();
    assert_eq!(
        names,
        ["networks.flatwire.io", "networkmembers.flatwire.io"]
    );
    for (c, short) in crds.iter().zip(["fwnet", "fwmember"]) {
        assert_eq!(c.spec.scope, "Cluster");
        assert_eq!(c.spec.group, "flatwire.io");
        assert_eq!(
            c.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        let v = &c.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
    }
    let columns: Vec<&str> = crds[0].spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["ID", "Members", "Ready", "Mode", "Age"]);
}

#[test]
fn unknown_crd_name_is_an_error() {
    let e = crd::yaml_of("widgets.flatwire.io").unwrap_err();
    assert!(e.to_string().contains("widgets.flatwire.io"), "{e}");
}

#[test]
fn rules_errors_carry_line_and_column() {
    let spec: crd::NetworkSpec =
        serde_json::from_value(serde_json::json!({"rules": "accept;\ndrop bogus;\n"})).unwrap();
    let err = spec.compile_rules().unwrap_err().to_string();
    assert!(err.starts_with("line 2 column "), "{err}");
    let ok: crd::NetworkSpec =
        serde_json::from_value(serde_json::json!({"rules": "drop not ethertype ipv4;\naccept;"}))
            .unwrap();
    ok.compile_rules().unwrap();
    // Defaults match ZeroTier's.
    assert_eq!(ok.mtu, 2800);
    assert_eq!(ok.multicast_limit, 32);
    assert!(ok.private && ok.enable_broadcast);
    assert_eq!(ok.mode, crd::NetworkMode::Secondary);
}
