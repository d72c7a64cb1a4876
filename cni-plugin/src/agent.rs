//! The plugin's side of the agent API: each CNI command as one bounded gRPC exchange with
//! `flatwire-agent` on its Unix socket, and the agent's answers turned into CNI results and
//! CNI error objects a person can act on.
//!
//! Every exchange (connect, the `Status` version check, the call itself) runs under one
//! deadline per command, so the plugin never hangs on a stuck agent.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use flatwire_api::v1;
use flatwire_api::{AgentClient, ClientError, ClientOptions};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::spec::{
    CniError, CniResult, Dns, ErrorCode, Interface, Invocation, IpConfig, Mode, NetConf, Route,
    parse_cidr,
};

/// How long connecting to the agent's socket may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a whole ADD (the agent may wait for the controller's network config).
pub const ADD_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of a whole DEL, CHECK or GC.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of a whole STATUS (runtimes poll it).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an exchange with the agent failed.
enum Failure {
    /// The plugin could not start its I/O runtime (out of file descriptors or threads).
    Runtime(std::io::Error),
    /// Nothing accepts connections on the socket (missing, refused): the agent is not running.
    Down(String),
    /// The agent did not complete the exchange within the deadline.
    Timeout(Duration),
    /// The agent speaks another API version.
    Version(String),
    /// The agent answered with an error status.
    Call(&'static str, Status),
}

/// Runs `exchange` against the agent at `socket` under `deadline`, on a single-threaded
/// runtime (a CNI invocation is one short-lived exchange).
fn exchange<T, F>(
    socket: &Path,
    deadline: Duration,
    exchange: impl FnOnce(AgentClient<Channel>) -> F,
) -> Result<T, Failure>
where
    F: Future<Output = Result<T, Failure>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Failure::Runtime)?;
    runtime.block_on(async {
        let work = async {
            let options = ClientOptions {
                connect_timeout: CONNECT_TIMEOUT.min(deadline),
                request_timeout: None,
            };
            let (client, _) = flatwire_api::connect_checked(socket, options)
                .await
                .map_err(|e| match e {
                    ClientError::Connect { cause, .. } => Failure::Down(cause),
                    ClientError::Timeout { timeout, .. } => Failure::Timeout(timeout),
                    ClientError::Version { agent } => Failure::Version(agent),
                    ClientError::Call { call, status } => Failure::Call(call, *status),
                })?;
            exchange(client).await
        };
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or(Err(Failure::Timeout(deadline)))
    })
}

/// Wraps a gRPC error status of `call`.
fn call_failed(call: &'static str) -> impl Fn(Status) -> Failure {
    move |s| Failure::Call(call, s)
}

