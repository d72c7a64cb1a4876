//! Interop of the real `flatwire-agent` with a real ZeroTier One 1.x (`FLATWIRE_ZT_ONE_BIN` =
//! path to `zerotier-one`), with kernel traffic (ping, iperf3) over both sides' TAP devices.
//!
//! Each scenario is its own namespace topology on one bridge with no route out
//! (198.18.0.0/15 only) and a planet of our own, so no node can ever see a public root:
//!
//! * `zt_one_joins_our_agent_controller` (our root): root, controller and one member are
//!   `flatwire-agent`s; a real `zerotier-one` joins the network created through our agent's
//!   ZeroTier-style controller API.
//! * `our_agent_joins_zt_one_controller` (ZeroTier One root): root and controller are real
//!   `zerotier-one` processes (the controller's own node is the second member); our agent
//!   joins the network created through ZeroTier One's controller API.
//!
//! In both, the network's rules (compiled by our compiler) drop TCP port 5201 between members
//! whose `role` tags differ and accept everything else; the two members get different roles.
//! Both must get their controller's IP, ping each other, carry iperf3 on port 5202 in both
//! directions, and never carry a TCP connection to port 5201 in either direction, while the
//! same iperf3 servers answer on the underlay.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::planet::{Profile, agent_binary};
use flatwire_tests::ztlab::{Lab, ZtNode, local_api, tail, wait_for, zt_bin_or_skip, zt_version};
use flatwire_vl1::Identity;
use flatwire_vl2::rules::compiler::compile;
use serde_json::{Value, json};

const SKIP: &str = "SKIPPED: set FLATWIRE_ZT_ONE_BIN to a zerotier-one binary to run the agent interop test with ZeroTier One";

/// Port 5201 is closed between different roles; everything else is open.
const RULES: &str = "
tag role
  id 1
  enum 1 blue
  enum 2 green
;
drop
  not tdiff role 0
  ipprotocol tcp
  dport 5201
;
accept;
";

/// The agents' UDP port (and their HTTP API's TCP port on loopback).
const PORT: u16 = 9993;

fn generate() -> Identity {
    Identity::generate(&AtomicBool::new(false)).expect("generate identity")
}

/// A `flatwire-agent` process's namespace and home.
struct Agent {
    host: Host,
    home: PathBuf,
}

impl Agent {
    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        local_api(&self.host, &self.home, PORT, method, path, body)
    }

    fn log(&self) -> String {
        tail(&self.home.join("out.log"), 30)
    }

    /// Waits until the agent's `/network/<nwid>` is OK with an address; that address.
    fn wait_network_ok(&self, nwid: &str, secs: u64, extra: impl Fn() -> String) -> String {
        wait_for(
            &format!("our agent reports {nwid} OK with an address"),
            secs,
            || {
                format!(
                    "{:?}\n{}\n{}",
                    self.api("GET", &format!("/network/{nwid}"), None),
                    self.log(),
                    extra()
                )
            },
            || {
                let n = self.api("GET", &format!("/network/{nwid}"), None).ok()?;
                (n["status"].as_str() == Some("OK")).then_some(())?;
                n["assignedAddresses"]
                    .as_array()?
                    .iter()
                    .filter_map(|a| a.as_str())
                    .find(|a| !a.contains(':'))
                    .map(|a| a.split('/').next().unwrap_or(a).to_owned())
            },
        )
    }
}

/// Starts `flatwire-agent` on host `i` of `lab` with identity `id` and `extra` flags; waits
/// until its HTTP API answers.
fn agent(lab: &mut Lab, i: usize, name: &str, bin: &Path, id: &Identity, extra: &[&str]) -> Agent {
    let home = lab.dir.path().join(name);
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("identity.secret"),
        format!("{}\n", id.to_secret_string().unwrap()),
    )
    .unwrap();
    std::fs::write(home.join("identity.public"), format!("{id}\n")).unwrap();
    let mut cmd = format!(
        "RUST_LOG=info exec {} --home {h} --port {PORT} --planet {p} --socket {h}/agent.sock --metrics-listen 127.0.0.1:9994 --identity-pool 0",
        bin.display(),
        h = home.display(),
        p = lab.planet_file.display(),
    );
    for e in extra {
        cmd.push(' ');
        cmd.push_str(e);
    }
    cmd.push_str(&format!(" >{}/out.log 2>&1", home.display()));
    let host = lab.hosts[i].clone();
    lab.t.spawn(&host, "sh", &["-c", &cmd]).unwrap();
    let a = Agent { host, home };
    wait_for(
        &format!("agent {name} answers its HTTP API"),
        30,
        || a.log(),
        || a.api("GET", "/status", None).ok(),
    );
    a
}

