//! The Helm chart `charts/flatwire`, checked with the pinned helm and a real kube-apiserver.
//!
//! - `helm lint` (also `--strict`) passes;
//! - `helm template` matches `tests/fixtures/chart-golden.yaml` (and, said as properties: the
//!   operator pods' `controller` sidecar with its identity keys and token, the agents'
//!   Kubernetes-mode flags, the controller Service selecting the leader's pod). After an
//!   intended chart change, regenerate it with
//!   `UPDATE_GOLDEN=1 cargo test -p flatwire-tests --test chart` and review the diff;
//! - `values.schema.json` rejects bad values with the schema's message;
//! - the CRD templates are the repository's generated `crds/` (plus the keep annotation);
//! - `helm install`, `helm upgrade` and `helm uninstall` against etcd + kube-apiserver: the
//!   objects are accepted, and uninstall leaves only the kept CRDs and the users' Networks.

use std::path::{Path, PathBuf};
use std::process::Command;

use flatwire_tests::controlplane::ControlPlane;
use flatwire_tests::netns::run_checked;
use flatwire_tests::tools;

const RELEASE: &str = "flatwire";
const NAMESPACE: &str = "flatwire-system";
const CRDS: [&str; 2] = ["networkmembers.flatwire.io", "networks.flatwire.io"];
const KEEP: &str = "  annotations:\n    helm.sh/resource-policy: keep\n";
/// The values the golden file is rendered with (defaults plus the optional default Network).
const GOLDEN_ARGS: [&str; 2] = ["--set", "defaultNetwork.enabled=true"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chart() -> PathBuf {
    repo().join("charts/flatwire")
}

/// The pinned helm with its cache, config and data in `home` (never the user's).
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

fn stdout(cmd: &mut Command) -> String {
    let out = run_checked(cmd).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8(out.stdout).unwrap()
}

fn template(home: &Path, extra: &[&str]) -> Result<String, String> {
    let mut cmd = helm(home);
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE])
        .args(extra);
    run_checked(&mut cmd)
        .map(|o| String::from_utf8(o.stdout).unwrap())
        .map_err(|e| e.to_string())
}

#[test]
fn helm_lint_passes_also_strict() {
    let home = tempfile::tempdir().unwrap();
    for extra in [
        &[][..],
        &["--strict"],
        &["--strict", "--set", "defaultNetwork.enabled=true"],
    ] {
        let out = stdout(helm(home.path()).arg("lint").arg(chart()).args(extra));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{extra:?}: {out}"
        );
        assert!(!out.contains("[WARNING]"), "{extra:?}: {out}");
        assert!(!out.contains("[ERROR]"), "{extra:?}: {out}");
    }
}