/// The CNI error for `failure` of `what` (e.g. "ADD") against the agent at `socket`;
/// `down_code` is the code used when the agent is not running.
fn to_cni_error(failure: Failure, what: &str, socket: &Path, down_code: ErrorCode) -> CniError {
    let socket = socket.display();
    match failure {
        Failure::Runtime(e) => CniError::new(
            ErrorCode::Io,
            format!("flatwire-cni cannot start its I/O runtime ({what})"),
            format!("{e}; the node may be out of file descriptors or threads"),
        ),
        Failure::Down(cause) => CniError::new(
            down_code,
            format!("cannot reach the flatwire agent at {socket} ({what})"),
            format!(
                "{cause}; start flatwire-agent on this node (or check its logs: it serves this \
                 socket), or set `agentSocket` in the network configuration to where it listens"
            ),
        ),
        Failure::Timeout(after) => CniError::new(
            ErrorCode::TryAgainLater,
            format!("the flatwire agent at {socket} did not answer {what} within {after:?}"),
            "the agent accepts connections but is stuck or overloaded; check flatwire-agent's \
             logs and retry",
        ),
        Failure::Version(agent) => CniError::new(
            ErrorCode::AgentFailed,
            format!(
                "the flatwire agent at {socket} speaks API {agent}, this plugin speaks {}",
                flatwire_api::API_VERSION
            ),
            "install the flatwire-cni binary that ships with the running flatwire-agent \
             (flatwire-cni install)",
        ),
        Failure::Call(call, status) => {
            let message = status.message();
            let (code, msg, hint) = match status.code() {
                Code::Unavailable => (
                    ErrorCode::TryAgainLater,
                    "the flatwire agent cannot serve this now",
                    "the agent is starting or has no root/controller contact yet; see \
                     `flatwire status` and retry",
                ),
                Code::DeadlineExceeded | Code::Cancelled => (
                    ErrorCode::TryAgainLater,
                    "the flatwire agent gave up in time",
                    "retry; if it persists, check flatwire-agent's logs",
                ),
                Code::InvalidArgument => (
                    ErrorCode::InvalidConfig,
                    "the flatwire agent rejected the request",
                    "fix the network configuration or the CNI environment",
                ),
                Code::NotFound => (
                    ErrorCode::NotFound,
                    "the flatwire agent does not know this network or attachment",
                    "check the `network` ID in the network configuration and that its \
                     controller serves it",
                ),
                Code::FailedPrecondition => (
                    ErrorCode::CheckMismatch,
                    "the attachment differs from the previous result",
                    "delete and re-add the container's network (the runtime does this on a \
                     failed CHECK)",
                ),
                Code::ResourceExhausted => (
                    ErrorCode::PoolExhausted,
                    "IP pool exhausted: no address or member identity left",
                    "widen the network's ipAssignmentPools or delete unused attachments \
                     (CNI GC)",
                ),
                Code::PermissionDenied => (
                    ErrorCode::AccessDenied,
                    "the network's controller refused this pod as a member",
                    "authorize the member on the controller, or check the network's access \
                     rules and the node's vouch",
                ),
                _ => (
                    ErrorCode::AgentFailed,
                    "the flatwire agent failed",
                    "see flatwire-agent's log for the details",
                ),
            };
            CniError::new(
                code,
                format!("{msg} ({what}: {call} at {socket})"),
                format!("{:?}: {message}; {hint}", status.code()),
            )
        }
    }
}

fn key(inv: &Invocation, conf: &NetConf) -> v1::AttachmentKey {
    v1::AttachmentKey {
        network_name: conf.name.clone(),
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
    }
}

/// The netns path as a string, `""` when absent.
fn netns_of(inv: &Invocation) -> String {
    inv.netns
        .as_deref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Fails with code 3 unless the invocation's network namespace exists.
fn require_netns(inv: &Invocation) -> Result<(), CniError> {
    match inv.netns.as_deref() {
        Some(p) if p.exists() => Ok(()),
        other => Err(CniError::new(
            ErrorCode::UnknownContainer,
            format!(
                "the network namespace {} does not exist",
                other.map_or_else(|| "(none)".into(), |p| p.display().to_string())
            ),
            "CNI_NETNS must name the container's existing network namespace",
        )),
    }
}

/// ADD: attaches the container and returns the result JSON (merged after `prevResult`).
pub fn add(inv: &Invocation, conf: &NetConf) -> Result<serde_json::Value, CniError> {
    require_netns(inv)?;
    let (namespace, name, uid) = inv.pod();
    let request = v1::AttachRequest {
        key: Some(key(inv, conf)),
        netns_path: netns_of(inv),
        network_id: conf.network.clone().unwrap_or_default(),
        mode: match conf.mode {
            Mode::Primary => v1::Mode::Primary,
            Mode::Secondary => v1::Mode::Secondary,
        } as i32,
        pod: Some(v1::PodRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        }),
        bandwidth: conf.bandwidth,
    };
    let attached = exchange(&conf.agent_socket, ADD_TIMEOUT, |mut c| async move {
        c.attach(request)
            .await
            .map(|r| r.into_inner().result.unwrap_or_default())
            .map_err(call_failed("Attach"))
    })
    .map_err(|f| to_cni_error(f, "ADD", &conf.agent_socket, ErrorCode::TryAgainLater))?;
    let result = from_attach(&attached, &netns_of(inv))?;
    result.chained_json(&conf.cni_version, conf.prev_result.as_ref())
}