/// The network body for a ZeroTier-style controller API: private, an IPv4 pool, its route
/// and [`RULES`] with its tags.
fn network_body(name: &str, prefix: &str) -> Value {
    let compiled = compile(RULES).expect("the rules compile");
    let cli = compiled.to_cli_json().to_value();
    json!({
        "name": name,
        "private": true,
        "v4AssignMode": {"zt": true},
        "ipAssignmentPools": [{"ipRangeStart": format!("{prefix}.10"), "ipRangeEnd": format!("{prefix}.50")}],
        "routes": [{"target": format!("{prefix}.0/24"), "via": null}],
        "rules": cli["config"]["rules"],
        "tags": cli["config"]["tags"],
    })
}

/// Creates network `nwid` (pool `<prefix>.10-50`, [`RULES`]) through a ZeroTier-style
/// controller API (`post(path, body)`) and authorizes `members` with their roles.
fn create_network(
    post: impl Fn(&str, &Value) -> Result<Value, String>,
    nwid: &str,
    name: &str,
    prefix: &str,
    members: &[(flatwire_vl1::Address, u64)],
) {
    let created = post(
        &format!("/controller/network/{nwid}"),
        &network_body(name, prefix),
    )
    .expect("create the network");
    assert_eq!(created["id"].as_str(), Some(nwid), "{created}");
    for (who, role) in members {
        post(
            &format!("/controller/network/{nwid}/member/{who}"),
            &json!({"authorized": true, "tags": [[1, role]]}),
        )
        .expect("authorize a member");
    }
}

/// Waits until ZeroTier One reports `nwid` OK with an IPv4 address; that address.
fn wait_zt_ok(z: &ZtNode, nwid: &str, secs: u64, extra: impl Fn() -> String) -> String {
    wait_for(
        &format!("ZeroTier One reports {nwid} OK with an address"),
        secs,
        || format!("network: {:?}\n{}\n{}", z.network(nwid), z.diag(), extra()),
        || {
            let n = z.network(nwid)?;
            (n["status"].as_str() == Some("OK")).then_some(())?;
            n["assignedAddresses"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str())
                .find(|a| !a.contains(':'))
                .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        },
    )
}

