//! `flatwire-operator`: maps flatwire custom resources to controller networks and acts as
//! the network controller.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{ArgAction, Parser, Subcommand};
use flatwire_operator::controller::{self, ControllerAddress, Options, Outcome, RootOptions};
use flatwire_operator::leader::{GoDuration, LeaseConfig};
use flatwire_operator::metrics::{self, Metrics};
use flatwire_operator::sink::{ControllerSink, HttpSink};
use flatwire_operator::{crd, planet};

/// The flatwire operator.
#[derive(Debug, Parser)]
#[command(name = "flatwire-operator", version, about)]
struct Args {
    /// Namespace holding the operator's identity Secret, its Lease and the planet ConfigMap.
    #[arg(long, env = "FLATWIRE_NAMESPACE", default_value = "flatwire-system")]
    namespace: String,
    /// The controller's 40-bit ZeroTier address (10 hex digits), the top of every network
    /// ID. Default: the address of the identity in --identity-secret.
    #[arg(long, env = "FLATWIRE_CONTROLLER_ADDRESS", global = true)]
    controller_address: Option<ControllerAddress>,
    /// Kubeconfig to use (default: `$KUBECONFIG`, `~/.kube/config`, then in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Elect one leader among the replicas with a coordination.k8s.io Lease; only the leader
    /// runs the controllers (`--leader-elect` or `--leader-elect=true|false`).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true",
          action = ArgAction::Set)]
    leader_elect: bool,
    /// The Lease's name (in --namespace).
    #[arg(long, default_value = "flatwire-operator")]
    lease_name: String,
    /// How long a silent leader keeps the Lease (e.g. 15s).
    #[arg(long, default_value = "15s")]
    lease_duration: GoDuration,
    /// How long the leader keeps leading without a successful renewal.
    #[arg(long, default_value = "10s")]
    renew_deadline: GoDuration,
    /// How often candidates retry and the leader renews.
    #[arg(long, default_value = "2s")]
    retry_period: GoDuration,
    /// This replica's name in the Lease (default: the pod name, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    leader_identity: Option<String>,
    /// Publish a planet with this controller as its root in --planet-configmap
    /// (`--root` or `--root=true|false`).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true",
          action = ArgAction::Set)]
    root: bool,
    /// ConfigMap (in --namespace) where the planet is published (binary key `planet`).
    #[arg(long, default_value = "flatwire-planet")]
    planet_configmap: String,
    /// Secret (in --namespace) holding the controller identity and the planet signing key;
    /// created on first start.
    #[arg(long, default_value = "flatwire-controller-identity")]
    identity_secret: String,
    /// The root's UDP port, listed in the planet with POD_IP (else the hostname's address)
    /// when no --stable-endpoint is given.
    #[arg(long, default_value_t = 9993)]
    port: u16,
    /// A stable endpoint (IP:PORT) of the root listed in the planet (repeatable; default:
    /// POD_IP:--port, else the hostname's non-loopback addresses with --port).
    #[arg(long = "stable-endpoint", value_name = "IP:PORT")]
    stable_endpoints: Vec<SocketAddr>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The controller's HTTP API where members are written (`http://HOST:PORT`, the local
    /// API of a `flatwire-agent --controller`).
    #[arg(long, requires = "controller_token_file")]
    controller_api: Option<String>,
    /// File holding the controller API's token (sent as X-ZT1-Auth).
    #[arg(long, requires = "controller_api")]
    controller_token_file: Option<PathBuf>,
    /// What to do (default: `run`).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers against the API server until SIGINT or SIGTERM.
    Run,
    /// Print the CRD YAML generated from the Rust types (all, `---`-separated, or one).
    Crds {
        /// Print only this CRD (e.g. `networks.flatwire.io`).
        #[arg(long)]
        name: Option<String>,
        /// Print the CRD names, one a line, instead of their YAML.
        #[arg(long, conflicts_with = "name")]
        list: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Crds { name, list }) => {
            let mut out = std::io::stdout().lock();
            if list {
                for c in crd::all() {
                    writeln!(out, "{}", crd::name(&c))?;
                }
            } else if let Some(name) = name {
                out.write_all(crd::yaml_of(&name)?.as_bytes())?;
            } else {
                for (i, c) in crd::all().iter().enumerate() {
                    if i > 0 {
                        out.write_all(b"---\n")?;
                    }
                    out.write_all(crd::to_yaml(c)?.as_bytes())?;
                }
            }
            Ok(())
        }
        None | Some(Command::Run) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let kubeconfig = args.kubeconfig.clone();
            let metrics_listen = args.metrics_listen;
            let (opts, metrics) = options(args)?;
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            let outcome = rt.block_on(async {
                if let Some(addr) = metrics_listen {
                    let local = metrics::start(addr, metrics)
                        .await
                        .with_context(|| format!("--metrics-listen {addr}"))?;
                    tracing::info!(%local, "metrics endpoint");
                }
                let client = controller::client(kubeconfig.as_deref()).await?;
                anyhow::Ok(controller::run(client, opts, shutdown_signal()).await?)
            })?;
            match outcome {
                Outcome::Stopped => Ok(()),
                Outcome::LostLeadership => {
                    anyhow::bail!(
                        "lost leadership; exiting so that this replica restarts as a candidate"
                    )
                }
            }
        }
    }
}