/// DEL: detaches the container. Succeeds when there is nothing to remove, and when no agent
/// runs at all: the agent's TAP devices die with its process, and the agent's own records are
/// reconciled by CNI GC. An agent that runs but does not answer is code 11 (the runtime
/// retries the DEL).
pub fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let request = v1::DetachRequest {
        key: Some(key(inv, conf)),
        netns_path: inv
            .netns
            .as_deref()
            .filter(|p| p.exists())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let outcome = exchange(&conf.agent_socket, CALL_TIMEOUT, |mut c| async move {
        c.detach(request)
            .await
            .map(|r| r.into_inner().removed)
            .map_err(call_failed("Detach"))
    });
    match outcome {
        Ok(removed) => {
            tracing::debug!(removed, container = %inv.container_id, "detached");
            Ok(())
        }
        Err(Failure::Down(cause)) => {
            tracing::warn!(
                socket = %conf.agent_socket.display(),
                %cause,
                "no flatwire agent runs: nothing to detach (its TAP devices ended with it; \
                 CNI GC reconciles its records)"
            );
            Ok(())
        }
        Err(Failure::Call(_, s)) if s.code() == Code::NotFound => Ok(()),
        Err(f) => Err(to_cni_error(
            f,
            "DEL",
            &conf.agent_socket,
            ErrorCode::TryAgainLater,
        )),
    }
}

/// CHECK: asks the agent whether the attachment still matches `prevResult`.
pub fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    require_netns(inv)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs `prevResult`",
            "the runtime passes the result of the preceding ADD",
        )
    })?;
    let ours = CniResult::from_prev(prev, &inv.ifname)?;
    let request = v1::CheckRequest {
        key: Some(key(inv, conf)),
        netns_path: netns_of(inv),
        prev_result: Some(to_attach(&ours, conf)),
        bandwidth: conf.bandwidth,
    };
    exchange(&conf.agent_socket, CALL_TIMEOUT, |mut c| async move {
        c.check(request)
            .await
            .map(|_| ())
            .map_err(call_failed("Check"))
    })
    .map_err(|f| to_cni_error(f, "CHECK", &conf.agent_socket, ErrorCode::TryAgainLater))
}

/// STATUS: succeeds when the agent is ready to attach; code 50 with the agent's reasons (or
/// why it cannot be reached) otherwise.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let socket = &conf.agent_socket;
    let answer = exchange(socket, STATUS_TIMEOUT, |mut c| async move {
        c.status(v1::StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(call_failed("Status"))
    })
    .map_err(|f| {
        let mut e = to_cni_error(f, "STATUS", socket, ErrorCode::NotAvailable);
        e.code = ErrorCode::NotAvailable;
        e
    })?;
    if answer.ready {
        return Ok(());
    }
    let reasons = if answer.not_ready_reasons.is_empty() {
        "no reason given".to_owned()
    } else {
        answer.not_ready_reasons.join("; ")
    };
    Err(CniError::new(
        ErrorCode::NotAvailable,
        format!(
            "the flatwire agent at {} is not ready to attach pods",
            socket.display()
        ),
        format!("{reasons}; see `flatwire status` and the agent's log"),
    ))
}

/// GC: removes the network's attachments that are not in `cni.dev/valid-attachments`.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    let request = v1::GarbageCollectRequest {
        network_name: conf.name.clone(),
        keep: conf
            .valid_attachments
            .iter()
            .map(|a| v1::AttachmentKey {
                network_name: conf.name.clone(),
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect(),
    };
    let removed = exchange(&conf.agent_socket, CALL_TIMEOUT, |mut c| async move {
        c.garbage_collect(request)
            .await
            .map(|r| r.into_inner().removed)
            .map_err(call_failed("GarbageCollect"))
    })
    .map_err(|f| to_cni_error(f, "GC", &conf.agent_socket, ErrorCode::TryAgainLater))?;
    for k in removed {
        tracing::info!(container = %k.container_id, ifname = %k.ifname, "garbage-collected");
    }
    Ok(())
}

