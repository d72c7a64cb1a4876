//! The local HTTP API of real agents in network namespaces (needs root): a root+controller
//! and a member that joined a network. Requests go over each namespace's loopback with
//! `curl`; the answers are compared with ZeroTier One 1.14.1's recorded JSON
//! (`spec/vectors/zt-one/api-json`), key set for key set.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flatwire_agent::networks::tap_name;
use flatwire_tests::netns::{Host, Topology};
use flatwire_vl1::Identity;
use flatwire_vl2::NetworkId;
use serde_json::Value;

mod common;

use common::{
    assert_root, lan_hosts, metric, new_identity, scrape, start_agent, start_controller,
    write_lan_planet, write_network,
};

const API: &str = "http://127.0.0.1:9993";

fn vector(name: &str) -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/spec/vectors/zt-one/api-json/"
    );
    serde_json::from_slice(&std::fs::read(format!("{p}{name}")).unwrap()).unwrap()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// `curl` in `host`: (HTTP status, body as JSON or `Null`).
fn call(host: &Host, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let url = format!("{API}{path}");
    let header = token.map(|t| format!("X-ZT1-Auth: {t}"));
    let mut args = vec!["-s", "-m", "5", "-w", "\n%{http_code}", "-X", method];
    if let Some(h) = &header {
        args.extend(["-H", h]);
    }
    if !body.is_empty() {
        args.extend(["--data-binary", body]);
    }
    args.push(&url);
    let out = host.run("curl", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Polls `GET path` until `done` holds (at most `limit`).
fn wait_for(
    host: &Host,
    token: &str,
    path: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (code, v) = call(host, "GET", path, Some(token), "");
        if code == 200 && done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never satisfied: {code} {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn zerotier_shaped_api_on_loopback() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let [ctl_host, m1_host] = <[Host; 2]>::try_from(lan_hosts(&mut topo, &["ctl", "m1"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| -> PathBuf { dir.path().join(n) };
    let root_id = new_identity(&home("ctl"));
    let m1_id = new_identity(&home("m1"));
    let planet_file = write_lan_planet(dir.path(), &root_id);
    let planet_arg = planet_file.to_str().unwrap();
    let nwid = NetworkId::new(root_id.address(), 0x00_0001);
    let nwid2 = NetworkId::new(root_id.address(), 0x00_0002);
    write_network(&home("ctl"), nwid, "10.77.0", &[&m1_id]);
    write_network(&home("ctl"), nwid2, "10.78.0", &[&m1_id]);

    let mut ctl = start_controller(&ctl_host, &home("ctl"), &planet_file);
    let mut m1 = start_agent(
        &m1_host,
        &home("m1"),
        &home("m1").join("agent.sock"),
        &["--planet", planet_arg, "--join", &nwid.to_string()],
    );
    common::wait_socket(&mut m1, &home("m1").join("agent.sock"), "member agent");

    // The token file: 24 alphanumerics, owner-only.
    let token_path = home("m1").join("authtoken.secret");
    let token = std::fs::read_to_string(&token_path).unwrap();
    assert_eq!(token.len(), 24, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let ctl_token = std::fs::read_to_string(home("ctl").join("authtoken.secret")).unwrap();

    // Auth: none or wrong is 401; the header and ?auth= both work.
    assert_eq!(call(&m1_host, "GET", "/status", None, "").0, 401);
    assert_eq!(
        call(
            &m1_host,
            "GET",
            "/status",
            Some("wrongwrongwrongwrongwron"),
            ""
        )
        .0,
        401
    );
    assert_eq!(
        call(&m1_host, "GET", &format!("/status?auth={token}"), None, "").0,
        200
    );

    // /status: ZeroTier One's key set, top level and config.settings.
    let status = wait_for(&m1_host, &token, "/status", Duration::from_secs(20), |v| {
        v["online"] == true
    });
    let zt = vector("zta-status.json");
    assert_eq!(keys(&status), keys(&zt), "{status}");
    assert_eq!(
        keys(&status["config"]["settings"]),
        keys(&zt["config"]["settings"])
    );
    assert_eq!(status["address"], m1_id.address().to_string());
    assert_eq!(status["publicIdentity"], m1_id.to_public().to_string());
    let (planet, _) = flatwire_vl1::World::parse(&std::fs::read(&planet_file).unwrap()).unwrap();
    assert_eq!(status["planetWorldId"], planet.id);
    assert_eq!(status["planetWorldTimestamp"], planet.timestamp);
    assert_eq!(status["config"]["settings"]["primaryPort"], 9993);
    assert_eq!(status["tcpFallbackActive"], false);

    // /network/{id}: the joined network with its assigned address, on its TAP.
    let path = format!("/network/{nwid}");
    let net = wait_for(&m1_host, &token, &path, Duration::from_secs(30), |v| {
        v["assignedAddresses"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    assert_eq!(
        keys(&net),
        keys(&vector("zta-network-e6acfe87fc3adaf6.json")),
        "{net}"
    );
    assert_eq!(net["status"], "OK");
    assert_eq!(net["type"], "PRIVATE");
    assert_eq!(net["id"], nwid.to_string());
    assert_eq!(net["nwid"], nwid.to_string());
    assert_eq!(net["mtu"], 2800);
    assert_eq!(net["name"], "net-10.77.0");
    assert_eq!(net["portDeviceName"], tap_name(nwid));
    assert_eq!(
        net["mac"],
        flatwire_vl2::Mac::from_address(m1_id.address(), nwid).to_string()
    );
    assert_eq!(net["routes"][0]["target"], "10.77.0.0/24");
    assert_eq!(net["routes"][0]["via"], Value::Null);
    let addr = net["assignedAddresses"][0].as_str().unwrap().to_string();
    assert!(
        addr.starts_with("10.77.0.") && addr.ends_with("/24"),
        "{addr}"
    );
    let link = m1_host
        .run("ip", &["-4", "-o", "addr", "show", "dev", &tap_name(nwid)])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains(&addr),
        "{addr} not on the TAP"
    );
    let (code, list) = call(&m1_host, "GET", "/network", Some(&token), "");
    assert_eq!(code, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["nwid"], nwid.to_string());

    // /peer: the root as PLANET, with a path; key sets as ZeroTier One's.
    let root = root_id.address().to_string();
    let peers = wait_for(&m1_host, &token, "/peer", Duration::from_secs(10), |v| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|p| p["address"] == root.as_str()))
    });
    let zt_peer = &vector("zta-peer.json")[0];
    let p = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == root.as_str())
        .unwrap();
    assert_eq!(keys(p), keys(zt_peer), "{p}");
    assert_eq!(p["role"], "PLANET");
    assert_eq!(p["paths"][0]["address"], "198.18.0.1/9993");
    assert_eq!(keys(&p["paths"][0]), keys(&zt_peer["paths"][0]));
    let (code, one) = call(&m1_host, "GET", &format!("/peer/{root}"), Some(&token), "");
    assert_eq!(code, 200);
    assert_eq!(one["role"], "PLANET");
    assert_eq!(
        call(&m1_host, "GET", "/peer/0000000001", Some(&token), "").0,
        404
    );

    // Bad requests.
    let (code, e) = call(&m1_host, "GET", "/nope", Some(&token), "");
    assert_eq!(code, 404);
    assert!(e["error"].is_string(), "{e}");
    assert_eq!(
        call(
            &m1_host,
            "GET",
            "/network/ffffffffffffffff",
            Some(&token),
            ""
        )
        .0,
        404
    );
    assert_eq!(call(&m1_host, "PUT", &path, Some(&token), "").0, 405);
    assert_eq!(call(&m1_host, "DELETE", "/status", Some(&token), "").0, 405);
    assert_eq!(
        call(&m1_host, "POST", &path, Some(&token), "{not json").0,
        400
    );
    assert_eq!(
        call(&m1_host, "GET", "/controller", Some(&token), "").0,
        404
    );
    assert!(
        m1.try_status().is_none(),
        "the member exited on bad requests"
    );

    // Runtime join and leave.
    let path2 = format!("/network/{nwid2}");
    let (code, joined) = call(&m1_host, "POST", &path2, Some(&token), "{}");
    assert_eq!(code, 200, "{joined}");
    assert_eq!(joined["nwid"], nwid2.to_string());
    assert!(
        home("m1")
            .join("networks.d")
            .join(format!("{nwid2}.json"))
            .exists()
    );
    let net2 = wait_for(&m1_host, &token, &path2, Duration::from_secs(30), |v| {
        v["assignedAddresses"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    assert!(
        net2["assignedAddresses"][0]
            .as_str()
            .unwrap()
            .starts_with("10.78.0."),
        "{net2}"
    );
    let (code, left) = call(&m1_host, "DELETE", &path2, Some(&token), "");
    assert_eq!(code, 200);
    assert_eq!(left["result"], true);
    assert!(
        !home("m1")
            .join("networks.d")
            .join(format!("{nwid2}.json"))
            .exists()
    );
    assert_eq!(call(&m1_host, "GET", &path2, Some(&token), "").0, 404);
    assert_eq!(call(&m1_host, "DELETE", &path2, Some(&token), "").0, 404);
    let deadline = Instant::now() + Duration::from_secs(5);
    while m1_host
        .run("ip", &["link", "show", "dev", &tap_name(nwid2)])
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the TAP of the left network remains"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The controller's status, on the controller.
    let (code, cs) = call(&ctl_host, "GET", "/controller", Some(&ctl_token), "");
    assert_eq!(code, 200);
    assert_eq!(keys(&cs), keys(&vector("controller-status.json")));
    assert_eq!(cs["controller"], true);
    let (code, ps) = call(&ctl_host, "GET", "/peer", Some(&ctl_token), "");
    assert_eq!(code, 200);
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .any(|p| p["address"] == m1_id.address().to_string() && p["role"] == "LEAF"),
        "{ps}"
    );

    // The controller's networks and members, in ZeroTier One's controller JSON.
    let c = |m: &str, p: &str, b: &str| {
        call(
            &ctl_host,
            m,
            &format!("/controller{p}"),
            Some(&ctl_token),
            b,
        )
    };
    let (code, list) = c("GET", "/network", "");
    assert_eq!(code, 200);
    let list: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        list,
        BTreeSet::from([nwid.to_string().as_str(), nwid2.to_string().as_str()])
    );
    let (code, n) = c("GET", &format!("/network/{nwid}"), "");
    assert_eq!(code, 200, "{n}");
    assert_eq!(
        keys(&n),
        keys(&vector("controller-network-e6acfe87fc3adaf6.json")),
        "{n}"
    );
    assert_eq!(n["name"], "net-10.77.0");
    let (code, members) = c("GET", &format!("/network/{nwid}/member"), "");
    assert_eq!(code, 200);
    assert!(members[m1_id.address().to_string()].is_u64(), "{members}");
    let (code, m) = c(
        "GET",
        &format!("/network/{nwid}/member/{}", m1_id.address()),
        "",
    );
    assert_eq!(code, 200, "{m}");
    assert_eq!(
        keys(&m),
        keys(&vector(
            "controller-network-e6acfe87fc3adaf6-member-e28e6b73a1.json"
        )),
        "{m}"
    );
    assert_eq!(m["authorized"], true);
    assert!(
        m["ipAssignments"][0]
            .as_str()
            .unwrap()
            .starts_with("10.77.0."),
        "{m}"
    );
    let nwid3 = NetworkId::new(root_id.address(), 0x00_0003);
    let (code, n3) = c(
        "POST",
        &format!("/network/{nwid3}"),
        r#"{"name": "made-by-api"}"#,
    );
    assert_eq!(code, 200, "{n3}");
    assert_eq!(n3["name"], "made-by-api");
    assert_eq!(
        c("GET", &format!("/network/{nwid3}"), "").1["name"],
        "made-by-api"
    );
    assert_eq!(c("POST", &format!("/network/{nwid3}"), "{bad").0, 400);
    assert_eq!(
        c("POST", &format!("/network/{nwid3}"), r#"{"mtu": "big"}"#).0,
        400
    );
    assert_eq!(c("GET", "/network/ffffffffffffffff", "").0, 404);
    assert_eq!(
        c("POST", "/network/ffffffffffffffff/member/0000000001", "{}").0,
        404
    );
    assert_eq!(c("PUT", &format!("/network/{nwid3}"), "").0, 405);
    // A pod binding's `ipAssignments` pass through (normalised by the controller).
    let pod = format!("/network/{nwid3}/pod/uid-ips");
    let with_ips = |ips: Value| {
        serde_json::json!({"namespace": "ns", "name": "p",
            "host": m1_id.address().to_string(), "ipAssignments": ips})
        .to_string()
    };
    let reserved = serde_json::json!(["10.79.0.9", "fd00::9"]);
    let (code, b) = c(
        "POST",
        &pod,
        &with_ips(serde_json::json!(["fd00:0:0::9", "10.79.0.9"])),
    );
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["ipAssignments"], reserved, "{b}");
    assert_eq!(c("GET", &pod, "").1["ipAssignments"], reserved);
    let (code, e) = c(
        "POST",
        &format!("/network/{nwid3}/pod/uid-bad"),
        &with_ips(serde_json::json!(["10.79.0.300"])),
    );
    assert_eq!(code, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("ipAssignments"),
        "{e}"
    );
    // An existing binding's reservation is the controller's to change.
    let (code, e) = c("POST", &pod, &with_ips(serde_json::json!(["10.79.0.10"])));
    assert_eq!(code, 409, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("set by the controller"),
        "{e}"
    );
    assert_eq!(c("GET", &pod, "").1["ipAssignments"], reserved);
    let (code, _) = c("DELETE", &format!("/network/{nwid3}"), "");
    assert_eq!(code, 200);
    assert_eq!(c("GET", &format!("/network/{nwid3}"), "").0, 404);
    assert!(
        ctl.try_status().is_none(),
        "the controller exited on bad requests"
    );

    for p in [&mut ctl, &mut m1] {
        p.stop();
    }
    drop(topo);
}

/// Pings `to` once from `host` (1 s wait); true when it answered.
fn ping_once(host: &Host, to: &str) -> bool {
    host.run("ping", &["-c", "1", "-W", "1", to])
        .is_ok_and(|o| o.status.success())
}

/// Pings until `reachable` is what `ping_once` says, at most `limit`; returns how long it took.
fn until_ping(host: &Host, to: &str, reachable: bool, limit: Duration, what: &str) -> Duration {
    let t = Instant::now();
    loop {
        if ping_once(host, to) == reachable {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The controller joins its own network (its member asks the controller next to it, not the
/// network) and pushes changes made through its HTTP API at once: a rules change and a
/// de-authorization take effect within 2 s, not at the members' next 60 s config request.
#[test]
fn controller_pushes_api_changes_and_serves_its_own_member() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let hosts = lan_hosts(&mut topo, &["ctl", "m1", "m2"]);
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| -> PathBuf { dir.path().join(n) };
    let ids: Vec<Identity> = ["ctl", "m1", "m2"]
        .iter()
        .map(|n| new_identity(&home(n)))
        .collect();
    let planet_file = write_lan_planet(dir.path(), &ids[0]);
    let planet_arg = planet_file.to_str().unwrap();
    let nwid = NetworkId::new(ids[0].address(), 0x00_0007);
    write_network(&home("ctl"), nwid, "10.79.0", &[&ids[0], &ids[1], &ids[2]]);
    let join = nwid.to_string();

    let mut agents = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let name = h.name().to_string();
        let mut args = vec!["--planet", planet_arg, "--join", &join];
        if i == 0 {
            args.extend(["--root", "--controller"]);
        }
        agents.push(start_agent(
            h,
            &home(&name),
            &home(&name).join("agent.sock"),
            &args,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !home(&name).join("authtoken.secret").exists() {
            assert!(agents[i].try_status().is_none(), "agent in {name} exited");
            assert!(Instant::now() < deadline, "agent in {name} never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let tokens: Vec<String> = ["ctl", "m1", "m2"]
        .iter()
        .map(|n| std::fs::read_to_string(home(n).join("authtoken.secret")).unwrap())
        .collect();
    // Every member gets its address, the controller's own member included.
    let ips: Vec<String> = hosts
        .iter()
        .zip(&tokens)
        .map(|(h, t)| {
            let v = wait_for(
                h,
                t,
                &format!("/network/{nwid}"),
                Duration::from_secs(30),
                |v| v["status"] == "OK" && v["assignedAddresses"][0].is_string(),
            );
            let a = v["assignedAddresses"][0].as_str().unwrap();
            a.split('/').next().unwrap().to_string()
        })
        .collect();
    eprintln!("addresses: {ips:?}");
    let limit = Duration::from_secs(10);
    until_ping(&hosts[1], &ips[2], true, limit, "m1 -> m2");
    until_ping(
        &hosts[1],
        &ips[0],
        true,
        limit,
        "m1 -> the controller's member",
    );
    until_ping(
        &hosts[0],
        &ips[2],
        true,
        limit,
        "the controller's member -> m2",
    );

    // m2 joins an IPv4 multicast group on its TAP: the agent subscribes its member, and a
    // ping from m1 to the group gets m2's answer.
    let tap = tap_name(nwid);
    let group = "239.77.0.9";
    hosts[2]
        .run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{group}/32"),
                "dev",
                &tap,
                "autojoin",
            ],
        )
        .unwrap();
    hosts[2]
        .run("sysctl", &["-qw", "net.ipv4.icmp_echo_ignore_broadcasts=0"])
        .unwrap();
    let t = Instant::now();
    loop {
        let out = hosts[1]
            .run(
                "ping",
                &["-n", "-c", "1", "-W", "1", "-t", "4", "-I", &tap, group],
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if out.contains(&format!("from {}:", ips[2])) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no answer from m2 to a ping to {group}: {out}"
        );
    }
    eprintln!("multicast group answered after {:?}", t.elapsed());

    let api = |m: &str, p: &str, b: &serde_json::Value| {
        let (code, v) = call(
            &hosts[0],
            m,
            &format!("/controller{p}"),
            Some(&tokens[0]),
            &b.to_string(),
        );
        assert_eq!(code, 200, "{m} {p}: {v}");
    };
    // Rules: drop ICMP. Pushed: enforced within 2 s.
    let bound = Duration::from_secs(2);
    let t = Instant::now();
    api(
        "POST",
        &format!("/network/{nwid}"),
        &serde_json::json!({"rules": [
            {"type": "MATCH_IP_PROTOCOL", "ipProtocol": 1},
            {"type": "ACTION_DROP"},
            {"type": "ACTION_ACCEPT"}
        ]}),
    );
    until_ping(
        &hosts[1],
        &ips[2],
        false,
        bound,
        "ICMP still passes after the drop rule",
    );
    eprintln!("drop rule enforced after {:?}", t.elapsed());
    // The metrics count what went through (published once a second).
    std::thread::sleep(Duration::from_millis(1100));
    let m1_metrics = scrape(&hosts[1]);
    for series in ["packets", "bytes"] {
        for dir in ["rx", "tx"] {
            let s = format!("flatwire_{series}_total{{network=\"{nwid}\",direction=\"{dir}\"}}");
            assert!(
                metric(&m1_metrics, &s) > 0.0,
                "{s} not counted:\n{m1_metrics}"
            );
        }
    }
    // The drop rule acts on the sender's side (tx) or the receiver's (rx).
    let s = format!("flatwire_rule_hits_total{{network=\"{nwid}\",action=\"drop\",direction=");
    assert!(
        m1_metrics
            .lines()
            .filter_map(|l| l.strip_prefix(&s)?.split_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>()
            > 0.0,
        "{s}...}} not counted:\n{m1_metrics}"
    );
    let ctl_metrics = scrape(&hosts[0]);
    let s = r#"flatwire_controller_requests_total{kind="network_config",result="ok"}"#;
    assert!(metric(&ctl_metrics, s) >= 3.0, "{s}:\n{ctl_metrics}");
    assert!(
        ctl_metrics.contains("flatwire_relayed_packets_total "),
        "no relay counter:\n{ctl_metrics}"
    );
    let t = Instant::now();
    api(
        "POST",
        &format!("/network/{nwid}"),
        &serde_json::json!({"rules": [{"type": "ACTION_ACCEPT"}]}),
    );
    until_ping(
        &hosts[1],
        &ips[2],
        true,
        bound,
        "ICMP still dropped after accept-all",
    );
    eprintln!("accept-all enforced after {:?}", t.elapsed());

    // De-authorize m2: the revocation cuts it off from both peers within 2 s.
    let t = Instant::now();
    api(
        "POST",
        &format!("/network/{nwid}/member/{}", ids[2].address()),
        &serde_json::json!({"authorized": false}),
    );
    until_ping(&hosts[1], &ips[2], false, bound, "m1 still reaches m2");
    until_ping(
        &hosts[2],
        &ips[0],
        false,
        bound,
        "m2 still reaches the controller's member",
    );
    eprintln!("m2 cut off after {:?}", t.elapsed());
    assert!(
        ping_once(&hosts[1], &ips[0]),
        "m1 lost the controller's member"
    );
    for a in &mut agents {
        assert!(a.try_status().is_none(), "{} exited", a.name());
        a.stop();
    }
    drop(topo);
}
