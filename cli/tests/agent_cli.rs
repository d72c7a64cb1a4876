//! The `flatwire` node and controller commands against the real `flatwire-agent` binary.
//!
//! Agents run in harness network namespaces on one switch (198.18.0.0/24): one with
//! `--root --controller`, the only root of a planet of our own, and a plain member. The CLI
//! runs inside each namespace with its defaults (API on 127.0.0.1:9993, token from
//! `--home`), so nothing leaves the namespaces. Error paths (usage errors, an agent that is
//! down, a missing token) need no agent and use the root namespace's loopback only.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flatwire_tests::netns::{Host, Switch, Topology};
use flatwire_tests::planet::{Profile, agent_binary};
use flatwire_tests::process::Proc;
use flatwire_vl1::Identity;
use serde_json::Value;

const FLATWIRE: &str = env!("CARGO_BIN_EXE_flatwire");

/// The `flatwire-agent` binary of this workspace (cargo offers `CARGO_BIN_EXE_*` only for the
/// package's own binaries).
fn agent_bin() -> PathBuf {
    agent_binary(Profile::Debug).expect("build flatwire-agent")
}

/// What a `flatwire` run printed and returned.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    fn ok(self, what: &str) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: stdout {}\nstderr {}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Asserts success and parses stdout as JSON.
    fn json(self, what: &str) -> Value {
        let out = self.ok(what);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {out}"))
    }

    /// Asserts exit `code`, nothing on stdout, and returns stderr.
    fn fails(self, code: i32, what: &str) -> String {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: stdout {}\nstderr {}",
            self.stdout,
            self.stderr
        );
        assert!(self.stdout.is_empty(), "{what}: stdout {}", self.stdout);
        self.stderr
    }
}

/// `flatwire ARGS` in the root namespace.
fn flatwire(args: &[&str]) -> Run {
    Run::new(
        Command::new(FLATWIRE)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run flatwire"),
    )
}

#[test]
fn bad_ids_and_inputs_are_usage_errors_before_any_request() {
    // An API address that records any connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let api = listener.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let bad_rules = dir.path().join("bad.rules");
    std::fs::write(&bad_rules, "accept;\ndrop bogus 1;\n").unwrap();
    let bad_rules = bad_rules.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["join", "xyz"], "a network ID is 16 hex digits"),
        (
            &["leave", "8056c2e21c00000g"],
            "a network ID is 16 hex digits",
        ),
        (
            &["controller", "network", "show", "8056c2e21c"],
            "16 hex digits",
        ),
        (
            &[
                "controller",
                "member",
                "show",
                "8056c2e21c000001",
                "e28e6b73a",
            ],
            "an address is 10 hex digits",
        ),
        (
            &[
                "controller",
                "member",
                "authorize",
                "8056c2e21c000001",
                "zz8e6b73a1",
            ],
            "an address is 10 hex digits",
        ),
        (
            &["controller", "network", "create", "1234567"],
            "6 hex digits",
        ),
        (
            &["controller", "network", "create", "--pool", "10.0.0.1"],
            "is not START-END",
        ),
        (
            &[
                "controller",
                "network",
                "create",
                "--pool",
                "10.0.0.1-10.0.0.x",
            ],
            "is not an IP address",
        ),
        (
            &["controller", "network", "create", "--rules-file", bad_rules],
            "line 2 column",
        ),
        (
            &["controller", "network", "create", "--private", "--public"],
            "cannot be used",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expect) in cases {
        let mut all = vec!["--api", api.as_str(), "--token", "t"];
        all.extend_from_slice(args);
        let err = flatwire(&all).fails(2, &format!("{args:?}"));
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("a usage error contacted the agent: {other:?}"),
    }
    // --help everywhere.
    for args in [
        &["--help"][..],
        &["status", "--help"],
        &["networks", "--help"],
        &["peers", "--help"],
        &["join", "--help"],
        &["leave", "--help"],
        &["controller", "--help"],
        &["controller", "network", "--help"],
        &["controller", "network", "create", "--help"],
        &["controller", "network", "show", "--help"],
        &["controller", "network", "list", "--help"],
        &["controller", "member", "--help"],
        &["controller", "member", "list", "--help"],
        &["controller", "member", "show", "--help"],
        &["controller", "member", "authorize", "--help"],
        &["controller", "member", "deauthorize", "--help"],
    ] {
        let out = flatwire(args).ok(&format!("{args:?}"));
        assert!(out.contains("Usage: flatwire"), "{args:?}: {out}");
        assert!(out.contains("--token"), "{args:?}: {out}");
    }
}