/// The CNI result for the agent's `AttachResult` (`netns` is the sandbox when the agent
/// leaves it empty). The agent's strings are checked: a malformed one is code 104.
pub fn from_attach(r: &v1::AttachResult, netns: &str) -> Result<CniResult, CniError> {
    let bad = |what: String| {
        CniError::new(
            ErrorCode::AgentFailed,
            "the flatwire agent returned a malformed result",
            what,
        )
    };
    let ip = |s: &str| -> Result<Option<std::net::IpAddr>, CniError> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| bad(format!("{s:?} is not an IP address")))
    };
    let ips = r
        .addresses
        .iter()
        .map(|a| {
            let (address, prefix) = parse_cidr(&a.address)
                .ok_or_else(|| bad(format!("address {:?} is not a CIDR", a.address)))?;
            Ok(IpConfig {
                address,
                prefix,
                gateway: ip(&a.gateway)?,
                interface: Some(0),
            })
        })
        .collect::<Result<_, CniError>>()?;
    let routes = r
        .routes
        .iter()
        .map(|rt| {
            parse_cidr(&rt.dst)
                .ok_or_else(|| bad(format!("route destination {:?} is not a CIDR", rt.dst)))?;
            Ok(Route {
                dst: rt.dst.clone(),
                gw: ip(&rt.gw)?,
            })
        })
        .collect::<Result<_, CniError>>()?;
    let dns = r.dns.clone().unwrap_or_default();
    Ok(CniResult {
        interfaces: vec![Interface {
            name: r.ifname.clone(),
            mac: r.mac.clone(),
            mtu: (r.mtu > 0).then_some(r.mtu),
            sandbox: Some(if r.sandbox.is_empty() {
                netns.to_owned()
            } else {
                r.sandbox.clone()
            }),
        }],
        ips,
        routes,
        dns: Dns {
            nameservers: dns.nameservers,
            domain: (!dns.domain.is_empty()).then_some(dns.domain),
            search: dns.search,
            options: dns.options,
        },
    })
}

