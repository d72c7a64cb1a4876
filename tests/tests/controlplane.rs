//! A real etcd + kube-apiserver from the harness: readiness, CRDs and watches.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use flatwire_tests::controlplane::ControlPlane;
use flatwire_tests::process::{Proc, alive};

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.flatwire.io
spec:
  group: smoke.flatwire.io
  scope: Namespaced
  names: { plural: widgets, singular: widget, kind: Widget }
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: { type: integer, minimum: 1 }
"#;

#[test]
fn the_control_plane_serves_crds_and_watches_then_stops() {
    let cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
    assert_eq!(cp.kubectl_run(&["get", "--raw", "/readyz"]).unwrap(), "ok");
    let version = cp.kubectl_run(&["version", "-o", "json"]).unwrap();
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.35.4");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.35.4");

    // A tiny CRD is accepted, becomes established, and validates its objects.
    let crd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(crd.path(), WIDGET_CRD).unwrap();
    let applied = cp
        .kubectl_run(&["apply", "-f", crd.path().to_str().unwrap()])
        .unwrap();
    assert!(
        applied.contains("widgets.smoke.flatwire.io created"),
        "{applied}"
    );
    cp.kubectl_run(&[
        "wait",
        "--for=condition=established",
        "crd/widgets.smoke.flatwire.io",
        "--timeout=60s",
    ])
    .unwrap();
    let good = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        good.path(),
        "apiVersion: smoke.flatwire.io/v1\nkind: Widget\nmetadata: {name: w, namespace: default}\nspec: {size: 3}\n",
    )
    .unwrap();
    cp.kubectl_run(&["apply", "-f", good.path().to_str().unwrap()])
        .unwrap();
    assert_eq!(
        cp.kubectl_run(&["get", "widget", "w", "-o", "jsonpath={.spec.size}"])
            .unwrap(),
        "3"
    );
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        "apiVersion: smoke.flatwire.io/v1\nkind: Widget\nmetadata: {name: b, namespace: default}\nspec: {size: 0}\n",
    )
    .unwrap();
    let err = cp
        .kubectl_run(&["apply", "-f", bad.path().to_str().unwrap()])
        .unwrap_err();
    assert!(err.to_string().contains("spec.size"), "{err}");

    // Watches work: a watch started before a write sees it.
    cp.kubectl_run(&["create", "configmap", "before", "-n", "default"])
        .unwrap();
    let mut watch_cmd = cp.kubectl();
    watch_cmd
        .args([
            "get",
            "configmaps",
            "-n",
            "default",
            "--watch",
            "-o",
            "name",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut watch = Proc::spawn("kubectl watch", &mut watch_cmd).unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = watch.take_stdout().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The initial list shows the watch is established before the write.
    let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first, "configmap/before");
    cp.kubectl_run(&["create", "configmap", "watched", "-n", "default"])
        .unwrap();
    let seen = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line == "configmap/watched" => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(seen, "the watch never reported configmap/watched");
    drop(watch);

    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    drop(cp);
    for pid in pids {
        assert!(!alive(pid), "control-plane process {pid} survived");
    }
    assert!(
        !dir.exists(),
        "control-plane directory {} survived",
        dir.display()
    );
}
