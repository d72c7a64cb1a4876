//! STATUS, DEL and GC against the real `flatwire-agent` (needs root): a root agent and a node
//! agent in harness namespaces with a planet of our own; the plugin installed by its own
//! install step and driven by the real `cnitool` and directly; its cold-start time measured.

use std::path::Path;
use std::time::{Duration, Instant};

use flatwire_tests::netns::Topology;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod common;

use common::{
    CniEnv, assert_cni_error, assert_root, netconf, new_identity, plugin, start_agent, wait_socket,
    write_planet,
};

const NWID: &str = "8056c2e21c000001";

/// Runs `f` (one plugin invocation that must succeed) `n` times; returns the median wall
/// time and the mean CPU time (user + system) the plugin processes used.
fn cold_start(n: u32, f: impl Fn() -> common::Run) -> (Duration, Duration) {
    let cpu = || {
        let u = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
        };
        tv(u.user_time()) + tv(u.system_time())
    };
    let cpu_before = cpu();
    let mut walls: Vec<Duration> = (0..n)
        .map(|_| {
            let run = f();
            assert!(run.ok, "{run:?}");
            run.took
        })
        .collect();
    let cpu_used = cpu() - cpu_before;
    walls.sort();
    (walls[walls.len() / 2], cpu_used / n)
}

fn status(socket: &Path) -> common::Run {
    plugin(
        &[("CNI_COMMAND", "STATUS")],
        &netconf("1.1.0", socket, serde_json::json!({})),
    )
}

#[test]
fn status_follows_the_agent_and_del_and_gc_are_idempotent() {
    assert_root();
    let mut topo = Topology::new().unwrap();
    let mut lan = topo.switch("lan").unwrap();
    let ctl = topo.host("ctl").unwrap();
    let node = topo.host("node").unwrap();
    let pod = topo.host("pod").unwrap();
    topo.plug(&mut lan, &ctl, "198.18.0.1/24").unwrap();
    topo.plug(&mut lan, &node, "198.18.0.2/24").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root_id = new_identity(&dir.path().join("ctl"));
    let planet = dir.path().join("planet");
    write_planet(&planet, &root_id, "198.18.0.1:9993");
    let planet = planet.to_str().unwrap();
    let socket = dir.path().join("node/agent.sock");
    let cni = CniEnv::install(NWID, &socket);

    // No agent yet: STATUS is "plugin not available", naming the socket.
    let run = status(&socket);
    let err = assert_cni_error(&run, 50);
    assert!(
        err["msg"].as_str().unwrap().contains("cannot reach"),
        "{err}"
    );
    assert!(err["msg"].as_str().unwrap().contains("agent.sock"), "{err}");
    let tool = cni.cnitool(&node, "status", pod.netns_path(), &[]);
    assert!(!tool.ok, "cnitool status succeeded without an agent");
    assert!(tool.stderr.contains("start flatwire-agent"), "{tool:?}");

    let ctl_sock = dir.path().join("ctl/agent.sock");
    let mut root = start_agent(
        &ctl,
        &dir.path().join("ctl"),
        &ctl_sock,
        &["--planet", planet, "--root"],
    );
    wait_socket(&mut root, &ctl_sock, Duration::from_secs(10));
    let mut agent = start_agent(
        &node,
        &dir.path().join("node"),
        &socket,
        &["--planet", planet],
    );
    wait_socket(&mut agent, &socket, Duration::from_secs(10));

    // Ready once the root answered; until then code 50 with the agent's reasons.
    let started = Instant::now();
    loop {
        let run = status(&socket);
        if run.ok {
            assert!(run.stdout.is_empty(), "STATUS prints nothing: {run:?}");
            break;
        }
        let err = assert_cni_error(&run, 50);
        assert!(err["msg"].as_str().unwrap().contains("not ready"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agent is not ready after 20 s: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("agent ready for STATUS after {:?}", started.elapsed());
    let tool = cni.cnitool(&node, "status", pod.netns_path(), &[]);
    assert!(tool.ok, "cnitool status: {tool:?}");

    // Cold start: the plugin is a fresh process per call.
    let conf = netconf("1.1.0", &socket, serde_json::json!({}));
    let (version_p50, version_cpu) =
        cold_start(50, || plugin(&[("CNI_COMMAND", "VERSION")], &conf));
    let (status_p50, status_cpu) = cold_start(50, || status(&socket));
    eprintln!(
        "cold start over 50 runs: VERSION p50 {version_p50:?} (CPU {version_cpu:?}/run), \
         STATUS p50 {status_p50:?} (CPU {status_cpu:?}/run)"
    );
    assert!(
        status_p50 < Duration::from_secs(1),
        "STATUS p50 {status_p50:?}"
    );

    // DEL of something never added, twice, through the whole chain; then GC.
    for _ in 0..2 {
        let del = cni.cnitool(&node, "del", pod.netns_path(), &[]);
        assert!(del.ok, "cnitool del: {del:?}");
    }
    let gc = cni.cnitool(&node, "gc", pod.netns_path(), &[]);
    assert!(gc.ok, "cnitool gc: {gc:?}");

    // A stuck agent: STATUS gives up within its bound instead of hanging (code 50), and DEL
    // to an agent that runs but does not answer is "try again later" (code 11), also within
    // its bound, so that the runtime retries rather than leaking the attachment.
    let pid = Pid::from_raw(i32::try_from(agent.pid()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let run = status(&socket);
    let del = plugin(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    );
    kill(pid, Signal::SIGCONT).unwrap();
    for (run, code, limit) in [
        (&run, 50, flatwire_cni::agent::STATUS_TIMEOUT),
        (&del, 11, flatwire_cni::agent::CALL_TIMEOUT),
    ] {
        let err = assert_cni_error(run, code);
        let msg = err["msg"].as_str().unwrap();
        assert!(msg.contains("did not answer"), "{err}");
        assert!(
            run.took < limit + Duration::from_secs(2),
            "took {:?}: {err}",
            run.took
        );
    }
    assert!(status(&socket).ok, "STATUS after SIGCONT");

    // The agent gone again: STATUS fails, DEL still succeeds.
    agent.stop();
    assert_cni_error(&status(&socket), 50);
    let del = cni.cnitool(&node, "del", pod.netns_path(), &[]);
    assert!(del.ok, "cnitool del without an agent: {del:?}");
    root.stop();
}