/// The agent's `AttachResult` for our part of a previous CNI result (CHECK). Fields a CNI
/// result does not carry (the member address; the MTU before spec 1.1) are left empty.
fn to_attach(r: &CniResult, conf: &NetConf) -> v1::AttachResult {
    let iface = r.interfaces.first();
    v1::AttachResult {
        ifname: iface.map(|i| i.name.clone()).unwrap_or_default(),
        mac: iface.map(|i| i.mac.clone()).unwrap_or_default(),
        mtu: iface.and_then(|i| i.mtu).unwrap_or(0),
        sandbox: iface.and_then(|i| i.sandbox.clone()).unwrap_or_default(),
        addresses: r
            .ips
            .iter()
            .map(|ip| v1::IpConfig {
                address: format!("{}/{}", ip.address, ip.prefix),
                gateway: ip.gateway.map(|g| g.to_string()).unwrap_or_default(),
            })
            .collect(),
        routes: r
            .routes
            .iter()
            .map(|rt| v1::Route {
                dst: rt.dst.clone(),
                gw: rt.gw.map(|g| g.to_string()).unwrap_or_default(),
            })
            .collect(),
        dns: Some(v1::Dns {
            nameservers: r.dns.nameservers.clone(),
            domain: r.dns.domain.clone().unwrap_or_default(),
            search: r.dns.search.clone(),
            options: r.dns.options.clone(),
        }),
        member_address: String::new(),
        network_id: conf.network.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach_result() -> v1::AttachResult {
        v1::AttachResult {
            ifname: "eth0".into(),
            mac: "32:a1:b2:c3:d4:e5".into(),
            mtu: 2800,
            sandbox: String::new(),
            addresses: vec![
                v1::IpConfig {
                    address: "10.147.17.5/24".into(),
                    gateway: "10.147.17.1".into(),
                },
                v1::IpConfig {
                    address: "fd80::5/88".into(),
                    gateway: String::new(),
                },
            ],
            routes: vec![v1::Route {
                dst: "0.0.0.0/0".into(),
                gw: "10.147.17.1".into(),
            }],
            dns: None,
            member_address: "0123456789".into(),
            network_id: "8056c2e21c000001".into(),
        }
    }

    #[test]
    fn an_attach_result_becomes_a_cni_result_and_back() {
        let r = from_attach(&attach_result(), "/run/netns/p").unwrap();
        assert_eq!(
            r.interfaces[0].sandbox.as_deref(),
            Some("/run/netns/p"),
            "the sandbox defaults to CNI_NETNS"
        );
        let json = r.to_json("1.1.0");
        assert_eq!(json["interfaces"][0]["mtu"], 2800);
        assert_eq!(json["ips"][0]["gateway"], "10.147.17.1");
        assert_eq!(json["ips"][1]["address"], "fd80::5/88");
        assert_eq!(json["ips"][1]["interface"], 0);
        assert_eq!(json["routes"][0]["gw"], "10.147.17.1");
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"flat","type":"flatwire-cni","network":"8056c2e21c000001"}"#,
            crate::spec::Command::Add,
        )
        .unwrap();
        let back = to_attach(&CniResult::from_prev(&json, "eth0").unwrap(), &conf);
        let mut want = attach_result();
        want.sandbox = "/run/netns/p".into();
        want.member_address = String::new();
        want.dns = Some(v1::Dns::default());
        assert_eq!(back, want);
    }

    #[test]
    fn malformed_agent_results_are_code_104() {
        for mutate in [
            (|r: &mut v1::AttachResult| r.addresses[0].address = "10.1.1.1".into())
                as fn(&mut v1::AttachResult),
            |r| r.addresses[0].gateway = "gw".into(),
            |r| r.routes[0].dst = "default".into(),
        ] {
            let mut r = attach_result();
            mutate(&mut r);
            let e = from_attach(&r, "/run/netns/p").unwrap_err();
            assert_eq!(e.code, ErrorCode::AgentFailed, "{e}");
        }
    }

    #[test]
    fn grpc_codes_map_to_actionable_cni_errors() {
        let socket = Path::new("/run/flatwire/agent.sock");
        let cases = [
            (Code::Unavailable, ErrorCode::TryAgainLater, "cannot serve"),
            (
                Code::ResourceExhausted,
                ErrorCode::PoolExhausted,
                "IP pool exhausted",
            ),
            (Code::PermissionDenied, ErrorCode::AccessDenied, "refused"),
            (Code::NotFound, ErrorCode::NotFound, "does not know"),
            (Code::InvalidArgument, ErrorCode::InvalidConfig, "rejected"),
            (
                Code::FailedPrecondition,
                ErrorCode::CheckMismatch,
                "differs",
            ),
            (Code::DeadlineExceeded, ErrorCode::TryAgainLater, "gave up"),
            (Code::Internal, ErrorCode::AgentFailed, "failed"),
        ];
        for (grpc, cni, words) in cases {
            let e = to_cni_error(
                Failure::Call("Attach", Status::new(grpc, "agent says why")),
                "ADD",
                socket,
                ErrorCode::TryAgainLater,
            );
            assert_eq!(e.code, cni, "{grpc:?}");
            assert!(e.msg.contains(words), "{grpc:?}: {}", e.msg);
            assert!(e.details.contains("agent says why"), "{}", e.details);
        }
        let down = to_cni_error(
            Failure::Down("No such file or directory".into()),
            "ADD",
            socket,
            ErrorCode::TryAgainLater,
        );
        assert!(down.msg.contains("/run/flatwire/agent.sock"));
        assert!(down.details.contains("start flatwire-agent"));
    }
}