fn ping(from: &Host, to: &str) -> Result<String, String> {
    let out = from
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", to])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Runs an iperf3 client in `from` to `to:port` for 2 s; its received bits per second, or the
/// error text.
fn iperf(from: &Host, to: &str, port: u16) -> Result<f64, String> {
    let out = from
        .command("timeout")
        .args([
            "15",
            "iperf3",
            "-J",
            "-t",
            "2",
            "--connect-timeout",
            "2000",
            "-c",
            to,
            "-p",
        ])
        .arg(port.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) if out.status.success() => Ok(bps),
        _ => Err(format!(
            "iperf3 -c {to} -p {port}: {}{}",
            v["error"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Kernel traffic between member A (`a`, overlay IP `a_ip`, underlay `a_under`) and member B:
/// ping both ways, iperf3 on 5202 both ways, TCP 5201 refused by the tag rule both ways
/// while the same servers answer on the underlay.
#[allow(clippy::too_many_arguments)]
fn traffic(
    t: &mut Topology,
    tag: &str,
    a: &Host,
    a_ip: &str,
    a_under: &str,
    b: &Host,
    b_ip: &str,
    b_under: &str,
    diag: &dyn Fn() -> String,
) {
    let pass = |what: &str| println!("PASS {tag} {what}");
    for (h, port) in [(a, "5201"), (a, "5202"), (b, "5201"), (b, "5202")] {
        t.spawn(
            h,
            "sh",
            &["-c", &format!("exec iperf3 -s -p {port} >/dev/null")],
        )
        .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (a_name, b_name) = (a.name().to_owned(), b.name().to_owned());
    for (from, to, to_ip) in [(a, &b_name, b_ip), (b, &a_name, a_ip)] {
        let out = wait_for(
            &format!(
                "ping from {} to {to} ({to_ip}) over the overlay",
                from.name()
            ),
            30,
            diag,
            || ping(from, to_ip).ok(),
        );
        let summary = out.lines().last().unwrap_or_default().to_owned();
        pass(&format!(
            "ping {} -> {to} over the overlay: {summary}",
            from.name()
        ));
    }
    for (from, to, to_ip, to_under) in [(a, &b_name, b_ip, b_under), (b, &a_name, a_ip, a_under)] {
        let bps = iperf(from, to_ip, 5202).unwrap_or_else(|e| panic!("{e}\n{}", diag()));
        assert!(bps > 1e6, "iperf3 {} -> {to}: {bps} bit/s", from.name());
        pass(&format!(
            "iperf3 {} -> {to} on port 5202 over the overlay: {:.0} Mbit/s",
            from.name(),
            bps / 1e6
        ));
        let under = iperf(from, to_under, 5201).unwrap_or_else(|e| panic!("underlay: {e}"));
        assert!(
            under > 1e6,
            "the 5201 server on {to} answers on the underlay"
        );
        let blocked = iperf(from, to_ip, 5201);
        assert!(
            blocked.is_err(),
            "TCP 5201 {} -> {to} crossed the overlay although the roles differ: {blocked:?}",
            from.name()
        );
        pass(&format!(
            "TCP 5201 {} -> {to} is dropped by the role tag rule on the overlay (its server answers on the underlay)",
            from.name()
        ));
    }
}

/// The `zerotier-one` binary (or `None` after saying the test skips), its version and our
/// agent binary.
fn binaries(tag: &str) -> Option<(PathBuf, String, PathBuf)> {
    let zt = zt_bin_or_skip(SKIP)?;
    let version = zt_version(&zt);
    println!("{tag} ZeroTier One version {version}");
    let bin = agent_binary(Profile::Debug).expect("build flatwire-agent");
    Some((zt, version, bin))
}

#[test]
fn zt_one_joins_our_agent_controller() {
    let tag = "[ZeroTier One member, our agent controller, our root]";
    let Some((zt, version, bin)) = binaries(tag) else {
        return;
    };
    let (root_id, ctl_id, fw_id, zt_id) = (generate(), generate(), generate(), generate());
    let mut lab = Lab::new(24, &["root", "ctl", "fw", "zt"], &root_id);
    let _root = agent(&mut lab, 0, "root", &bin, &root_id, &["--root"]);
    let ctl = agent(&mut lab, 1, "ctl", &bin, &ctl_id, &["--controller"]);
    let fw = agent(&mut lab, 2, "fw", &bin, &fw_id, &[]);

    let nwid = format!("{}c0ffee", ctl_id.address());
    create_network(
        |path, body| ctl.api("POST", path, Some(body)),
        &nwid,
        "agent-interop",
        "10.79.0",
        &[(fw_id.address(), 1), (zt_id.address(), 2)],
    );
    println!(
        "PASS {tag} network with compiled tag rules created through our agent's controller API"
    );

    let z = lab.zt(3, "zt", &zt, &zt_id);
    z.cli(&["join", &nwid]).expect("zerotier-cli join");
    fw.api("POST", &format!("/network/{nwid}"), Some(&json!({})))
        .expect("join through our agent's API");
    let z_ip = wait_zt_ok(&z, &nwid, 90, || ctl.log());
    let f_ip = fw.wait_network_ok(&nwid, 60, || ctl.log());
    assert!(z_ip.starts_with("10.79.0.") && f_ip.starts_with("10.79.0."));
    println!(
        "PASS {tag} both members have their controller's IP: ZeroTier One {z_ip}, our agent {f_ip}"
    );

    let (fw_host, z_host) = (fw.host.clone(), z.host.clone());
    let diag = || format!("{}\n{}", fw.log(), z.diag());
    let (f_under, z_under) = (lab.ip(2), lab.ip(3));
    traffic(
        &mut lab.t, tag, &fw_host, &f_ip, &f_under, &z_host, &z_ip, &z_under, &diag,
    );
    println!("{tag} all checks passed with ZeroTier One {version}");
}

#[test]
fn our_agent_joins_zt_one_controller() {
    let tag = "[our agent member, ZeroTier One controller, ZeroTier One root]";
    let Some((zt, version, bin)) = binaries(tag) else {
        return;
    };
    let (root_id, ctl_id, fw_id) = (generate(), generate(), generate());
    let mut lab = Lab::new(25, &["root", "ctl", "fw"], &root_id);
    let _root = lab.zt(0, "ztroot", &zt, &root_id);
    let c = lab.zt(1, "ztctl", &zt, &ctl_id);
    c.wait_peer(
        "the ZeroTier One controller reaches the root",
        &root_id.address().to_string(),
        &lab.ip(0),
        90,
    );
    let nwid = format!("{}c0ffee", ctl_id.address());
    create_network(
        |path, body| c.api(path, Some(body)),
        &nwid,
        "zt-agent-interop",
        "10.80.0",
        &[(fw_id.address(), 1), (ctl_id.address(), 2)],
    );
    println!(
        "PASS {tag} network with our compiled tag rules created through ZeroTier One's controller API"
    );

    let fw = agent(&mut lab, 2, "fw", &bin, &fw_id, &[]);
    fw.api("POST", &format!("/network/{nwid}"), Some(&json!({})))
        .expect("join through our agent's API");
    c.cli(&["join", &nwid]).expect("zerotier-cli join");
    let f_ip = fw.wait_network_ok(&nwid, 90, || c.diag());
    let z_ip = wait_zt_ok(&c, &nwid, 90, || fw.log());
    assert!(z_ip.starts_with("10.80.0.") && f_ip.starts_with("10.80.0."));
    println!(
        "PASS {tag} both members have the ZeroTier One controller's IP: ours {f_ip}, its own node {z_ip}"
    );

    let (fw_host, z_host) = (fw.host.clone(), c.host.clone());
    let diag = || format!("{}\n{}", fw.log(), c.diag());
    let (f_under, z_under) = (lab.ip(2), lab.ip(1));
    traffic(
        &mut lab.t, tag, &fw_host, &f_ip, &f_under, &z_host, &z_ip, &z_under, &diag,
    );
    println!("{tag} all checks passed with ZeroTier One {version}");
}