#[test]
fn an_agent_that_is_down_or_a_missing_token_is_named() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = port.to_string();
    let addr = format!("127.0.0.1:{port}");
    for args in [
        &["--port", p.as_str(), "--token", "t", "status"][..],
        &["--api", addr.as_str(), "--token", "t", "networks"],
        &[
            "--port",
            p.as_str(),
            "--token",
            "t",
            "controller",
            "network",
            "list",
        ],
    ] {
        let err = flatwire(args).fails(3, &format!("{args:?}"));
        assert!(
            err.contains(&format!("cannot reach the flatwire agent at {addr}")),
            "{err}"
        );
        assert!(err.contains("Is flatwire-agent running?"), "{err}");
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let err = flatwire(&["--home", h, "--port", p.as_str(), "peers"]).fails(4, "no token");
    assert!(
        err.contains(&format!(
            "cannot read the API token from {h}/authtoken.secret"
        )),
        "{err}"
    );
    assert!(err.contains("--token-file"), "{err}");
}

/// A `flatwire-agent` in a namespace of its own, and the CLI run there.
struct Node {
    host: Host,
    home: PathBuf,
    address: String,
    agent: Proc,
}

impl Node {
    /// `flatwire --home HOME ARGS` inside the namespace (default port and address).
    fn cli(&self, args: &[&str]) -> Run {
        let mut cmd = self.host.command(FLATWIRE);
        cmd.arg("--home").arg(&self.home).args(args);
        Run::new(cmd.stdin(Stdio::null()).output().expect("run flatwire"))
    }