#[test]
fn helm_template_matches_the_golden_file() {
    let home = tempfile::tempdir().unwrap();
    let rendered = template(home.path(), &GOLDEN_ARGS).unwrap();
    let golden = repo().join("tests/fixtures/chart-golden.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v != "0") {
        std::fs::write(&golden, &rendered).unwrap();
        eprintln!("wrote {}", golden.display());
        return;
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (create it with UPDATE_GOLDEN=1 cargo test -p flatwire-tests --test chart)",
            golden.display()
        )
    });
    if rendered != want {
        let diff: Vec<String> = want
            .lines()
            .zip(rendered.lines())
            .enumerate()
            .filter(|(_, (w, r))| w != r)
            .take(10)
            .map(|(i, (w, r))| format!("line {}:\n  golden:   {w}\n  rendered: {r}", i + 1))
            .collect();
        panic!(
            "`helm template` differs from {} ({} vs {} lines):\n{}\nIf the change is intended, \
             regenerate with UPDATE_GOLDEN=1 cargo test -p flatwire-tests --test chart",
            golden.display(),
            want.lines().count(),
            rendered.lines().count(),
            diff.join("\n")
        );
    }

    // What the golden file pins, said once more as properties.
    let docs: Vec<&str> = rendered.split("\n---\n").collect();
    let doc = |kind: &str| -> &str {
        let line = format!("\nkind: {kind}\n");
        docs.iter()
            .find(|d| d.contains(&line))
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let deploy = doc("Deployment");
    assert!(deploy.contains("replicas: 2"), "{deploy}");
    assert!(deploy.contains("- --leader-elect=true"), "{deploy}");
    assert!(deploy.contains("containerPort: 9090"), "{deploy}");
    assert!(
        deploy.contains("image: \"ghcr.io/flatwire/flatwire-operator:0.1.0\""),
        "{deploy}"
    );
    // The controller/root sidecar: the agent image with --root --controller, the identity
    // keys (and only those) of the identity Secret, the token shared with the operator.
    assert!(deploy.contains("- name: controller\n"), "{deploy}");
    assert!(
        deploy.contains("image: \"ghcr.io/flatwire/flatwire-agent:0.1.0\""),
        "{deploy}"
    );
    for arg in [
        "- --root\n",
        "- --controller\n",
        "- --api-listen=127.0.0.1:9993",
        "- --planet-configmap=flatwire-system/flatwire-planet",
        "- --controller-api=http://127.0.0.1:9993",
        "- --controller-token-file=/run/flatwire-controller/authtoken.secret",
        "exec flatwire-agent \"$@\"",
        "secretName: flatwire-controller-identity",
        "- key: identity.secret",
        "- key: identity.public",
        "name: controller-token",
    ] {
        assert!(deploy.contains(arg), "{arg} missing: {deploy}");
    }
    assert!(!deploy.contains("key: world.secret"), "{deploy}");
    // The UDP port belongs to the sidecar, the only container serving it.
    let sidecar = &deploy[deploy.find("- name: controller\n").unwrap()..];
    assert!(sidecar.contains("name: zerotier"), "{sidecar}");
    assert_eq!(deploy.matches("name: zerotier").count(), 1, "{deploy}");
    let ds = doc("DaemonSet");
    assert!(ds.contains("hostNetwork: true"), "{ds}");
    assert!(ds.contains("privileged: false"), "{ds}");
    let caps: Vec<&str> = ds
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("add:"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .take_while(|l| l.starts_with("- "))
        .collect();
    assert_eq!(caps, ["- NET_ADMIN", "- NET_RAW", "- SYS_ADMIN"], "{ds}");
    assert!(ds.contains("path: /var/lib/flatwire"), "{ds}");
    assert!(ds.contains("path: /run/flatwire"), "{ds}");
    assert!(ds.contains("name: install-cni"), "{ds}");
    assert!(ds.contains("- --kube-node=$(NODE_NAME)"), "{ds}");
    assert!(
        !ds.contains("--dataplane-threads"),
        "the agent's default: {ds}"
    );
    assert!(
        ds.contains("- --planet-configmap=flatwire-system/flatwire-planet"),
        "{ds}"
    );
    assert!(ds.contains("fieldPath: spec.nodeName"), "{ds}");
    assert!(
        ds.contains("mv -f \"$tmp\" /host/cni/bin/flatwire-cni"),
        "{ds}"
    );
    let svc = doc("Service");
    assert!(svc.contains("port: 9993"), "{svc}");
    assert!(svc.contains("protocol: UDP"), "{svc}");
    assert!(svc.contains("flatwire.io/role: leader"), "{svc}");
    let cni = doc("ConfigMap");
    assert!(cni.contains("\"type\": \"flatwire-cni\""), "{cni}");
    assert!(
        cni.contains("\"agentSocket\": \"/run/flatwire/agent.sock\""),
        "{cni}"
    );
    let net = doc("Network");
    assert!(net.contains("helm.sh/hook: post-install"), "{net}");
}

#[test]
fn the_schema_rejects_bad_values() {
    let home = tempfile::tempdir().unwrap();
    for (set, want) in [
        (
            "operator.replicas=-1",
            "at '/operator/replicas': minimum: got -1, want 1",
        ),
        ("operator.replicas=two", "at '/operator/replicas'"),
        (
            "agent.cni.mode=bogus",
            "at '/agent/cni/mode': value must be one of 'primary', 'secondary'",
        ),
        (
            "defaultNetwork.spec.mode=tertiary",
            "at '/defaultNetwork/spec/mode': value must be one of 'primary', 'secondary'",
        ),
        (
            "operatr.replicas=2",
            "additional properties 'operatr' not allowed",
        ),
        (
            "operator.leaderElection.leaseDuration=forever",
            "at '/operator/leaderElection/leaseDuration'",
        ),
        ("agent.port=70000", "at '/agent/port'"),
        ("agent.dataplaneThreads=65", "at '/agent/dataplaneThreads'"),
        (
            "operator.controllerAddress=abc",
            "at '/operator/controllerAddress'",
        ),
        ("agent.stateDir=relative/dir", "at '/agent/stateDir'"),
        ("service.type=ExternalName", "at '/service/type'"),
        (
            "operator.controller.metricsListen=9994",
            "at '/operator/controller/metricsListen'",
        ),
    ] {
        let err = template(home.path(), &["--set", set]).expect_err(set);
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{set}: {err}"
        );
        assert!(err.contains(want), "{set}: want {want:?} in {err}");
    }
    // The schema is offline (no remote $ref) and good values pass.
    let schema = std::fs::read_to_string(chart().join("values.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&schema).unwrap();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    let text = schema.to_string();
    for (i, _) in text.match_indices("\"$ref\":") {
        assert!(
            text[i..].starts_with("\"$ref\":\"#/"),
            "remote $ref: {}",
            &text[i..i + 60]
        );
    }
    let out = template(
        home.path(),
        &[
            "--set",
            "operator.replicas=3,agent.cni.mode=secondary,service.type=LoadBalancer",
            "--set",
            "agent.dataplaneThreads=2",
        ],
    )
    .unwrap();
    assert!(out.contains("- --dataplane-threads=2\n"), "{out}");
}

/// Drops the `---` and `# Source:` lines helm adds to a document.
fn strip_helm_header(doc: &str) -> &str {
    let doc = doc.strip_prefix("---\n").unwrap_or(doc);
    match doc.strip_prefix("# Source: ") {
        Some(rest) => &rest[rest.find('\n').unwrap() + 1..],
        None => doc,
    }
}

#[test]
fn the_crd_templates_are_the_generated_crds() {
    let home = tempfile::tempdir().unwrap();
    let mut shipped: Vec<String> = std::fs::read_dir(chart().join("files/crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    shipped.sort();
    let mut generated: Vec<String> = std::fs::read_dir(repo().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    generated.sort();
    assert_eq!(shipped, generated, "charts/flatwire/files/crds/ vs crds/");
    let fix = "run `cargo xtask crds` (it writes crds/ and the chart copy)";

    for name in CRDS {
        let file = format!("{name}.yaml");
        let want = std::fs::read_to_string(repo().join("crds").join(&file)).unwrap();
        let copy = std::fs::read_to_string(chart().join("files/crds").join(&file)).unwrap();
        assert!(
            copy == want,
            "charts/flatwire/files/crds/{file} drifted: {fix}"
        );

        let short = name.split('.').next().unwrap();
        let show = format!("templates/crd-{short}.yaml");
        // Rendered, the template is the file plus the keep annotation under metadata.
        let kept = template(home.path(), &["--show-only", &show]).unwrap();
        let kept = strip_helm_header(&kept);
        assert_eq!(kept.matches(KEEP).count(), 1, "{kept}");
        assert!(
            kept.contains(&format!("\nmetadata:\n{KEEP}  name: {name}\n")),
            "{kept}"
        );
        assert_eq!(kept.replacen(KEEP, "", 1), want, "{show}: {fix}");
        // Without keep it is the file itself.
        let plain = template(
            home.path(),
            &["--show-only", &show, "--set", "crds.keep=false"],
        )
        .unwrap();
        assert_eq!(strip_helm_header(&plain), want, "{show}");
    }
    // And crds.install=false leaves them out.
    let none = template(home.path(), &["--set", "crds.install=false"]).unwrap();
    assert!(!none.contains("kind: CustomResourceDefinition"));
}

const USER_NETWORK: &str = "apiVersion: flatwire.io/v1alpha1
kind: Network
metadata:
  name: users-own
spec:
  name: users-own
  mode: secondary
  v4AssignMode: [pool]
  ipAssignmentPools:
    - {ipRangeStart: 10.200.0.1, ipRangeEnd: 10.200.0.254}
";

/// `kind/name` of the objects carrying the release's instance label.
fn release_objects(cp: &ControlPlane) -> Vec<String> {
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let mut names = Vec::new();
    for (kinds, ns) in [
        (
            "deployments,daemonsets,serviceaccounts,roles,rolebindings,services,configmaps",
            Some(NAMESPACE),
        ),
        ("clusterroles,clusterrolebindings", None),
    ] {
        let mut args = vec!["get", kinds, "-l", &selector, "-o", "name"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let out = cp.kubectl_run(&args).unwrap();
        names.extend(out.lines().map(str::to_owned));
    }
    names.sort();
    names
}

#[test]
fn helm_install_upgrade_and_uninstall_on_a_real_api_server() {
    let cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = cp.kubeconfig().to_str().unwrap().to_owned();
    let helm_k = |args: &[&str]| -> Result<String, String> {
        let mut cmd = helm(home.path());
        cmd.args(args)
            .args(["--kubeconfig", &kubeconfig, "--namespace", NAMESPACE]);
        run_checked(&mut cmd)
            .map(|o| String::from_utf8(o.stdout).unwrap())
            .map_err(|e| e.to_string())
    };
    let chart = chart();
    let chart = chart.to_str().unwrap();

    let installed = helm_k(&[
        "install",
        RELEASE,
        chart,
        "--create-namespace",
        "--set",
        "defaultNetwork.enabled=true",
        "--timeout",
        "120s",
    ])
    .unwrap();
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    assert!(installed.contains("kubectl get networks"), "{installed}");

    // Every object was accepted by the API server.
    let objects = release_objects(&cp);
    let expected = [
        "clusterrole.rbac.authorization.k8s.io/flatwire-agent",
        "clusterrole.rbac.authorization.k8s.io/flatwire-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/flatwire-agent",
        "clusterrolebinding.rbac.authorization.k8s.io/flatwire-operator",
        "configmap/flatwire-cni",
        "daemonset.apps/flatwire-agent",
        "deployment.apps/flatwire-operator",
        "role.rbac.authorization.k8s.io/flatwire-agent",
        "role.rbac.authorization.k8s.io/flatwire-operator",
        "rolebinding.rbac.authorization.k8s.io/flatwire-agent",
        "rolebinding.rbac.authorization.k8s.io/flatwire-operator",
        "service/flatwire-controller",
        "serviceaccount/flatwire-agent",
        "serviceaccount/flatwire-operator",
    ];
    assert_eq!(objects, expected);
    let get = |args: &[&str]| cp.kubectl_run(args).unwrap();
    assert_eq!(
        get(&[
            "get",
            "deployment",
            "flatwire-operator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "2"
    );
    assert_eq!(
        get(&[
            "get",
            "daemonset",
            "flatwire-agent",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.template.spec.hostNetwork} {.spec.template.spec.containers[0].securityContext.capabilities.add}"
        ]),
        r#"true ["NET_ADMIN","NET_RAW","SYS_ADMIN"]"#
    );
    assert_eq!(
        get(&[
            "get",
            "service",
            "flatwire-controller",
            "-n",
            NAMESPACE,
            "-o",
            r"jsonpath={.spec.ports[0].protocol}/{.spec.ports[0].port} {.spec.selector.flatwire\.io/role}"
        ]),
        "UDP/9993 leader"
    );
    // The operator pods carry the controller sidecar; the agents run in Kubernetes mode.
    assert_eq!(
        get(&[
            "get",
            "deployment",
            "flatwire-operator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.template.spec.initContainers[*].name} {.spec.template.spec.containers[*].name}"
        ]),
        "controller-token operator controller"
    );
    let agent_args = get(&[
        "get",
        "daemonset",
        "flatwire-agent",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    assert!(
        agent_args.contains("--kube-node=$(NODE_NAME)")
            && agent_args.contains("--planet-configmap=flatwire-system/flatwire-planet"),
        "{agent_args}"
    );
    for crd in CRDS {
        cp.kubectl_run(&[
            "wait",
            "--for=condition=established",
            &format!("crd/{crd}"),
            "--timeout=60s",
        ])
        .unwrap();
        assert_eq!(
            get(&[
                "get",
                "crd",
                crd,
                "-o",
                r"jsonpath={.metadata.annotations.helm\.sh/resource-policy}"
            ]),
            "keep"
        );
    }
    // The least-privilege RBAC is what the API server enforces for the ServiceAccounts.
    let can = |sa: &str, args: &[&str]| -> String {
        let who = format!("system:serviceaccount:{NAMESPACE}:{sa}");
        let mut all = vec!["auth", "can-i", "--as", &who];
        all.extend(args);
        // `can-i` exits 1 for "no"; its answer is on stdout either way.
        let out = cp.kubectl().args(&all).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let ns = ["-n", NAMESPACE];
    for (sa, verb, what, in_ns, want) in [
        (
            "flatwire-operator",
            "update",
            "networks.flatwire.io/status",
            false,
            "yes",
        ),
        (
            "flatwire-operator",
            "patch",
            "networkmembers.flatwire.io",
            false,
            "yes",
        ),
        (
            "flatwire-operator",
            "delete",
            "networks.flatwire.io",
            false,
            "no",
        ),
        ("flatwire-operator", "watch", "pods", false, "yes"),
        ("flatwire-operator", "delete", "pods", false, "no"),
        ("flatwire-operator", "create", "events", false, "yes"),
        (
            "flatwire-operator",
            "update",
            "leases.coordination.k8s.io",
            true,
            "yes",
        ),
        ("flatwire-operator", "create", "secrets", true, "yes"),
        ("flatwire-operator", "get", "secrets", false, "no"),
        ("flatwire-agent", "list", "pods", false, "yes"),
        ("flatwire-agent", "get", "nodes", false, "yes"),
        ("flatwire-agent", "patch", "nodes", false, "yes"),
        ("flatwire-agent", "update", "nodes", false, "no"),
        ("flatwire-agent", "patch", "pods", false, "no"),
        (
            "flatwire-agent",
            "watch",
            "configmaps/flatwire-planet",
            true,
            "yes",
        ),
        ("flatwire-operator", "patch", "pods", true, "yes"),
        ("flatwire-operator", "list", "pods", true, "yes"),
        ("flatwire-operator", "watch", "nodes", false, "yes"),
        // Pod and Node annotations keep members' IPs across a controller failover.
        ("flatwire-operator", "patch", "nodes", false, "yes"),
        ("flatwire-operator", "patch", "pods", false, "yes"),
        ("flatwire-operator", "update", "nodes", false, "no"),
        ("flatwire-operator", "delete", "nodes", false, "no"),
        ("flatwire-agent", "get", "secrets", true, "no"),
        (
            "flatwire-agent",
            "get",
            "configmaps/flatwire-planet",
            true,
            "yes",
        ),
        ("flatwire-agent", "get", "configmaps/other", true, "no"),
        ("flatwire-agent", "get", "networks.flatwire.io", false, "no"),
    ] {
        let mut args = vec![verb, what];
        if in_ns {
            args.extend(ns);
        } else {
            args.extend(["-n", "default"]);
        }
        assert_eq!(can(sa, &args), want, "{sa} {verb} {what}");
    }

    // The default Network (a post-install hook) passed the CRD's validation; a user adds one.
    assert_eq!(
        get(&["get", "network", "default", "-o", "jsonpath={.spec.mode}"]),
        "primary"
    );
    let user = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(user.path(), USER_NETWORK).unwrap();
    cp.kubectl_run(&["apply", "-f", user.path().to_str().unwrap()])
        .unwrap();
    let uid = |name: &str| get(&["get", "network", name, "-o", "jsonpath={.metadata.uid}"]);
    let default_uid = uid("default");

    // An upgrade re-applies the CRDs and keeps the Networks.
    let upgraded = helm_k(&[
        "upgrade",
        RELEASE,
        chart,
        "--set",
        "defaultNetwork.enabled=true",
        "--set",
        "operator.replicas=3",
    ])
    .unwrap();
    assert!(upgraded.contains("STATUS: deployed"), "{upgraded}");
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    assert_eq!(
        get(&[
            "get",
            "deployment",
            "flatwire-operator",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "3"
    );
    // The default Network is created once and never recreated (that would revoke members).
    assert_eq!(uid("default"), default_uid);
    let user_uid = uid("users-own");

    let uninstalled = helm_k(&["uninstall", RELEASE, "--wait", "--timeout", "60s"]).unwrap();
    assert!(uninstalled.contains("uninstalled"), "{uninstalled}");
    assert!(
        release_objects(&cp).is_empty(),
        "left behind: {:?}",
        release_objects(&cp)
    );
    assert_eq!(helm_k(&["list", "-q"]).unwrap().trim(), "");
    let secrets = get(&["get", "secrets", "-n", NAMESPACE, "-o", "name"]);
    assert!(!secrets.contains("sh.helm.release"), "{secrets}");
    // Only the CRDs (kept) and the Networks (users' data) remain.
    for crd in CRDS {
        get(&["get", "crd", crd]);
    }
    assert_eq!(uid("users-own"), user_uid);
    assert_eq!(uid("default"), default_uid);

    // A later install adopts the kept CRDs and leaves the Networks alone.
    let again = helm_k(&[
        "install",
        RELEASE,
        chart,
        "--set",
        "defaultNetwork.enabled=true",
    ])
    .unwrap();
    assert!(again.contains("STATUS: deployed"), "{again}");
    assert_eq!(uid("users-own"), user_uid);
    assert_eq!(uid("default"), default_uid);
    helm_k(&["uninstall", RELEASE]).unwrap();
}