/// Checks the flags that clap cannot and turns them into [`Options`].
fn options(args: Args) -> anyhow::Result<(Options, Arc<Metrics>)> {
    let election = args
        .leader_elect
        .then(|| {
            let holder = args.leader_identity.clone().unwrap_or_else(default_holder);
            let cfg = LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                holder,
                lease_duration: args.lease_duration.0,
                renew_deadline: args.renew_deadline.0,
                retry_period: args.retry_period.0,
            };
            cfg.validate().map(|()| cfg)
        })
        .transpose()?;
    let root = args
        .root
        .then(|| {
            let pod_ip = std::env::var("POD_IP").ok();
            let host_ips = if args.stable_endpoints.is_empty() && pod_ip.is_none() {
                hostname_ips()
            } else {
                Vec::new()
            };
            planet::stable_endpoints(
                &args.stable_endpoints,
                pod_ip.as_deref(),
                &host_ips,
                args.port,
            )
            .map(|endpoints| RootOptions {
                configmap: args.planet_configmap.clone(),
                endpoints,
            })
        })
        .transpose()?;
    let sink = match (&args.controller_api, &args.controller_token_file) {
        (Some(url), Some(file)) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("--controller-token-file {}", file.display()))?;
            let sink: Arc<dyn ControllerSink> = Arc::new(HttpSink::new(url, &token)?);
            Some(sink)
        }
        _ => None,
    };
    let metrics = Arc::new(Metrics::new());
    Ok((
        Options {
            namespace: args.namespace,
            address: args.controller_address,
            identity_secret: args.identity_secret,
            root,
            election,
            sink,
            metrics: metrics.clone(),
        },
        metrics,
    ))
}

/// The kernel's hostname (in a pod: the pod name).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// `hostname-pid`, the Lease holder identity outside a pod.
fn default_holder() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

