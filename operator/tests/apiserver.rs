//! The generated CRDs against a real etcd + kube-apiserver (the harness's control plane):
//! they install and become Established, valid objects are stored with defaults and shown
//! with the printer columns, and invalid ones are refused with a clear message.

use std::path::Path;

use flatwire_tests::controlplane::ControlPlane;

/// `kubectl apply -f` of `yaml`; the stdout, or the error text (kubectl's stderr).
fn apply(cp: &ControlPlane, yaml: &str) -> Result<String, String> {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    cp.kubectl_run(&["apply", "-f", f.path().to_str().unwrap()])
        .map_err(|e| e.to_string())
}

fn network(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: flatwire.io/v1alpha1\nkind: Network\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

fn member(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: flatwire.io/v1alpha1\nkind: NetworkMember\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

const VALID_NETWORK: &str = r#"
apiVersion: flatwire.io/v1alpha1
kind: Network
metadata:
  name: lab
spec:
  number: 1
  name: lab net
  ipAssignmentPools:
  - {ipRangeStart: 10.147.17.1, ipRangeEnd: 10.147.17.254}
  - {ipRangeStart: "fd00:1::1", ipRangeEnd: "fd00:1::ffff"}
  routes:
  - {target: 10.147.17.0/24}
  - {target: 0.0.0.0/0, via: 10.147.17.1}
  v4AssignMode: [pool]
  v6AssignMode: [rfc4193, 6plane]
  dns: {domain: lab.example, servers: [10.147.17.53, "fd00:1::53"]}
  multicastLimit: 64
  tags:
  - {name: department, id: 1000, enum: {eng: 100, ops: 200}, podLabel: dept, default: 100}
  - {name: tier, id: 4294967295}
  capabilities:
  - {name: superuser, id: 1, rules: "accept;"}
  rules: |
    tag department id 1000 enum 100 eng enum 200 ops;
    drop not ethertype ipv4 and not ethertype arp and not ethertype ipv6;
    accept;
  namespaceSelector: {matchLabels: {flatwire: "on"}}
  podSelector: {}
  mode: primary
"#;

const VALID_MEMBER: &str = r#"
apiVersion: flatwire.io/v1alpha1
kind: NetworkMember
metadata:
  name: laptop
spec:
  network: lab
  address: 89e92ceee5
  authorized: true
  activeBridge: false
  ipAssignments: [10.147.17.9, "fd00:1::9"]
  tags: {department: ops}
  capabilities: [superuser]
  name: Ada's laptop
"#;

#[test]
fn crds_install_accept_valid_objects_and_refuse_invalid_ones() {
    let cp = ControlPlane::start().expect("control plane (run `cargo xtask tools`)");
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");

    // The checked-in CRDs install and become Established.
    let out = cp
        .kubectl_run(&["apply", "-f", crds.to_str().unwrap()])
        .expect("kubectl apply -f crds/");
    for name in ["networks.flatwire.io", "networkmembers.flatwire.io"] {
        assert!(out.contains(&format!("{name} created")), "{out}");
    }
    cp.kubectl_run(&[
        "wait",
        "--for=condition=established",
        "crd/networks.flatwire.io",
        "crd/networkmembers.flatwire.io",
        "--timeout=60s",
    ])
    .expect("CRDs Established");

    // Valid objects are stored, with the schema's defaults filled in.
    let out = apply(&cp, VALID_NETWORK).expect("valid Network");
    assert!(out.contains("network.flatwire.io/lab created"), "{out}");
    let out = apply(&cp, VALID_MEMBER).expect("valid NetworkMember");
    assert!(
        out.contains("networkmember.flatwire.io/laptop created"),
        "{out}"
    );
    apply(&cp, &network("minimal", "{}")).expect("an empty spec is valid");
    let get = |args: &[&str]| cp.kubectl_run(args).unwrap();
    assert_eq!(
        get(&[
            "get",
            "network",
            "minimal",
            "-o",
            "jsonpath={.spec.mtu} {.spec.multicastLimit} {.spec.private} {.spec.enableBroadcast} {.spec.mode}"
        ]),
        "2800 32 true true secondary"
    );
    assert_eq!(
        get(&[
            "get",
            "fwmember",
            "laptop",
            "-o",
            "jsonpath={.spec.address} {.spec.tags.department}"
        ]),
        "89e92ceee5 ops"
    );

    // The status subresource takes what the operator will write, and `kubectl get networks`
    // shows it in the printer columns.
    let status = r#"{"status":{"networkId":"8056c2e21c000001","revision":3,"members":4,"authorizedMembers":3,
        "conditions":[{"type":"Ready","status":"True","reason":"Configured","message":"","lastTransitionTime":"2026-01-01T00:00:00Z"},
        {"type":"RulesCompiled","status":"True","reason":"Compiled","message":"","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    get(&[
        "patch",
        "network",
        "lab",
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ]);
    let table = get(&["get", "networks"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ID", "MEMBERS", "READY", "AGE"], "{table}");
    let lab: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("lab "))
        .unwrap_or_else(|| panic!("no lab row in\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        lab[..4],
        ["lab", "8056c2e21c000001", "4", "True"],
        "{table}"
    );
    let wide = get(&["get", "fwnet", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("MODE"), "{wide}");
    assert!(
        wide.contains("primary") && wide.contains("secondary"),
        "{wide}"
    );
    let members = get(&["get", "networkmembers"]);
    let header: Vec<&str> = members.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "NETWORK",
            "ADDRESS",
            "AUTHORIZED",
            "LAST",
            "SEEN",
            "AGE"
        ],
        "{members}"
    );
    assert!(
        members.contains("laptop") && members.contains("89e92ceee5") && members.contains("true"),
        "{members}"
    );
    // The category lists both kinds.
    let all = get(&["get", "flatwire", "-o", "name"]);
    assert!(
        all.contains("network.flatwire.io/lab") && all.contains("networkmember.flatwire.io/laptop"),
        "{all}"
    );

    // Invalid Networks are refused by the API server, each with a message naming the field
    // and the problem.
    let huge_rules = format!("{{rules: \"{}\"}}", "accept;".repeat(10_000));
    let bad_networks: &[(&str, &str, &[&str])] = &[
        (
            "mtu-low",
            "{mtu: 1000}",
            &["spec.mtu", "greater than or equal to 1280"],
        ),
        (
            "mtu-high",
            "{mtu: 10001}",
            &["spec.mtu", "less than or equal to 10000"],
        ),
        (
            "number-big",
            "{number: 16777216}",
            &["spec.number", "less than or equal to 16777215"],
        ),
        (
            "id-short",
            "{id: 8056c2e21c00001}",
            &["spec.id", "should match '^[0-9a-f]{16}$'"],
        ),
        (
            "id-upper",
            "{id: 8056C2E21C000001}",
            &["spec.id", "should match"],
        ),
        (
            "id-adhoc",
            "{id: ff00000000000001}",
            &["spec.id", "ad-hoc networks, which have no controller"],
        ),
        (
            "id-and-number",
            "{id: 8056c2e21c000001, number: 1}",
            &["set at most one of id and number"],
        ),
        (
            "v6-mode",
            "{v6AssignMode: [pool, zt]}",
            &[
                "spec.v6AssignMode[1]",
                "Unsupported value: \"zt\"",
                "\"6plane\"",
            ],
        ),
        (
            "v4-mode",
            "{v4AssignMode: [rfc4193]}",
            &["spec.v4AssignMode[0]", "Unsupported value: \"rfc4193\""],
        ),
        (
            "v6-mode-dup",
            "{v6AssignMode: [rfc4193, rfc4193]}",
            &["spec.v6AssignMode[1]", "Duplicate value: \"rfc4193\""],
        ),
        (
            "mode",
            "{mode: tertiary}",
            &["spec.mode", "Unsupported value: \"tertiary\""],
        ),
        (
            "pool-order",
            "{ipAssignmentPools: [{ipRangeStart: 10.0.0.200, ipRangeEnd: 10.0.0.10}]}",
            &["spec.ipAssignmentPools[0]", "ipRangeStart <= ipRangeEnd"],
        ),
        (
            "pool-order-octet",
            "{ipAssignmentPools: [{ipRangeStart: 10.1.0.0, ipRangeEnd: 10.0.255.255}]}",
            &["spec.ipAssignmentPools[0]", "ipRangeStart <= ipRangeEnd"],
        ),
        (
            "pool-family",
            "{ipAssignmentPools: [{ipRangeStart: 10.0.0.1, ipRangeEnd: \"fd00::1\"}]}",
            &["spec.ipAssignmentPools[0]", "one address family"],
        ),
        (
            "pool-not-ip",
            "{ipAssignmentPools: [{ipRangeStart: 10.0.0.300, ipRangeEnd: 10.0.0.10}]}",
            &[
                "spec.ipAssignmentPools[0].ipRangeStart",
                "must be an IPv4 or IPv6 address",
            ],
        ),
        (
            "route-not-cidr",
            "{routes: [{target: 10.0.0.0}]}",
            &["spec.routes[0].target", "must be a CIDR prefix"],
        ),
        (
            "route-family",
            "{routes: [{target: 10.0.0.0/8, via: \"fd00::1\"}]}",
            &[
                "spec.routes[0]",
                "via must be of the same address family as target",
            ],
        ),
        (
            "dns-server",
            "{dns: {domain: x, servers: [not-an-ip]}}",
            &["spec.dns.servers", "servers must be IP addresses"],
        ),
        (
            "dns-many",
            "{dns: {domain: x, servers: [1.1.1.1, 1.1.1.2, 1.1.1.3, 1.1.1.4, 1.1.1.5]}}",
            &["spec.dns.servers", "must have at most 4 items"],
        ),
        (
            "tag-id-dup",
            "{tags: [{name: a, id: 7}, {name: b, id: 7}]}",
            &["spec.tags", "tag ids must be unique"],
        ),
        (
            "tag-name-dup",
            "{tags: [{name: a, id: 7}, {name: a, id: 8}]}",
            &["spec.tags[1]", "Duplicate value"],
        ),
        (
            "tag-id-big",
            "{tags: [{name: a, id: 4294967296}]}",
            &["spec.tags[0].id", "less than or equal to 4294967295"],
        ),
        (
            "tag-id-neg",
            "{tags: [{name: a, id: -1}]}",
            &["spec.tags[0].id", "greater than or equal to 0"],
        ),
        (
            "tag-default",
            "{tags: [{name: a, id: 1, enum: {x: 1}, default: 2}]}",
            &["spec.tags[0]", "default must be one of the enum values"],
        ),
        (
            "tag-name",
            "{tags: [{name: \"no spaces\", id: 1}]}",
            &["spec.tags[0].name", "should match"],
        ),
        (
            "cap-id-dup",
            "{capabilities: [{name: a, id: 1}, {name: b, id: 1}]}",
            &["spec.capabilities", "capability ids must be unique"],
        ),
        ("rules-huge", &huge_rules, &["spec.rules", "Too long"]),
        (
            "unknown-field",
            "{mtuu: 1400}",
            &["unknown field \"spec.mtuu\""],
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, expect) in bad_networks {
        match apply(&cp, &network(&format!("bad-{name}"), spec)) {
            Ok(out) => failures.push(format!("{name}: accepted: {out}")),
            Err(e) => {
                if let Some(missing) = expect.iter().find(|m| !e.contains(*m)) {
                    failures.push(format!("{name}: message lacks {missing:?}: {e}"));
                }
            }
        }
    }

    // Invalid NetworkMembers too.
    let bad_members: &[(&str, &str, &[&str])] = &[
        (
            "addr-short",
            "{network: lab, address: 89e92cee}",
            &["spec.address", "should match '^[0-9a-f]{10}$'"],
        ),
        (
            "addr-hex",
            "{network: lab, address: 89e92ceeeg}",
            &["spec.address", "should match"],
        ),
        (
            "addr-reserved",
            "{network: lab, address: ff12345678}",
            &["spec.address", "reserved ZeroTier addresses"],
        ),
        (
            "addr-zero",
            "{network: lab, address: \"0000000000\"}",
            &["spec.address", "reserved ZeroTier addresses"],
        ),
        (
            "no-network",
            "{address: 89e92ceee5}",
            &["spec.network", "Required value"],
        ),
        (
            "bad-network-name",
            "{network: Lab_Net, address: 89e92ceee5}",
            &["spec.network", "should match"],
        ),
        (
            "ips",
            "{network: lab, address: 89e92ceee5, ipAssignments: [10.0.0.1, bogus]}",
            &["spec.ipAssignments", "ipAssignments must be IP addresses"],
        ),
        (
            "ips-dup",
            "{network: lab, address: 89e92ceee5, ipAssignments: [10.0.0.1, 10.0.0.1]}",
            &["spec.ipAssignments[1]", "Duplicate value"],
        ),
    ];
    for (name, spec, expect) in bad_members {
        match apply(&cp, &member(&format!("bad-{name}"), spec)) {
            Ok(out) => failures.push(format!("member {name}: accepted: {out}")),
            Err(e) => {
                if let Some(missing) = expect.iter().find(|m| !e.contains(*m)) {
                    failures.push(format!("member {name}: message lacks {missing:?}: {e}"));
                }
            }
        }
    }
    // A member's network and address cannot change after creation.
    for (what, spec) in [
        (
            "address",
            "{network: lab, address: 89e92ceee6, authorized: true}",
        ),
        (
            "network",
            "{network: other, address: 89e92ceee5, authorized: true}",
        ),
    ] {
        match apply(&cp, &member("laptop", spec)) {
            Ok(out) => failures.push(format!("changing {what}: accepted: {out}")),
            Err(e)
                if !e.contains(&format!("spec.{what}: Invalid value"))
                    || !e.contains(&format!("{what} is immutable")) =>
            {
                failures.push(format!("changing {what}: unclear message: {e}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // None of the refused objects was stored.
    let names = get(&["get", "networks,networkmembers", "-o", "name"]);
    assert!(!names.contains("bad-"), "{names}");
}
