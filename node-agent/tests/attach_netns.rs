//! Pod attachment over the real gRPC API (needs root): a root+controller agent and a host agent
//! that is an authorized member of a private network, pods as network namespaces made by the
//! harness. Attach gives each pod its own member (own identity, vouched for by the host), the
//! pods ping each other and the host member; retries, Check, List, GC, Detach, refusals and
//! bad requests (which leave no interface behind), a restart that restores the pods, and the
//! identity pool refilling.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flatwire_api::v1;
use flatwire_api::{AgentClient, ClientOptions};
use flatwire_tests::netns::{Host, Topology};
use flatwire_tests::process::Proc;
use flatwire_vl1::Address;
use flatwire_vl2::{Mac, NetworkId};
use tonic::Code;
use tonic::transport::Channel;

mod common;

use common::{assert_root, new_identity, start_agent, start_controller, write_json, write_network};

/// The root+controller, the host agent, the networks.
struct Lab {
    topo: Topology,
    dir: tempfile::TempDir,
    host: Host,
    ctl: Proc,
    agent: Proc,
    planet: PathBuf,
    host_address: Address,
    /// Private, the host authorized: pods get in with the host's vouch.
    net: NetworkId,
    /// Private, the host not authorized: pods are refused.
    closed: NetworkId,
    /// The controller has no such network.
    missing: NetworkId,
    /// Private, the host authorized, but no address pool.
    empty: NetworkId,
    /// Private, the host authorized (not joined), a pool of three addresses.
    small: NetworkId,
    /// The host's own member address on `net`.
    host_ip: Ipv4Addr,
    rt: tokio::runtime::Runtime,
}

/// One ping; true when it was answered.
fn ping1(host: &Host, to: &str) -> bool {
    host.run("ping", &["-c", "1", "-W", "1", to])
        .is_ok_and(|o| o.status.success())
}

/// Three pings; panics with the output when one is lost.
fn ping(host: &Host, to: &str) {
    let out = host.run("ping", &["-c", "3", "-W", "1", "-i", "0.2", to]);
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "ping {to} from {} failed:\n{}",
            host.name(),
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(e) => panic!("ping {to} from {} failed: {e}", host.name()),
    }
}