/// The addresses the hostname resolves to (a pod's `/etc/hosts` maps it to the pod IP).
fn hostname_ips() -> Vec<std::net::IpAddr> {
    use std::net::ToSocketAddrs as _;
    (hostname().as_str(), 0)
        .to_socket_addrs()
        .map(|a| a.map(|s| s.ip()).collect())
        .unwrap_or_default()
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_defaults_and_can_be_set() {
        let a = Args::try_parse_from(["flatwire-operator"]).unwrap();
        assert_eq!(a.namespace, "flatwire-system");
        assert!(a.command.is_none());
        let a = Args::try_parse_from(["flatwire-operator", "--namespace", "x"]).unwrap();
        assert_eq!(a.namespace, "x");
    }

    #[test]
    fn crds_subcommand_parses() {
        let a = Args::try_parse_from(["flatwire-operator", "crds", "--name", "n"]).unwrap();
        assert!(
            matches!(a.command, Some(Command::Crds { name: Some(n), list: false }) if n == "n")
        );
        assert!(
            Args::try_parse_from(["flatwire-operator", "crds", "--list", "--name", "n"]).is_err()
        );
    }

    #[test]
    fn run_takes_a_controller_address() {
        let a = Args::try_parse_from([
            "flatwire-operator",
            "run",
            "--controller-address",
            "89e92ceee5",
        ])
        .unwrap();
        assert!(matches!(a.command, Some(Command::Run)));
        assert_eq!(a.controller_address.unwrap().to_string(), "89e92ceee5");
        assert!(
            Args::try_parse_from(["flatwire-operator", "--controller-address", "xyz"]).is_err()
        );
    }

    /// The arguments of charts/flatwire/templates/operator-deployment.yaml with the chart's
    /// default values.
    const CHART_ARGS: [&str; 11] = [
        "flatwire-operator",
        "--namespace=flatwire-system",
        "--leader-elect=true",
        "--lease-name=flatwire-operator",
        "--lease-duration=15s",
        "--renew-deadline=10s",
        "--retry-period=2s",
        "--root=true",
        "--planet-configmap=flatwire-planet",
        "--identity-secret=flatwire-controller-identity",
        "--port=9993",
    ];

    #[test]
    fn the_charts_flags_parse() {
        let mut argv = CHART_ARGS.to_vec();
        argv.push("--metrics-listen=0.0.0.0:9090");
        argv.push("--leader-identity=op-0");
        argv.push("--stable-endpoint=198.18.0.1:9993");
        let a = Args::try_parse_from(argv).unwrap();
        assert!(a.leader_elect && a.root);
        assert_eq!(a.lease_duration.0, std::time::Duration::from_secs(15));
        assert_eq!(a.retry_period.0, std::time::Duration::from_secs(2));
        assert_eq!(a.port, 9993);
        assert_eq!(a.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        let (o, _) = options(a).unwrap();
        let e = o.election.unwrap();
        assert_eq!(
            (e.name.as_str(), e.holder.as_str()),
            ("flatwire-operator", "op-0")
        );
        assert_eq!(
            o.root.unwrap().endpoints,
            vec!["198.18.0.1:9993".parse().unwrap()]
        );
        assert!(o.address.is_none() && o.sink.is_none());
        // The boolean flags also work bare, and off.
        let a =
            Args::try_parse_from(["flatwire-operator", "--leader-elect", "--root=false"]).unwrap();
        assert!(a.leader_elect && !a.root);
    }

    #[test]
    fn bad_flags_get_clear_errors() {
        let err = |extra: &[&str]| {
            let mut argv = vec!["flatwire-operator"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap_err().to_string()
        };
        let e = err(&["--lease-duration=15"]);
        assert!(
            e.contains("--lease-duration") && e.contains("not a duration"),
            "{e}"
        );
        let e = err(&["--leader-elect=yes"]);
        assert!(e.contains("--leader-elect"), "{e}");
        let e = err(&["--metrics-listen=9090"]);
        assert!(e.contains("--metrics-listen"), "{e}");
        let e = err(&["--controller-api=http://127.0.0.1:1"]);
        assert!(e.contains("--controller-token-file"), "{e}");
        let e = err(&["--port=70000"]);
        assert!(e.contains("--port"), "{e}");

        let opts = |extra: &[&str]| {
            let mut argv = vec!["flatwire-operator", "--leader-identity=op-0"];
            argv.extend_from_slice(extra);
            options(Args::try_parse_from(argv).unwrap())
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        let e = opts(&["--leader-elect", "--renew-deadline=20s"]);
        assert!(e.contains("lease-duration > renew-deadline"), "{e}");
        // Neither POD_IP nor a non-loopback hostname address in the test environment.
        if std::env::var_os("POD_IP").is_none() && hostname_ips().iter().all(|i| i.is_loopback()) {
            let e = opts(&["--root"]);
            assert!(e.contains("--stable-endpoint"), "{e}");
        }
        let e = opts(&[
            "--controller-api=https://h:1",
            "--controller-token-file=/dev/null",
        ]);
        assert!(e.contains("http://HOST:PORT"), "{e}");
        let e = opts(&[
            "--controller-api=http://127.0.0.1:1",
            "--controller-token-file=/nonexistent/token",
        ]);
        assert!(
            e.contains("--controller-token-file /nonexistent/token"),
            "{e}"
        );
    }
}
