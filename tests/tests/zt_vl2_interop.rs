//! VL2 interop with a real ZeroTier One 1.x (`FLATWIRE_ZT_ONE_BIN` = path to `zerotier-one`).
//!
//! Each scenario is its own namespace topology on one bridge with no route out
//! (198.18.0.0/15 only) and a planet of our own, so no node can ever see a public root:
//!
//! * `our_controller_real_member` (our root): the root and the network controller are our
//!   `vl2-node` (the controller over the JSON-file store, networks created from a JSON file
//!   with a rules source compiled by our compiler, tags and capabilities); a real
//!   `zerotier-one` joins. It must report the network OK with the pool IP our controller
//!   assigned, and the netconf it stored (`networks.d/<nwid>.conf`) must decode to exactly the
//!   rules, tags and capabilities we issued, signed by our controller. A second private
//!   network where it is not a member must be ACCESS_DENIED, until our controller authorizes
//!   it and pushes the config (NETWORK_CONFIG without a request), which must make it OK.
//! * `real_controller_our_member` (ZeroTier One root): the root and the controller are real
//!   `zerotier-one` processes; the network (rules, tags and capabilities compiled by our
//!   compiler, an IPv4 pool) and our member's authorization are created through ZeroTier
//!   One's controller API. Our `vl2-node --join` must get status OK, the IP the controller
//!   assigned, and exactly the rules, tags and capabilities the controller holds; and
//!   ACCESS_DENIED on a second network it is not authorized on.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use flatwire_tests::ztlab::{
    FwNode, Lab, ZtNode, build_example, hex, read, tail, wait_for, zt_bin_or_skip, zt_version,
};
use flatwire_vl1::Identity;
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::rules::{MAX_RULES, Rule, encode_rules, rules_from_json};

const SKIP: &str = "SKIPPED: set FLATWIRE_ZT_ONE_BIN to a zerotier-one binary to run the ZeroTier One VL2 interop test";

/// Rules with tags (an enum and a flags tag) and capabilities (consulted by 1.x only when
/// no base rule matched).
const RULES: &str = "
# Only IPv4, ARP and IPv6.
drop
  not ethertype 0x0800
  not ethertype 0x0806
  not ethertype 0x86dd
;
cap ssh
  id 1000
  accept ipprotocol tcp and dport 22;
;
cap superuser
  id 1001
  accept;
;
tag department
  id 1000
  enum 100 sales
  enum 400 engineering
;
tag role
  id 1001
  flag 0 admin
  flag 1 ops
;
accept tdiff department 0;
accept tand role admin;
# (An IP match on a non-IP frame is a hard no in 1.14, even negated: ARP needs its own rule.)
accept not ethertype 0x0800;
accept not ipprotocol tcp;
accept ipprotocol tcp and not dport 22;
# No catch-all: TCP port 22 between members of different departments matches nothing in
# the base rules, so (as in 1.x) only a capability can accept it.
";

fn generate() -> Identity {
    Identity::generate(&AtomicBool::new(false)).expect("generate identity")
}

fn rules_hex(rules: &[Rule]) -> String {
    let mut b = Vec::new();
    encode_rules(rules, &mut b);
    hex(&b)
}

/// Starts `vl2-node` on host `i` of `lab` with identity `id` and `args`.
fn fw(lab: &mut Lab, i: usize, name: &str, bin: &Path, id: &Identity, args: &[String]) -> FwNode {
    let d = lab.dir.path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("identity.secret"), id.to_secret_string().unwrap()).unwrap();
    let mut all = vec![
        "--bind".to_owned(),
        format!("{}:9993", lab.ip(i)),
        "--planet".to_owned(),
        lab.planet_file.display().to_string(),
    ];
    all.extend_from_slice(args);
    let host = lab.hosts[i].clone();
    FwNode::start(&mut lab.t, &host, bin, &d, &all)
}