    /// Polls `flatwire -j ARGS` until `done` holds (at most `secs`).
    fn wait_json(&self, args: &[&str], secs: u64, done: impl Fn(&Value) -> bool) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.cli(&all).json(&format!("{args:?}"));
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{args:?} never satisfied: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Hosts on one switch (198.18.0.0/24); the first runs the root and controller.
struct Lab {
    ctl: Node,
    topo: Topology,
    lan: Switch,
    planet: PathBuf,
    dir: tempfile::TempDir,
}

/// Makes a host identity in `home` with our own idtool (the agent's file layout).
fn identity(home: &Path) -> Identity {
    std::fs::create_dir_all(home).unwrap();
    let (secret, public) = (home.join("identity.secret"), home.join("identity.public"));
    flatwire(&[
        "idtool",
        "generate",
        secret.to_str().unwrap(),
        public.to_str().unwrap(),
    ])
    .ok("idtool generate");
    std::fs::read_to_string(&public)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Starts the agent of `host` (state in `home`) and waits until `flatwire status` answers.
fn start_agent(host: Host, home: PathBuf, id: &Identity, planet: &Path, extra: &[&str]) -> Node {
    let mut cmd = host.command(agent_bin());
    cmd.arg("--home")
        .arg(&home)
        .arg("--socket")
        .arg(home.join("agent.sock"))
        .arg("--planet")
        .arg(planet)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    let agent = Proc::spawn(&format!("flatwire-agent in {}", host.name()), &mut cmd).unwrap();
    let mut node = Node {
        host,
        home,
        address: id.address().to_string(),
        agent,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = node.cli(&["status"]);
        if r.code == Some(0) {
            return node;
        }
        assert!(
            node.agent.try_status().is_none(),
            "the agent exited: {}",
            r.stderr
        );
        assert!(
            Instant::now() < deadline,
            "the agent's API never answered: {}",
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Lab {
    fn start() -> Self {
        let mut topo =
            Topology::new().expect("a network namespace (this test needs root and `ip netns`)");
        let mut lan = topo.switch("lan").unwrap();
        let host = topo.host("ctl").unwrap();
        topo.plug(&mut lan, &host, "198.18.0.1/24").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("ctl");
        let id = identity(&home);
        let planet = dir.path().join("planet");
        std::fs::write(
            &planet,
            flatwire_tests::zt_planet!(id, "198.18.0.1:9993".parse().unwrap()),
        )
        .unwrap();
        let ctl = start_agent(host, home, &id, &planet, &["--root", "--controller"]);
        Self {
            ctl,
            topo,
            lan,
            planet,
            dir,
        }
    }

    /// A member host at `198.18.0.N` with a plain agent.
    fn member(&mut self, name: &str, n: u8) -> Node {
        let host = self.topo.host(name).unwrap();
        self.topo
            .plug(&mut self.lan, &host, &format!("198.18.0.{n}/24"))
            .unwrap();
        let home = self.dir.path().join(name);
        let id = identity(&home);
        start_agent(host, home, &id, &self.planet, &[])
    }
}

#[test]
fn node_and_controller_commands_against_a_real_agent() {
    let mut lab = Lab::start();
    let ctl = &lab.ctl;
    let me_owned = ctl.address.clone();
    let me = me_owned.as_str();

    // status: human and JSON.
    let human = ctl.cli(&["status"]).ok("status");
    assert!(human.contains(&format!("address       {me}")), "{human}");
    assert!(human.contains("version       1.14.1"), "{human}");
    assert!(human.contains("port          9993"), "{human}");
    let st = ctl.cli(&["-j", "status"]).json("status -j");
    assert_eq!(st["address"], me);
    assert_eq!(st["config"]["settings"]["primaryPort"], 9993);

    // A wrong token: exit 4, says where the token comes from.
    let err = ctl
        .cli(&["--token", "wrongwrongwrongwrongwron", "networks"])
        .fails(4, "wrong token");
    assert!(
        err.contains("refused the API token from --token (401"),
        "{err}"
    );
    assert!(err.contains("authtoken.secret"), "{err}");
    let token_file = ctl.home.join("authtoken.secret");
    ctl.cli(&["--token-file", token_file.to_str().unwrap(), "status"])
        .ok("--token-file");

    // peers and networks before anything is joined.
    let peers = ctl.cli(&["-j", "peers"]).json("peers -j");
    assert!(peers.is_array(), "{peers}");
    let human = ctl.cli(&["peers"]).ok("peers");
    assert!(
        human.starts_with("ADDRESS") || human == "no peers\n",
        "{human}"
    );
    assert_eq!(
        ctl.cli(&["networks"]).ok("networks"),
        "no networks joined\n"
    );
    assert_eq!(
        ctl.cli(&["-j", "listnetworks"]).json("networks"),
        Value::Array(vec![])
    );

    // controller network create: pools, routes, rules compiled by the rules compiler.
    let rules = ctl.home.join("lab.rules");
    let rules_src = "tag role\n  id 1\n  default 0\n;\ndrop not ethertype ipv4 and not ethertype arp;\naccept;\n";
    std::fs::write(&rules, rules_src).unwrap();
    let compiled = flatwire(&["rules", "compile", rules.to_str().unwrap()]).json("rules compile");
    let created = ctl
        .cli(&[
            "-j",
            "controller",
            "network",
            "create",
            "--name",
            "lab",
            "--pool",
            "10.77.0.10-10.77.0.99",
            "--route",
            "10.77.0.0/24",
            "--rules-file",
            rules.to_str().unwrap(),
        ])
        .json("create lab");
    let lab_id = created["id"].as_str().unwrap().to_owned();
    assert!(lab_id.starts_with(me), "{lab_id} is not {me}'s");
    assert_eq!(created["name"], "lab");
    assert_eq!(created["private"], true);
    assert_eq!(
        created["ipAssignmentPools"],
        serde_json::json!([{"ipRangeStart": "10.77.0.10", "ipRangeEnd": "10.77.0.99"}])
    );
    assert_eq!(created["routes"][0]["target"], "10.77.0.0/24");
    assert_eq!(created["v4AssignMode"]["zt"], true);
    assert_eq!(created["rules"], compiled["config"]["rules"]);
    assert_eq!(created["tags"], compiled["config"]["tags"]);
    assert_eq!(created["rulesSource"], rules_src);

    // A public one by suffix, human output; creating it again is refused.
    let open_id = format!("{me}00002a");
    let human = ctl
        .cli(&["controller", "network", "create", "--public", "00002a"])
        .ok("create by suffix");
    assert!(
        human.starts_with(&format!("created network {open_id}\n")),
        "{human}"
    );
    assert!(human.contains("type             PUBLIC"), "{human}");
    let err = ctl
        .cli(&["controller", "network", "create", &open_id])
        .fails(1, "create twice");
    assert!(err.contains("already exists"), "{err}");
    let err = ctl
        .cli(&["controller", "network", "create", "8056c2e21c000001"])
        .fails(2, "another controller's network");
    assert!(err.contains("belongs to controller 8056c2e21c"), "{err}");
    let err = ctl
        .cli(&["controller", "network", "create", "--route", "10.1.0.0/99"])
        .fails(1, "bad route");
    assert!(err.contains("routes") && err.contains("HTTP 400"), "{err}");

    // list and show.
    let list = ctl
        .cli(&["-j", "controller", "network", "list"])
        .json("list");
    let mut ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want = vec![lab_id.as_str(), open_id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    let human = ctl.cli(&["controller", "network", "list"]).ok("list");
    assert!(human.starts_with("NWID"), "{human}");
    let lab_line = human.lines().find(|l| l.starts_with(&lab_id)).unwrap();
    assert!(
        lab_line.contains("lab") && lab_line.contains("PRIVATE"),
        "{lab_line}"
    );
    assert!(lab_line.contains("10.77.0.10-10.77.0.99"), "{lab_line}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with(&open_id) && l.contains("PUBLIC"))
    );
    let human = ctl
        .cli(&["controller", "network", "show", &lab_id])
        .ok("show");
    assert!(human.contains("name             lab\n"), "{human}");
    assert!(
        human.contains("assign           IPv4 from pools\n"),
        "{human}"
    );
    assert!(
        human.contains("rules            4 rules, 0 capabilities, 1 tags\n"),
        "{human}"
    );
    let shown = ctl
        .cli(&["-j", "controller", "network", "show", &lab_id])
        .json("show -j");
    assert_eq!(shown["id"], lab_id);
    let unknown = format!("{me}ffffff");
    let err = ctl
        .cli(&["controller", "network", "show", &unknown])
        .fails(1, "show unknown");
    assert!(
        err.contains(&format!("network {unknown}: no such network (HTTP 404)")),
        "{err}"
    );

    // Members: pre-authorize an address, show, list, deauthorize.
    let peer = "e28e6b73a1";
    let human = ctl
        .cli(&["controller", "member", "authorize", &lab_id, peer])
        .ok("authorize");
    assert!(
        human.starts_with(&format!("authorized {peer} on {lab_id}\n")),
        "{human}"
    );
    assert!(human.contains("authorized     yes (by api)\n"), "{human}");
    let m = ctl
        .cli(&["-j", "controller", "member", "show", &lab_id, peer])
        .json("member show");
    assert_eq!(m["authorized"], true);
    assert_eq!(m["address"], peer);
    let human = ctl
        .cli(&["controller", "member", "list", &lab_id])
        .ok("member list");
    assert!(human.starts_with("ADDRESS"), "{human}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with(peer) && l.contains("yes")),
        "{human}"
    );
    let members = ctl
        .cli(&["-j", "controller", "member", "list", &lab_id])
        .json("member list -j");
    assert!(members[peer].is_u64(), "{members}");
    let m = ctl
        .cli(&["-j", "controller", "member", "deauthorize", &lab_id, peer])
        .json("deauthorize");
    assert_eq!(m["authorized"], false);
    let human = ctl
        .cli(&["controller", "member", "show", &lab_id, peer])
        .ok("member show");
    assert!(human.contains("authorized     no\n"), "{human}");
    let err = ctl
        .cli(&["controller", "member", "deauthorize", &lab_id, "0123456789"])
        .fails(1, "deauthorize unknown");
    assert!(
        err.contains(&format!(
            "member 0123456789 of network {lab_id}: no such member (HTTP 404)"
        )),
        "{err}"
    );
    let err = ctl
        .cli(&["controller", "member", "show", &lab_id, "0123456789"])
        .fails(1, "show unknown member");
    assert!(err.contains("no such member (HTTP 404)"), "{err}");
    let err = ctl
        .cli(&["controller", "member", "list", &unknown])
        .fails(1, "members of unknown");
    assert!(err.contains("no such network (HTTP 404)"), "{err}");
    assert_eq!(
        ctl.cli(&["controller", "member", "list", &open_id])
            .ok("no members"),
        format!("no members in network {open_id}\n")
    );

    // join/leave: a network whose controller does not exist stays REQUESTING_CONFIGURATION.
    let far = "deadbeef42000001";
    let human = ctl.cli(&["join", far]).ok("join");
    assert!(human.starts_with(&format!("joined {far}\n")), "{human}");
    assert!(human.contains("REQUESTING_CONFIGURATION"), "{human}");
    let nets = ctl.cli(&["-j", "networks"]).json("networks -j");
    assert_eq!(nets[0]["nwid"], far);
    assert_eq!(nets[0]["status"], "REQUESTING_CONFIGURATION");
    let human = ctl.cli(&["networks"]).ok("networks");
    assert!(human.starts_with("NWID"), "{human}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with(far) && l.contains("REQUESTING_CONFIGURATION")),
        "{human}"
    );
    assert_eq!(
        ctl.cli(&["leave", far]).ok("leave"),
        format!("left {far}\n")
    );
    let err = ctl.cli(&["leave", far]).fails(1, "leave twice");
    assert!(
        err.contains(&format!("network {far}: no such network (HTTP 404)")),
        "{err}"
    );
    assert_eq!(
        ctl.cli(&["networks"]).ok("networks"),
        "no networks joined\n"
    );

    // A member on another host joins the private network: it is listed unauthorized,
    // gets its address once authorized, and loses the network when deauthorized.
    let m1 = lab.member("m1", 2);
    let ctl = &lab.ctl;
    let who = m1.address.as_str();
    let st = m1.wait_json(&["status"], 20, |v| v["online"] == true);
    assert_eq!(st["address"], who);
    let human = m1.cli(&["status"]).ok("m1 status");
    assert!(human.contains("state         ONLINE\n"), "{human}");
    let err = m1
        .cli(&["controller", "network", "list"])
        .fails(1, "controller command on a plain agent");
    assert!(
        err.contains(
            "does not run the network controller (start flatwire-agent with --controller)"
        ),
        "{err}"
    );
    let joined = m1.cli(&["-j", "join", &lab_id]).json("join lab");
    assert_eq!(joined["nwid"], lab_id);
    let members = ctl.wait_json(&["controller", "member", "list", &lab_id], 30, |v| {
        v.get(who).is_some()
    });
    assert!(members[who].is_u64(), "{members}");
    let human = ctl
        .cli(&["controller", "member", "show", &lab_id, who])
        .ok("member show m1");
    assert!(human.contains("authorized     no\n"), "{human}");
    let net = m1.wait_json(&["networks"], 30, |v| v[0]["status"] == "ACCESS_DENIED");
    assert_eq!(net[0]["nwid"], lab_id);
    ctl.cli(&["controller", "member", "authorize", &lab_id, who])
        .ok("authorize m1");
    let t = Instant::now();
    let net = m1.wait_json(&["networks"], 60, |v| {
        v[0]["status"] == "OK"
            && v[0]["assignedAddresses"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });
    eprintln!("authorize -> OK on the member: {:?}", t.elapsed());
    let ip = net[0]["assignedAddresses"][0].as_str().unwrap().to_owned();
    assert!(ip.starts_with("10.77.0.") && ip.ends_with("/24"), "{net}");
    assert_eq!(net[0]["name"], "lab");
    let human = m1.cli(&["networks"]).ok("m1 networks");
    let line = human.lines().find(|l| l.starts_with(&lab_id)).unwrap();
    assert!(
        line.contains(" lab ") && line.contains(" OK ") && line.contains(&ip),
        "{line}"
    );
    let human = ctl
        .cli(&["controller", "member", "list", &lab_id])
        .ok("member list");
    let line = human.lines().find(|l| l.starts_with(who)).unwrap();
    assert!(
        line.contains("yes") && line.contains(ip.split('/').next().unwrap()),
        "{line}"
    );
    let peers = m1.cli(&["peers"]).ok("m1 peers");
    assert!(
        peers
            .lines()
            .any(|l| l.starts_with(me) && l.contains("PLANET") && l.contains("198.18.0.1/9993")),
        "{peers}"
    );
    ctl.cli(&["controller", "member", "deauthorize", &lab_id, who])
        .ok("deauthorize m1");
    let m = ctl
        .cli(&["-j", "controller", "member", "show", &lab_id, who])
        .json("member show m1");
    assert_eq!(m["authorized"], false);
    m1.cli(&["-j", "leave", &lab_id]).json("leave lab");
}