/// The links in `host`'s namespace, as `ip -o link` prints them.
fn links(host: &Host) -> String {
    let out = host.run("ip", &["-o", "link", "show"]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_no_member_link(host: &Host) {
    let l = links(host);
    assert_eq!(
        l.lines().count(),
        1,
        "{}: only lo expected, found:\n{l}",
        host.name()
    );
}

fn key(network: &str, container: &str) -> v1::AttachmentKey {
    v1::AttachmentKey {
        network_name: network.into(),
        container_id: container.into(),
        ifname: "eth0".into(),
    }
}

/// The first address of a result, without its prefix length.
fn ip_of(r: &v1::AttachResult) -> String {
    r.addresses[0]
        .address
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

impl Lab {
    /// A lab whose host agent keeps `pool` identities, with `prefill` of them generated here
    /// before it starts.
    fn new(pool: usize, prefill: usize) -> Self {
        assert_root();
        let mut topo = Topology::new().unwrap();
        let mut lan = topo.switch("lan").unwrap();
        let ctl_host = topo.host("ctl").unwrap();
        let host = topo.host("node").unwrap();
        topo.plug(&mut lan, &ctl_host, "198.18.0.1/24").unwrap();
        topo.plug(&mut lan, &host, "198.18.0.2/24").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root_id = new_identity(&dir.path().join("ctl"));
        let host_id = new_identity(&dir.path().join("node"));
        let planet_file = dir.path().join("planet");
        let endpoint: std::net::SocketAddr = "198.18.0.1:9993".parse().unwrap();
        std::fs::write(&planet_file, flatwire_tests::zt_planet!(root_id, endpoint)).unwrap();

        let net = NetworkId::new(root_id.address(), 0x00_0001);
        let closed = NetworkId::new(root_id.address(), 0x00_0002);
        let missing = NetworkId::new(root_id.address(), 0x00_0099);
        let empty = NetworkId::new(root_id.address(), 0x00_0003);
        let small = NetworkId::new(root_id.address(), 0x00_0004);
        let ctl_home = dir.path().join("ctl");
        write_network(&ctl_home, net, "10.78.0", &[&host_id]);
        write_network(&ctl_home, closed, "10.79.0", &[]);
        let nets = ctl_home.join("controller.d").join("network");
        write_json(
            &nets.join(format!("{empty}.json")),
            serde_json::json!({
                "id": empty.to_string(), "nwid": empty.to_string(), "name": "no-pool",
                "private": true, "ipAssignmentPools": [], "v4AssignMode": {"zt": true}
            }),
        );
        // .10, .11 and .12: ZeroTier's pick never takes the end of a range.
        write_json(
            &nets.join(format!("{small}.json")),
            serde_json::json!({
                "id": small.to_string(), "nwid": small.to_string(), "name": "three",
                "private": true, "v4AssignMode": {"zt": true},
                "ipAssignmentPools": [{"ipRangeStart": "10.80.0.10", "ipRangeEnd": "10.80.0.13"}],
                "routes": [{"target": "10.80.0.0/24", "via": null}]
            }),
        );
        let a = host_id.address().to_string();
        // The host never joins `empty` and `small`: its identity is pinned by hand so it can
        // vouch there.
        for nwid in [empty, small] {
            write_json(
                &nets
                    .join(nwid.to_string())
                    .join("member")
                    .join(format!("{a}.json")),
                serde_json::json!({
                    "id": a, "address": a, "nwid": nwid.to_string(), "authorized": true,
                    "identity": host_id.to_public().to_string()
                }),
            );
        }

        let ctl = start_controller(&ctl_host, &ctl_home, &planet_file);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        prefill_pool(&dir.path().join("node"), prefill);
        let agent = host_agent(
            &host,
            &dir.path().join("node"),
            &planet_file,
            pool,
            &["--join", &net.to_string()],
        );
        let mut lab = Self {
            agent,
            topo,
            dir,
            host,
            ctl,
            planet: planet_file,
            host_address: host_id.address(),
            net,
            closed,
            missing,
            empty,
            small,
            host_ip: Ipv4Addr::UNSPECIFIED,
            rt,
        };
        let tap = flatwire_agent::networks::tap_name(net);
        let deadline = Instant::now() + Duration::from_secs(30);
        lab.host_ip = loop {
            assert!(lab.agent.try_status().is_none(), "host agent exited");
            if let Some(ip) = lab.host.ipv4_on(&tap) {
                break ip;
            }
            assert!(Instant::now() < deadline, "the host member got no address");
            std::thread::sleep(Duration::from_millis(50));
        };
        lab
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    fn socket(&self) -> PathBuf {
        self.home().join("agent.sock")
    }

    fn restart_host_agent(&mut self, pool: usize) {
        self.agent = host_agent(&self.host, &self.home(), &self.planet, pool, &[]);
    }

    /// A client of the host agent, once its Status is ready.
    fn client(&mut self) -> AgentClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(self.agent.try_status().is_none(), "host agent exited");
            let got = self.rt.block_on(async {
                let (mut c, _) =
                    flatwire_api::connect_checked(self.socket(), ClientOptions::default())
                        .await
                        .ok()?;
                let s = c.status(v1::StatusRequest {}).await.ok()?.into_inner();
                s.ready.then_some(c)
            });
            if let Some(c) = got {
                return c;
            }
            assert!(Instant::now() < deadline, "the host agent never got ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn attach(
        &self,
        c: &mut AgentClient<Channel>,
        req: v1::AttachRequest,
    ) -> Result<v1::AttachResult, tonic::Status> {
        self.rt
            .block_on(c.attach(req))
            .map(|r| r.into_inner().result.expect("a result"))
    }

    fn detach(&self, c: &mut AgentClient<Channel>, pod: &str, netns: &str) -> bool {
        self.rt
            .block_on(c.detach(v1::DetachRequest {
                key: Some(key("flat", pod)),
                netns_path: netns.into(),
            }))
            .unwrap()
            .into_inner()
            .removed
    }

    fn check(
        &self,
        c: &mut AgentClient<Channel>,
        pod: &Host,
        prev: &v1::AttachResult,
        bandwidth: Option<v1::Bandwidth>,
    ) -> Result<(), tonic::Status> {
        self.rt
            .block_on(c.check(v1::CheckRequest {
                key: Some(key("flat", pod.name())),
                netns_path: pod.netns_path(),
                prev_result: Some(prev.clone()),
                bandwidth,
            }))
            .map(|_| ())
    }

    fn pool_files(&self) -> usize {
        std::fs::read_dir(self.home().join("pool"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".secret"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The members of `nwid` in the controller's store (its `controller.d` files), sorted.
    fn controller_members(&self, nwid: NetworkId) -> Vec<String> {
        let dir = self
            .dir
            .path()
            .join("ctl/controller.d/network")
            .join(nwid.to_string())
            .join("member");
        let mut out: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_owned)
            })
            .collect();
        out.sort();
        out
    }

    fn stop(mut self) {
        self.agent.stop();
        self.ctl.stop();
        self.topo.teardown().unwrap();
    }
}

/// Generates `n` identities into the pool directory of the state dir `home`, on two threads.
fn prefill_pool(home: &Path, n: usize) {
    let pool = home.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    std::thread::scope(|s| {
        for part in [n / 2, n - n / 2] {
            let pool = &pool;
            s.spawn(move || {
                for _ in 0..part {
                    let id = flatwire_vl1::Identity::generate(&Default::default()).unwrap();
                    std::fs::write(
                        pool.join(format!("{}.secret", id.address())),
                        id.to_secret_string().unwrap(),
                    )
                    .unwrap();
                }
            });
        }
    });
}

/// The resident set size of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Starts the host agent in `host` with its state in `home`.
fn host_agent(host: &Host, home: &Path, planet: &Path, pool: usize, extra: &[&str]) -> Proc {
    let pool = pool.to_string();
    let mut args = vec![
        "--planet",
        planet.to_str().unwrap(),
        "--identity-pool",
        &pool,
    ];
    args.extend_from_slice(extra);
    start_agent(host, home, &home.join("agent.sock"), &args)
}

#[test]
fn pods_attach_ping_survive_a_restart_and_detach() {
    let mut lab = Lab::new(2, 0);
    let p1 = lab.topo.host("p1").unwrap();
    let p2 = lab.topo.host("p2").unwrap();
    let p3 = lab.topo.host("p3").unwrap();
    let mut c = lab.client();

    // Pod 1, primary: its own member, MAC from its address, the pool's address, the host
    // member as its gateway.
    // With bandwidth limits, which the agent sets again when it restores the pod.
    let shape = v1::Bandwidth {
        ingress_rate: 40_000_000,
        ingress_burst: 1_000_000,
        egress_rate: 30_000_000,
        egress_burst: 1_000_000,
    };
    let mut req1 = common::attach_request(&p1, lab.net, v1::Mode::Primary);
    req1.bandwidth = Some(shape);
    let t = Instant::now();
    let r1 = lab.attach(&mut c, req1).unwrap();
    eprintln!("attach p1 took {:?}: {r1:?}", t.elapsed());
    let m1: Address = r1.member_address.parse().unwrap();
    assert_ne!(m1, lab.host_address, "a pod has its own identity");
    assert_eq!(r1.mac, Mac::from_address(m1, lab.net).to_string());
    assert_eq!(r1.network_id, lab.net.to_string());
    assert_eq!((r1.ifname.as_str(), r1.mtu), ("eth0", 2800));
    assert_eq!(r1.sandbox, p1.netns_path());
    assert!(r1.addresses[0].address.starts_with("10.78.0."), "{r1:?}");
    assert!(r1.addresses[0].address.ends_with("/24"), "{r1:?}");
    assert_eq!(r1.addresses[0].gateway, lab.host_ip.to_string());
    assert!(
        r1.routes
            .iter()
            .any(|r| r.dst == "0.0.0.0/0" && r.gw == lab.host_ip.to_string()),
        "{r1:?}"
    );
    assert!(r1.routes.iter().any(|r| r.dst == "10.78.0.0/24"), "{r1:?}");
    let link = links(&p1);
    assert!(
        link.contains("eth0") && link.contains(&r1.mac) && link.contains("mtu 2800"),
        "{link}"
    );
    assert_eq!(p1.ipv4_on("eth0").unwrap().to_string(), ip_of(&r1));
    let routes = p1.run("ip", &["route", "show", "default"]).unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(routes.contains(&format!("via {}", lab.host_ip)), "{routes}");
    // The host member, the pods' gateway, now sits on flatwire0 behind the agent's NAT chain.
    let primary_tap = flatwire_agent::networks::PRIMARY_TAP;
    assert_eq!(lab.host.ipv4_on(primary_tap), Some(lab.host_ip));
    let chain = flatwire_agent::attach::NAT_CHAIN;
    let nat = lab
        .host
        .run("iptables", &["-t", "nat", "-S", chain])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nat.stdout).contains("-s 10.78.0.0/24 ! -d 10.78.0.0/24"),
        "{nat:?}"
    );

    // The controller let the pod in on the host's vouch, under the pod's name.
    let member_file = lab
        .dir
        .path()
        .join("ctl/controller.d/network")
        .join(lab.net.to_string())
        .join("member")
        .join(format!("{m1}.json"));
    let member: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&member_file).unwrap()).unwrap();
    assert_eq!(member["authorized"], true, "{member}");
    assert_eq!(member["lastAuthorizedCredentialType"], "vouch", "{member}");
    assert_eq!(member["name"], "default/p1/uid-p1", "{member}");

    // Pod 2, secondary: network routes only. Two concurrent calls for it (a runtime's
    // retry racing the first try) get the one attachment.
    let (mut a, mut b) = (c.clone(), c.clone());
    let (x, y) = lab.rt.block_on(async {
        tokio::join!(
            a.attach(common::attach_request(&p2, lab.net, v1::Mode::Secondary)),
            b.attach(common::attach_request(&p2, lab.net, v1::Mode::Secondary))
        )
    });
    let r2 = x.unwrap().into_inner().result.unwrap();
    assert_eq!(y.unwrap().into_inner().result.unwrap(), r2);
    assert_ne!(r2.member_address, r1.member_address);
    assert_ne!(ip_of(&r2), ip_of(&r1));
    assert_eq!(r2.addresses[0].gateway, "");
    assert!(r2.routes.iter().all(|r| r.dst != "0.0.0.0/0"), "{r2:?}");
    let routes = p2.run("ip", &["route", "show", "default"]).unwrap();
    assert!(
        routes.stdout.is_empty(),
        "secondary pod has a default route"
    );

    // Pods reach each other and the host member, and the host reaches them.
    ping(&p1, &ip_of(&r2));
    ping(&p2, &ip_of(&r1));
    ping(&p1, &lab.host_ip.to_string());
    ping(&lab.host, &ip_of(&r2));

    // A retry returns the same attachment.
    let again = lab
        .attach(
            &mut c,
            common::attach_request(&p1, lab.net, v1::Mode::Primary),
        )
        .unwrap();
    assert_eq!(again, r1);

    // Check: fine as attached; a different previous result or a changed link is named.
    lab.check(&mut c, &p1, &r1, Some(shape)).unwrap();
    let mut wrong = r1.clone();
    wrong.mac = "02:00:00:00:00:01".into();
    let e = lab.check(&mut c, &p1, &wrong, Some(shape)).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("MAC"), "{e:?}");
    p1.run("ip", &["link", "set", "eth0", "mtu", "1400"])
        .unwrap();
    let e = lab.check(&mut c, &p1, &r1, Some(shape)).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("MTU"), "{e:?}");
    p1.run("ip", &["link", "set", "eth0", "mtu", "2800"])
        .unwrap();
    lab.check(&mut c, &p1, &r1, Some(shape)).unwrap();

    // List.
    let all = lab
        .rt
        .block_on(c.list_attachments(v1::ListAttachmentsRequest::default()))
        .unwrap()
        .into_inner()
        .attachments;
    assert_eq!(all.len(), 2);
    assert!(all.iter().any(|a| a.result.as_ref() == Some(&r1)
        && a.mode == v1::Mode::Primary as i32
        && a.attached_unix_ms > 0));
    let none = lab
        .rt
        .block_on(c.list_attachments(v1::ListAttachmentsRequest {
            network_name: "other".into(),
        }))
        .unwrap()
        .into_inner()
        .attachments;
    assert!(none.is_empty());

    // Bad requests: nothing is left behind in the namespace.
    let mut bad = common::attach_request(&p3, lab.net, v1::Mode::Primary);
    bad.netns_path = "run/netns/x".into();
    let e = lab.attach(&mut c, bad).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut bad = common::attach_request(&p3, lab.net, v1::Mode::Primary);
    bad.netns_path = "/run/netns/fw-no-such-namespace".into();
    let e = lab.attach(&mut c, bad).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut bad = common::attach_request(&p3, lab.net, v1::Mode::Primary);
    bad.netns_path = lab.planet.to_str().unwrap().into();
    let e = lab.attach(&mut c, bad).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("not a network namespace"), "{e:?}");
    let t = Instant::now();
    let e = lab
        .attach(
            &mut c,
            common::attach_request(&p3, lab.missing, v1::Mode::Primary),
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("does not exist"), "{e:?}");
    eprintln!(
        "unknown network refused in {:?}: {}",
        t.elapsed(),
        e.message()
    );
    assert_no_member_link(&p3);
    let e = lab
        .attach(
            &mut c,
            common::attach_request(&p3, lab.closed, v1::Mode::Primary),
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    eprintln!("closed network refused: {}", e.message());
    assert_no_member_link(&p3);
    let e = lab
        .attach(
            &mut c,
            common::attach_request(&p3, lab.empty, v1::Mode::Primary),
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    eprintln!("network without addresses: {}", e.message());
    assert_no_member_link(&p3);

    // A third pod whose namespace path (a bind mount of p3's, under /run/netns whose mounts
    // reach the agent's mount namespace; named with the harness prefix so a sweep finds a
    // leftover) is gone when the agent restarts.
    let vanishing = PathBuf::from(format!("{}-gone", p3.netns_path()));
    std::fs::write(&vanishing, b"").unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["--bind", &p3.netns_path()])
        .arg(&vanishing)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount --bind of a netns failed");
    let mut req3 = common::attach_request(&p3, lab.net, v1::Mode::Secondary);
    req3.netns_path = vanishing.to_str().unwrap().into();
    let r3 = lab.attach(&mut c, req3).unwrap();
    let unmounted = std::process::Command::new("umount")
        .arg(&vanishing)
        .status()
        .unwrap();
    assert!(unmounted.success());
    assert!(links(&p3).contains("eth0"), "{r3:?}");

    // Restart: pods 1 and 2 come back (same identities and addresses) and talk within 5 s;
    // pod 3's record goes, its namespace path being gone.
    lab.agent.stop();
    std::fs::remove_file(&vanishing).unwrap();
    // The TAP went with the agent; p1's shaping device (an `ifb`) waits for the restart.
    let left = links(&p1);
    assert!(
        !left.contains("eth0") && left.lines().count() == 2 && left.contains(": fwb"),
        "{left}"
    );
    assert_no_member_link(&p3);
    let restarted = Instant::now();
    lab.restart_host_agent(2);
    let deadline = restarted + Duration::from_secs(5);
    while !ping1(&p1, &ip_of(&r2)) {
        assert!(
            Instant::now() < deadline,
            "no pod-to-pod ping within 5 s of the restart"
        );
    }
    let back = restarted.elapsed();
    eprintln!("pods talk again {back:?} after the agent restart");
    assert!(links(&p1).contains(&r1.mac) && links(&p1).contains("mtu 2800"));
    let qdiscs = p1.run("tc", &["qdisc", "show", "dev", "eth0"]).unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout).into_owned();
    assert!(
        qdiscs.contains("tbf") && qdiscs.contains("rate 30Mbit"),
        "the restored pod lost its egress limit:\n{qdiscs}"
    );
    let routes = p1.run("ip", &["route", "show", "default"]).unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(routes.contains(&format!("via {}", lab.host_ip)), "{routes}");
    let mut c = lab.client();
    lab.check(&mut c, &p1, &r1, Some(shape)).unwrap();
    lab.check(&mut c, &p2, &r2, None).unwrap();
    // CHECK without the limits the pod has fails.
    let unlimited = lab.check(&mut c, &p1, &r1, None).unwrap_err();
    assert!(unlimited.message().contains("egress rate"), "{unlimited:?}");
    let listed = lab
        .rt
        .block_on(c.list_attachments(v1::ListAttachmentsRequest::default()))
        .unwrap()
        .into_inner()
        .attachments;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        std::fs::read_dir(lab.home().join("attachments"))
            .unwrap()
            .count(),
        2,
        "the vanished namespace's record is removed"
    );
    // ... and its member released at the controller (in the background).
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.controller_members(lab.net).contains(&r3.member_address) {
        assert!(
            Instant::now() < deadline,
            "the member of the vanished namespace's pod was not released"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_no_member_link(&p3);
    ping(&p2, &lab.host_ip.to_string());

    // GC keeps p1, removes p2 (its interface goes).
    let gc = lab
        .rt
        .block_on(c.garbage_collect(v1::GarbageCollectRequest {
            network_name: "flat".into(),
            keep: vec![key("flat", "p1")],
        }))
        .unwrap()
        .into_inner();
    assert_eq!(gc.removed, vec![key("flat", "p2")]);
    assert_no_member_link(&p2);
    assert!(links(&p1).contains("eth0"));

    // Detach twice; a missing namespace is fine too.
    assert!(lab.detach(&mut c, "p1", &p1.netns_path()));
    assert_no_member_link(&p1);
    assert!(!lab.detach(&mut c, "p1", &p1.netns_path()));
    assert!(!lab.detach(&mut c, "p9", "/run/netns/fw-no-such-namespace"));
    let e = lab.check(&mut c, &p1, &r1, Some(shape)).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let records = std::fs::read_dir(lab.home().join("attachments"))
        .unwrap()
        .count();
    assert_eq!(records, 0, "attachment records left behind");
    assert!(
        lab.host
            .run("iptables", &["-t", "nat", "-S", chain])
            .is_err(),
        "the NAT chain outlived the last primary pod"
    );
    assert_eq!(lab.host.ipv4_on(primary_tap), Some(lab.host_ip));

    // The pool refills to its target (2) at idle priority.
    let deadline = Instant::now() + Duration::from_secs(120);
    while lab.pool_files() < 2 {
        assert!(
            Instant::now() < deadline,
            "the identity pool did not refill: {} files",
            lab.pool_files()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = lab
        .host
        .run("curl", &["-sf", "http://127.0.0.1:9994/metrics"])
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        metrics.contains("flatwire_identity_pool_depth 2"),
        "pool depth gauge:\n{metrics}"
    );
    lab.stop();
}

/// Attach latency over sequential attaches with the pool ready, and the agent's memory with
/// one and with many attached pods.
#[test]
fn attach_latency_and_memory_per_pod() {
    const PODS: usize = 50;
    const TIMED: usize = 20;
    let mut lab = Lab::new(PODS, PODS);
    let mut c = lab.client();
    let pods: Vec<Host> = (0..PODS)
        .map(|i| lab.topo.host(&format!("q{i}")).unwrap())
        .collect();
    let baseline = rss_kib(lab.agent.pid());
    let mut took = Vec::new();
    let mut results = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let t = Instant::now();
        let r = lab
            .attach(
                &mut c,
                common::attach_request(pod, lab.net, v1::Mode::Primary),
            )
            .unwrap_or_else(|e| panic!("attach {} failed: {e:?}", pod.name()));
        if i < TIMED {
            took.push(t.elapsed());
        }
        results.push(r);
        if i == 0 {
            // Settle: the first pod's member has talked to the controller.
            ping(pod, &lab.host_ip.to_string());
        }
    }
    let one = {
        // RSS with one pod is measured on a fresh start below; here all are attached.
        rss_kib(lab.agent.pid())
    };
    took.sort();
    let p50 = took[took.len() / 2];
    let p99 = took[(took.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "attach latency over {TIMED} sequential attaches: p50 {p50:?}, p99 {p99:?}, min {:?}",
        took[0]
    );
    // Every pod reaches the host member and the first pod.
    for (pod, r) in pods.iter().zip(&results).step_by(7) {
        ping(pod, &lab.host_ip.to_string());
        ping(&pods[0], &ip_of(r));
    }
    // Memory: restart with every pod restored, then compare with a single pod.
    lab.agent.stop();
    lab.restart_host_agent(0);
    let mut c = lab.client();
    std::thread::sleep(Duration::from_secs(2));
    let many = rss_kib(lab.agent.pid());
    for pod in &pods[1..] {
        assert!(lab.detach(&mut c, pod.name(), &pod.netns_path()));
    }
    lab.agent.stop();
    lab.restart_host_agent(0);
    let _c = lab.client();
    std::thread::sleep(Duration::from_secs(2));
    let single = rss_kib(lab.agent.pid());
    let per_pod = many.saturating_sub(single) / (PODS as u64 - 1);
    eprintln!(
        "agent RSS: {baseline} KiB before attaching, {one} KiB after {PODS} attaches; after a \
         restart {single} KiB with 1 pod, {many} KiB with {PODS} pods: {per_pod} KiB per pod"
    );
    assert!(p50 < Duration::from_secs(2), "attach p50 {p50:?}");
    assert!(
        per_pod < 256,
        "{per_pod} KiB per attached pod (target < 256 KiB)"
    );
    lab.stop();
}

/// A standalone controller (no operator) gets the addresses of detached pods back: ten pods
/// attach and detach one after another on a network with three addresses, every attach
/// succeeds, and after each detach the controller's members are the host alone again. A
/// detach while the controller is down ends within the release bound and removes the TAP.
#[test]
fn detached_pods_give_their_addresses_back() {
    const PODS: usize = 10;
    let mut lab = Lab::new(PODS + 1, PODS + 1);
    let mut c = lab.client();
    let baseline = lab.controller_members(lab.small);
    assert_eq!(baseline, [lab.host_address.to_string()]);
    let mut took = Vec::new();
    let mut ips = std::collections::BTreeSet::new();
    for i in 0..PODS {
        let pod = lab.topo.host(&format!("r{i}")).unwrap();
        let r = lab
            .attach(
                &mut c,
                common::attach_request(&pod, lab.small, v1::Mode::Secondary),
            )
            .unwrap_or_else(|e| panic!("attach {i} failed: {e:?}"));
        assert!(ip_of(&r).starts_with("10.80.0."), "{r:?}");
        ips.insert(ip_of(&r));
        let members = lab.controller_members(lab.small);
        assert!(members.contains(&r.member_address), "{members:?}");
        let t = Instant::now();
        assert!(lab.detach(&mut c, pod.name(), &pod.netns_path()));
        took.push(t.elapsed());
        assert_no_member_link(&pod);
        assert_eq!(
            lab.controller_members(lab.small),
            baseline,
            "the member of pod {i} outlived its detach"
        );
    }
    took.sort();
    eprintln!(
        "detach (CNI DEL) latency over {PODS} detaches: min {:?}, p50 {:?}, max {:?}; \
         addresses used: {ips:?}",
        took[0],
        took[PODS / 2],
        took[PODS - 1]
    );
    assert!(ips.len() <= 3, "{ips:?}");

    // The controller is down: the release goes unanswered, the detach ends after the bound.
    let pod = lab.topo.host("r-late").unwrap();
    let r = lab
        .attach(
            &mut c,
            common::attach_request(&pod, lab.small, v1::Mode::Secondary),
        )
        .unwrap();
    lab.ctl.stop();
    let t = Instant::now();
    assert!(lab.detach(&mut c, pod.name(), &pod.netns_path()));
    let waited = t.elapsed();
    eprintln!("detach with the controller down took {waited:?}");
    assert_no_member_link(&pod);
    let bound = Duration::from_millis(flatwire_vl2::vouch::RELEASE_TIMEOUT_MS as u64);
    assert!(
        waited >= bound && waited < bound + Duration::from_millis(1500),
        "detach with the controller down took {waited:?}"
    );
    // Nobody told the controller: the member is still in its store.
    assert!(
        lab.controller_members(lab.small)
            .contains(&r.member_address)
    );
    lab.stop();
}