/// Waits until ZeroTier One reports `nwid` with `status`.
fn wait_zt_status(
    z: &ZtNode,
    nwid: &str,
    status: &str,
    secs: u64,
    extra: impl Fn() -> String,
) -> serde_json::Value {
    wait_for(
        &format!("ZeroTier One reports {nwid} {status}"),
        secs,
        || format!("network: {:?}\n{}\n{}", z.network(nwid), z.diag(), extra()),
        || {
            let n = z.network(nwid)?;
            (n["status"].as_str() == Some(status)).then_some(n)
        },
    )
}

/// Waits until our member `m` logs `nwid` with `status`.
fn wait_fw_status(m: &FwNode, nwid: &str, status: &str, secs: u64, extra: impl Fn() -> String) {
    let (nwid, status) = (format!("nwid={nwid}"), format!("status={status}"));
    wait_for(
        &format!("our member reports {nwid} {status}"),
        secs,
        || format!("{}\n{}", tail(&m.log, 40), extra()),
        || {
            m.lines()
                .iter()
                .any(|l| l.starts_with("network ") && l.contains(&nwid) && l.contains(&status))
                .then_some(())
        },
    )
}

/// The first of a ZeroTier One `/network` object's `assignedAddresses`, without its prefix
/// length.
fn first_ip(n: &serde_json::Value) -> String {
    n["assignedAddresses"][0]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn our_controller_real_member() {
    let Some(zt) = zt_bin_or_skip(SKIP) else {
        return;
    };
    let version = zt_version(&zt);
    let bin = build_example("flatwire-vl2", "vl2-node");
    let tag = "[our controller, real member, our root]";
    let pass = |what: &str| println!("PASS {tag} {what}");
    println!("{tag} ZeroTier One version {version}");

    let (root_id, ctl_id, zt_id, our_id) = (generate(), generate(), generate(), generate());
    let mut lab = Lab::new(22, &["root", "ctl", "zt", "fw"], &root_id);
    let root = fw(&mut lab, 0, "root", &bin, &root_id, &["--root".to_owned()]);
    root.wait_line("root role", 10, "role root", &[]);

    // The controller's networks: one where ZeroTier One is authorized with tags and a
    // capability, one where it is not.
    let (num_ok, num_denied) = ("a11111", "a22222");
    let nwid_ok = format!("{}{num_ok}", ctl_id.address());
    let nwid_denied = format!("{}{num_denied}", ctl_id.address());
    let za = zt_id.address().to_string();
    let specs = serde_json::json!([
        {
            "number": num_ok, "name": "flatwire-vl2-interop", "private": true,
            "pools": [["10.77.0.10", "10.77.0.50"]], "routes": ["10.77.0.0/24"],
            "rulesSource": RULES,
            "members": [{
                "address": za, "authorized": true,
                "tags": {"department": "engineering", "role": "admin"},
                "capabilities": ["ssh"]
            }, {
                "address": our_id.address().to_string(), "authorized": true,
                "tags": {"department": "sales", "role": "ops"}
            }]
        },
        {
            "number": num_denied, "name": "flatwire-denied", "private": true,
            "pools": [["10.88.0.10", "10.88.0.50"]], "routes": ["10.88.0.0/24"]
        }
    ]);
    let specs_file = lab.dir.path().join("networks.json");
    std::fs::write(&specs_file, specs.to_string()).unwrap();
    let store = lab.dir.path().join("controller.d");
    let ctl = fw(
        &mut lab,
        1,
        "ctl",
        &bin,
        &ctl_id,
        &[
            "--controller".into(),
            store.display().to_string(),
            "--networks".into(),
            specs_file.display().to_string(),
        ],
    );
    ctl.wait_line("controller ready", 30, "controller ", &[]);
    assert!(store.join(format!("network/{nwid_ok}.json")).exists());

    let z = lab.zt(2, "zt", &zt, &zt_id);
    z.wait_peer(
        "ZeroTier One reaches our root",
        &root_id.address().to_string(),
        &lab.ip(0),
        90,
    );
    pass("ZeroTier One member reached our root");
    z.cli(&["join", &nwid_ok]).expect("join");
    z.cli(&["join", &nwid_denied]).expect("join");

    // (1) Authorized: status OK with the pool IP our controller assigned.
    let n = wait_zt_status(&z, &nwid_ok, "OK", 90, || tail(&ctl.log, 30));
    let issued = ctl.wait_line(
        "controller logged the config it sent",
        10,
        "request ",
        &[
            &format!("nwid={nwid_ok}"),
            &format!("from={za}"),
            "outcome=config",
        ],
    );
    let ips = FwNode::field(&issued, "ips").unwrap_or_default().to_owned();
    assert!(ips.starts_with("10.77.0."), "{issued}");
    let assigned: Vec<&str> = n["assignedAddresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(assigned, ips.split(',').collect::<Vec<_>>(), "{n}");
    assert_eq!(n["type"].as_str(), Some("PRIVATE"), "{n}");
    assert_eq!(n["name"].as_str(), Some("flatwire-vl2-interop"), "{n}");
    let routes = n["routes"].as_array().cloned().unwrap_or_default();
    assert!(
        routes
            .iter()
            .any(|r| r["target"].as_str() == Some("10.77.0.0/24")),
        "{n}"
    );
    pass(&format!(
        "ZeroTier One joined our controller's private network: status OK, IP {ips}, route, name"
    ));

    // (2) The netconf it stored decodes to exactly what we issued, signed by our controller.
    let conf_path = z.home.join(format!("networks.d/{nwid_ok}.conf"));
    let conf = wait_for(
        "ZeroTier One stored the netconf",
        20,
        || format!("{}", conf_path.display()),
        || std::fs::read(&conf_path).ok().filter(|b| !b.is_empty()),
    );
    let cfg = NetworkConfig::decode(&conf).expect("ZeroTier One's stored netconf decodes");
    let compiled = compile(RULES).unwrap();
    assert_eq!(cfg.issued_to, zt_id.address());
    assert_eq!(
        rules_hex(&cfg.rules),
        rules_hex(&compiled.base_rules()),
        "base rules"
    );
    assert!(cfg.rules.len() > 4, "{} rules", cfg.rules.len());
    let tags: Vec<(u32, u32)> = cfg.tags.iter().map(|t| (t.id, t.value)).collect();
    assert_eq!(tags, [(1000, 400), (1001, 1)], "tags");
    let ssh = &compiled
        .capabilities
        .iter()
        .find(|(n, _)| n == "ssh")
        .unwrap()
        .1;
    let caps: Vec<(u32, String)> = cfg
        .capabilities
        .iter()
        .map(|c| (c.id, rules_hex(&c.rules)))
        .collect();
    assert_eq!(
        caps,
        [(1000, rules_hex(&compiled.capability_rules(ssh)))],
        "capabilities"
    );
    let ctl_pub = ctl_id.to_public();
    assert!(
        cfg.com.as_ref().is_some_and(|c| c.verify(&ctl_pub)),
        "COM signed by our controller"
    );
    assert!(
        cfg.tags.iter().all(|t| t.verify(&ctl_pub)),
        "tags signed by our controller"
    );
    assert!(
        cfg.capabilities
            .iter()
            .all(|c| c.verify(|a| (a == ctl_id.address()).then_some(&ctl_pub))),
        "capabilities signed by our controller"
    );
    pass(&format!(
        "ZeroTier One's stored netconf decodes to our {} rules, tags {tags:?}, capability 1000 \
         (ssh) with its rules; COM, tags and capability carry our controller's signatures",
        cfg.rules.len()
    ));

    // (3) Not a member: ACCESS_DENIED.
    wait_zt_status(&z, &nwid_denied, "ACCESS_DENIED", 60, || tail(&ctl.log, 30));
    ctl.wait_line(
        "controller refused",
        10,
        "request ",
        &[
            &format!("nwid={nwid_denied}"),
            "outcome=refused",
            "AccessDenied",
        ],
    );
    pass("ZeroTier One got ACCESS_DENIED on the network it is not authorized on");

    // (4) Authorize it now: our controller pushes the config (no request), ZeroTier One goes OK.
    ctl.command(&format!("authorize {nwid_denied} {za}"));
    ctl.wait_line(
        "controller pushed",
        10,
        "push ",
        &[&format!("nwid={nwid_denied}")],
    );
    let n2 = wait_zt_status(&z, &nwid_denied, "OK", 20, || tail(&ctl.log, 30));
    assert!(
        n2["assignedAddresses"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.starts_with("10.88.0.")))),
        "{n2}"
    );
    assert!(
        !ctl.lines().iter().any(|l| l.starts_with("request ")
            && l.contains(&format!("nwid={nwid_denied}"))
            && l.contains("outcome=config")),
        "the config came from the push, not from a new request:\n{}",
        tail(&ctl.log, 30)
    );
    pass("authorizing at our controller pushed a NETWORK_CONFIG: ZeroTier One went OK at once");

    // (5) Frames between ZeroTier One and our member on the network.
    let m = fw(
        &mut lab,
        3,
        "member",
        &bin,
        &our_id,
        &["--join".into(), nwid_ok.clone()],
    );
    data_plane(&m, &z, &n, &nwid_ok, tag);

    // (6) De-authorize our member: our controller's signed revocation makes ZeroTier One
    // refuse it at once (our member's ARP requests are no longer answered).
    let z_ip = first_ip(&n);
    let z_mac = n["mac"].as_str().unwrap().to_owned();
    let replies = |m: &FwNode| {
        m.lines()
            .iter()
            .filter(|l| {
                l.starts_with("frame ")
                    && l.contains(&format!("src={z_mac}"))
                    && l.contains("arp-op=2")
            })
            .count()
    };
    let oa = our_id.address().to_string();
    ctl.command(&format!("deauthorize {nwid_ok} {oa}"));
    ctl.wait_line(
        "controller revoked",
        10,
        "revoke ",
        &[&format!("member={oa}")],
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let before = replies(&m);
    let m_lines_before = m.lines().len();
    for _ in 0..3 {
        m.command(&format!("arp {nwid_ok} {z_ip}"));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        replies(&m),
        before,
        "ZeroTier One still answers a revoked member:\n{}",
        tail(&m.log, 30)
    );
    if std::env::var_os("FLATWIRE_ZT_DUMP").is_some() {
        println!("{}", m.lines()[m_lines_before..].join("\n"));
    }
    // ZeroTier One tells our member why: ERROR NEED_MEMBERSHIP_CERTIFICATE (its COM is
    // revoked), counted as an ERROR from it after the revocation.
    let errors_after = m.lines()[m_lines_before..]
        .iter()
        .filter(|l| {
            l.starts_with("packet ")
                && l.contains(&format!("from={za}"))
                && l.contains("verb=ERROR")
        })
        .count();
    assert!(
        errors_after > 0,
        "no ERROR from ZeroTier One after the revocation:\n{}",
        tail(&m.log, 30)
    );
    pass(&format!(
        "our controller's revocation of our member was accepted by ZeroTier One: it refuses \
         our member's frames (no ARP reply, {errors_after} ERROR replies)"
    ));

    ctl.assert_no_bad_packets(&format!("{tag} controller"), "drops ");
    println!("{tag} all checks passed with ZeroTier One {version}");
    let _ = read(&ctl.log);
    drop(lab);
}

#[test]
fn real_controller_our_member() {
    let Some(zt) = zt_bin_or_skip(SKIP) else {
        return;
    };
    let version = zt_version(&zt);
    let bin = build_example("flatwire-vl2", "vl2-node");
    let tag = "[real controller, our member, ZeroTier One root]";
    let pass = |what: &str| println!("PASS {tag} {what}");
    println!("{tag} ZeroTier One version {version}");

    let (root_id, ctl_id, our_id) = (generate(), generate(), generate());
    let mut lab = Lab::new(23, &["root", "ctl", "fw"], &root_id);
    let _root = lab.zt(0, "ztroot", &zt, &root_id);
    let c = lab.zt(1, "ztctl", &zt, &ctl_id);
    c.wait_peer(
        "controller reaches the root",
        &root_id.address().to_string(),
        &lab.ip(0),
        90,
    );

    // The network, through ZeroTier One's controller API, with our compiler's output.
    let compiled = compile(RULES).unwrap();
    let cli = compiled.to_cli_json().to_value();
    let nwid = format!("{}b0b0b0", ctl_id.address());
    let nwid_denied = format!("{}b0b0b1", ctl_id.address());
    let body = serde_json::json!({
        "name": "zt-controller-interop",
        "private": true,
        "v4AssignMode": {"zt": true},
        "ipAssignmentPools": [{"ipRangeStart": "10.78.0.10", "ipRangeEnd": "10.78.0.50"}],
        "routes": [{"target": "10.78.0.0/24", "via": null}],
        "rules": cli["config"]["rules"],
        "capabilities": cli["config"]["capabilities"],
        "tags": cli["config"]["tags"],
    });
    let created = c
        .api(&format!("/controller/network/{nwid}"), Some(&body))
        .unwrap();
    assert_eq!(created["id"].as_str(), Some(nwid.as_str()), "{created}");
    let denied = serde_json::json!({"name": "zt-denied", "private": true});
    c.api(&format!("/controller/network/{nwid_denied}"), Some(&denied))
        .unwrap();
    let oa = our_id.address().to_string();
    let member = serde_json::json!({
        "authorized": true,
        "tags": [[1000, 100], [1001, 2]],
        "capabilities": [1000, 1001],
    });
    c.api(
        &format!("/controller/network/{nwid}/member/{oa}"),
        Some(&member),
    )
    .unwrap();
    // The controller's own node is a member too (engineering, admin, the ssh capability).
    let ca = ctl_id.address().to_string();
    let ctl_member = serde_json::json!({
        "authorized": true,
        "tags": [[1000, 400], [1001, 1]],
        "capabilities": [1000],
    });
    c.api(
        &format!("/controller/network/{nwid}/member/{ca}"),
        Some(&ctl_member),
    )
    .unwrap();
    let held = c.api(&format!("/controller/network/{nwid}"), None).unwrap();
    pass(
        "network with our compiled rules, tags and capabilities created through the ZeroTier One controller API",
    );

    if let Some(pcap) = std::env::var_os("FLATWIRE_ZT_TCPDUMP") {
        let h = lab.hosts[2].clone();
        let cmd = format!(
            "exec tcpdump -l -n -tt -i any udp >{} 2>&1",
            Path::new(&pcap).display()
        );
        lab.t.spawn(&h, "sh", &["-c", &cmd]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let m = fw(
        &mut lab,
        2,
        "member",
        &bin,
        &our_id,
        &[
            "--join".into(),
            nwid.clone(),
            "--join".into(),
            nwid_denied.clone(),
        ],
    );
    wait_fw_status(&m, &nwid, "OK", 90, || c.diag());
    let config = m.wait_line("config line", 5, "config ", &[&format!("nwid={nwid}")]);
    pass(&format!(
        "our member joined the ZeroTier One controller's network: status OK ({config})"
    ));

    // The IP the controller assigned.
    let held_member = wait_for(
        "the controller records an IP assignment",
        20,
        || tail(&m.log, 20),
        || {
            let v = c
                .api(&format!("/controller/network/{nwid}/member/{oa}"), None)
                .ok()?;
            (!v["ipAssignments"].as_array()?.is_empty()).then_some(v)
        },
    );
    let want_ip = held_member["ipAssignments"][0].as_str().unwrap().to_owned();
    assert!(want_ip.starts_with("10.78.0."), "{held_member}");
    m.wait_line(
        "our member logs its IP",
        5,
        "ip ",
        &[&format!("nwid={nwid}"), &format!("addr={want_ip}/24")],
    );
    m.wait_line(
        "our member logs the route",
        5,
        "route ",
        &[&format!("nwid={nwid}"), "target=10.78.0.0/24"],
    );
    assert!(
        config.contains("private=true") && config.contains("com=true"),
        "{config}"
    );
    pass(&format!(
        "our member has the IP the controller assigned ({want_ip}/24) and its route"
    ));

    // Exactly the rules, tags and capabilities the controller holds.
    let want_rules = rules_from_json(&held["rules"], MAX_RULES);
    assert!(want_rules.len() > 4, "{held}");
    let rules_line = m.wait_line("rules line", 5, "rules ", &[&format!("nwid={nwid}")]);
    assert_eq!(
        FwNode::field(&rules_line, "hex"),
        Some(rules_hex(&want_rules).as_str()),
        "rules: {rules_line}"
    );
    assert_eq!(
        rules_hex(&want_rules),
        rules_hex(&compiled.base_rules()),
        "the controller holds our compiled rules"
    );
    for t in held_member["tags"].as_array().unwrap() {
        let (id, v) = (t[0].as_u64().unwrap(), t[1].as_u64().unwrap());
        m.wait_line(
            "tag line",
            5,
            "tag ",
            &[
                &format!("nwid={nwid}"),
                &format!("id={id} value={v} to={oa}"),
            ],
        );
    }
    let mut tag_lines: Vec<String> = m
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("tag ") && l.contains(&format!("nwid={nwid}")))
        .collect();
    tag_lines.sort();
    tag_lines.dedup();
    let tags_n = tag_lines.len();
    assert_eq!(tags_n, 2, "{}", tail(&m.log, 30));
    let held_caps = held["capabilities"].as_array().unwrap();
    assert_eq!(held_caps.len(), 2, "{held}");
    for cap in held_caps {
        let id = cap["id"].as_u64().unwrap();
        let want = rules_hex(&rules_from_json(&cap["rules"], MAX_RULES));
        let line = m.wait_line(
            "capability line",
            5,
            "capability ",
            &[&format!("nwid={nwid}"), &format!("id={id} ")],
        );
        assert_eq!(
            FwNode::field(&line, "hex"),
            Some(want.as_str()),
            "capability {id}: {line}"
        );
    }
    pass(&format!(
        "our member decoded exactly the controller's {} rules, tags {} and capabilities 1000/1001 (byte-identical)",
        want_rules.len(),
        held_member["tags"]
    ));

    // Not authorized on the second network.
    wait_fw_status(&m, &nwid_denied, "ACCESS_DENIED", 60, String::new);
    pass(
        "our member got ACCESS_DENIED from the ZeroTier One controller on the network it is not authorized on",
    );

    // Frames between our member and the controller's own node (credentials signed by the
    // ZeroTier One controller, checked by us).
    c.cli(&["join", &nwid]).expect("join");
    let cn = wait_zt_status(&c, &nwid, "OK", 60, || tail(&m.log, 20));
    data_plane(&m, &c, &cn, &nwid, tag);

    m.assert_no_bad_packets(&format!("{tag} member"), "drops ");
    println!("{tag} all checks passed with ZeroTier One {version}");
    drop(lab);
}

/// Our member `m` is on `nwid` with ZeroTier One member `z` (whose `/network` object is `zn`)
/// and they exchange frames: ZeroTier One's broadcast ARP reaches us (multicast gather at our
/// root and controller, MULTICAST_FRAME), our ARP reply and ZeroTier One's ICMP reach the
/// other side as unicast frames (each side's membership check and rules passed), TCP port 22
/// from ZeroTier One passes both ends' rules only through the `ssh` capability it holds, and
/// our broadcast ARP for ZeroTier One's address is answered by its kernel.
fn data_plane(m: &FwNode, z: &ZtNode, zn: &serde_json::Value, nwid: &str, tag: &str) {
    let pass = |what: &str| println!("PASS {tag} {what}");
    let ip_line = m.wait_line(
        "our member gets an IP",
        60,
        "ip ",
        &[&format!("nwid={nwid}")],
    );
    let m_ip = FwNode::field(&ip_line, "addr")
        .and_then(|a| a.split('/').next())
        .unwrap()
        .to_owned();
    let joined = m.wait_line("our member's MAC", 5, "joined ", &[]);
    let m_mac = FwNode::field(&joined, "mac").unwrap().to_owned();
    let z_mac = zn["mac"].as_str().unwrap().to_owned();
    let z_ip = first_ip(zn);
    let dev = zn["portDeviceName"].as_str().unwrap_or_default().to_owned();
    let addrs = z.host.run("ip", &["-o", "addr", "show"]).unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout).to_string();
    assert!(
        addrs.contains(&format!("{z_ip}/")),
        "ZeroTier One's TAP {dev} has {z_ip}:\n{addrs}"
    );

    // ZeroTier One -> us: ARP broadcast, then ICMP once our reply resolved us.
    let ping = z
        .host
        .command("ping")
        .args(["-c", "4", "-i", "0.5", "-W", "1", &m_ip])
        .output();
    let ping = ping
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let diag = || format!("{}\nping: {ping}", tail(&m.log, 40));
    let arp_in = m.wait_line(
        "ZeroTier One's ARP request reaches our member",
        20,
        "frame ",
        &[
            &format!("src={z_mac}"),
            "ethertype=0806",
            "arp-op=1",
            &format!("tpa={m_ip}"),
        ],
    );
    pass(&format!(
        "ZeroTier One's broadcast ARP for our member's IP arrived (multicast through the gather): {arp_in}"
    ));
    m.wait_line(
        "our member answered",
        5,
        "arp-reply ",
        &[&format!("to={z_mac}")],
    );
    let neigh = wait_for("ZeroTier One's kernel learned our MAC", 20, diag, || {
        let o = z.host.run("ip", &["neigh", "show", &m_ip]).ok()?;
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        t.contains(&m_mac).then_some(t)
    });
    pass(&format!(
        "our unicast ARP reply passed ZeroTier One's membership check and rules: {}",
        neigh.trim()
    ));
    m.wait_line(
        "ZeroTier One's ICMP reaches our member",
        20,
        "frame ",
        &[
            &format!("src={z_mac}"),
            "ethertype=0800",
            "proto=1",
            &format!("dst-ip={m_ip}"),
        ],
    );
    pass(
        "ZeroTier One's ICMP echo (unicast FRAME) passed its and our rules (department/role tags)",
    );

    // TCP 22 is dropped by the base rules and allowed only by the `ssh` capability ZeroTier
    // One holds: our inbound rules must honour the capability it presented.
    let _ = z
        .host
        .command("timeout")
        .args(["3", "bash", "-c", &format!("exec 3<>/dev/tcp/{m_ip}/22")])
        .output();
    m.wait_line(
        "ZeroTier One's TCP 22 (ssh capability) reaches our member",
        10,
        "frame ",
        &[&format!("src={z_mac}"), "proto=6", "dport=22"],
    );
    pass("ZeroTier One's TCP SYN to port 22 passed our inbound rules through its ssh capability");

    // Us -> ZeroTier One: our broadcast ARP, answered by its kernel.
    m.command(&format!("arp {nwid} {z_ip}"));
    m.wait_line(
        "ZeroTier One's kernel answers our ARP",
        20,
        "frame ",
        &[
            &format!("src={z_mac}"),
            "ethertype=0806",
            "arp-op=2",
            &format!("spa={z_ip}"),
        ],
    );
    pass(
        "our broadcast ARP reached ZeroTier One (gather, MULTICAST_FRAME) and its reply came back",
    );
}
