//! `flatwire-agent`: the per-host daemon that runs the flatwire node.
//!
//! It opens the state directory, loads (or on first start generates) the host identity, loads
//! the planet, runs the VL1 node on the UDP port in a data-plane thread (as a root of the
//! planet with `--root`) together with VL2 (the networks of `--join` and `HOME/networks.d`,
//! each on a TAP; the network controller with `--controller`), serves the gRPC API on its Unix socket (`Status` is ready once a root
//! answered), the ZeroTier-style HTTP API (loopback TCP on the UDP port's number, token in
//! `HOME/authtoken.secret`) and Prometheus metrics on a loopback TCP port, and exits cleanly on
//! SIGINT/SIGTERM, removing its socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::Parser;
use flatwire_agent::dataplane::{self, DataPlaneConfig, NodeHandle};
use flatwire_agent::kube::{self as kube_mode, ConfigMapRef};
use flatwire_agent::state::{Sensitivity, StateDir};
use flatwire_agent::{attach, host, http_api, metrics, networks, pool, service, udp};
use flatwire_vl1::Event;
use flatwire_vl2::NetworkId;
use tokio::signal::unix::{SignalKind, signal};

/// How long calls in flight may run after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The flatwire node agent.
#[derive(Debug, Parser)]
#[command(name = "flatwire-agent", version, about)]
struct Args {
    /// State directory (identities, joined networks, planet).
    #[arg(long, default_value = "/var/lib/flatwire")]
    home: PathBuf,
    /// UDP port of the node (the local HTTP API uses the same number on loopback TCP).
    #[arg(long, default_value_t = 9993)]
    port: u16,
    /// Unix socket of the gRPC API for the CNI plugin and the CLI.
    #[arg(long, default_value = flatwire_api::DEFAULT_AGENT_SOCKET)]
    socket: PathBuf,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:9994")]
    metrics_listen: SocketAddr,
    /// Address of the local HTTP API (ZeroTier One's service API); default `127.0.0.1:PORT`
    /// (TCP, the UDP port's number). Keep it on loopback.
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// A planet file (serialized world) to use; it is copied into the state directory.
    /// Without it, the planet already in the state directory is used.
    #[arg(long)]
    planet: Option<PathBuf>,
    /// Serve the planet as one of its roots (this host's identity must be listed in it).
    #[arg(long)]
    root: bool,
    /// Also run the network controller for networks `<our address>xxxxxx`, with the
    /// ZeroTier-style JSON-file store in `HOME/controller.d`.
    #[arg(long)]
    controller: bool,
    /// Join this network (16 hex digits; repeatable). Remembered in `HOME/networks.d`, so a
    /// restart rejoins it without the flag.
    #[arg(long = "join", value_name = "NWID")]
    join: Vec<NetworkId>,
    /// Pre-generated member identities to keep in `HOME/pool` (refilled at the lowest CPU
    /// priority, at most 4096) so a burst of pod starts does not wait for one.
    #[arg(long, value_name = "N", default_value_t = 128)]
    identity_pool: usize,
    /// How long Attach waits for the network controller's config, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = attach::DEFAULT_CONFIG_TIMEOUT.as_secs())]
    attach_timeout: u64,
    /// Kubernetes mode: this host's Node (in a pod: the downward API's spec.nodeName). The
    /// agent writes its public identity into the Node's annotation `flatwire.io/host-identity`,
    /// reads the planet from --planet-configmap, and detaches attachments whose pods left the
    /// API server.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    kube_node: Option<String>,
    /// Kubeconfig for Kubernetes mode (default: $KUBECONFIG, ~/.kube/config, then the pod's
    /// ServiceAccount).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The ConfigMap holding the planet (binaryData key `planet`); with --kube-node the
    /// default is flatwire-system/flatwire-planet. Given without --kube-node, only the planet
    /// is read from the API server (the operator's controller sidecar does this).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    planet_configmap: Option<ConfigMapRef>,
    /// Kubernetes mode: how long an attachment's pod may be gone from the API server before
    /// the attachment is detached.
    #[arg(long, value_name = "SECS", default_value_t = kube_mode::DEFAULT_POD_GC_GRACE.as_secs())]
    pod_gc_grace: u64,
    /// Data-plane threads (1 to 64), each owning a share of the local identities (pod
    /// members spread by address; the host's identity, its networks, the controller and the
    /// root role stay on the first). Default: one per CPU up to 4, and 1 with --root (a
    /// root's relaying is done by the host identity's thread).
    #[arg(
        long,
        env = "FLATWIRE_DATAPLANE_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=flatwire_agent::shard::MAX_SHARDS as i64)
    )]
    dataplane_threads: Option<u16>,
}

/// The data-plane threads to run: `--dataplane-threads`, else one per CPU up to 4 (1 for a
/// root).
fn dataplane_threads(args: &Args) -> usize {
    match args.dataplane_threads {
        Some(n) => usize::from(n),
        None if args.root => 1,
        None => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs in files and `kubectl logs` stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();

    let state = StateDir::open(&args.home)
        .with_context(|| format!("cannot use the state directory {}", args.home.display()))?;

    let identity = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            host::load_or_generate_identity(&state, &AtomicBool::new(false))
        })
        .await
        .context("identity generation panicked")??
    };
    if identity.1 {
        tracing::info!(address = %identity.0.address(), "generated the host identity");
    }
    let identity = identity.0;
    let public_identity = identity.to_public().to_string();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut planet = host::load_planet(&state, args.planet.as_deref())?;
    let kube_client = kube_start(&args, &state, &public_identity, &mut planet).await?;
    if planet.is_none()
        && let Some(k) = &kube_client
    {
        tracing::info!(
            configmap = %planet_configmap(&args),
            "no planet yet: waiting for one in the ConfigMap"
        );
        let mut rx = k.planet.subscribe();
        planet = tokio::select! {
            p = rx.wait_for(Option::is_some) => p.ok().and_then(|p| p.clone()),
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        };
    }
    if args.root {
        let Some(planet) = &planet else {
            anyhow::bail!(
                "--root needs a planet: pass --planet FILE (or put one at {})",
                state.root().join(host::PLANET).display()
            );
        };
        host::check_root(planet, &identity)?;
    }

    let metrics = Arc::new(metrics::Metrics::new());
    let metrics_listener = metrics::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, metrics.clone()));

    let api_addr = args
        .api_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], args.port)));
    let api_listener = http_api::bind(api_addr)
        .await
        .with_context(|| format!("cannot serve the HTTP API on {api_addr}"))?;
    let token = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || http_api::load_or_create_token(&state))
            .await
            .context("token creation panicked")??
    };

    let listener = service::bind_socket(&args.socket)?;
    let address = identity.address();
    let (agent_service, node, attached) = match planet {
        Some(planet) => {
            let planet_id = planet.id;
            let joined = {
                let (state, join) = (state.clone(), args.join.clone());
                tokio::task::spawn_blocking(move || {
                    // Primary mode after a restart: the host member is on flatwire0 from the
                    // start (the data plane names its TAP by the claim).
                    if let Some(nwid) = attach::recorded_gateways(&state).first() {
                        networks::claim_primary(*nwid);
                    }
                    persist_networks(&state, &join)
                })
                .await
                .context("network persistence panicked")??
            };
            let host_identity = identity.clone();
            let cfg = DataPlaneConfig {
                identity,
                planet,
                bind: udp::dual_stack_any(args.port),
                controller_dir: args.controller.then(|| state.root().join(CONTROLLER_DIR)),
                networks: joined,
                threads: dataplane_threads(&args),
            };
            let m = metrics.clone();
            let (node, events) = tokio::task::spawn_blocking(move || dataplane::start(cfg, m))
                .await
                .context("data-plane start panicked")??;
            let node = Arc::new(node);
            tokio::spawn(handle_events(events, state.clone()));
            tracing::info!(
                %address,
                planet = planet_id,
                udp = %node.local_addr(),
                root = args.root,
                controller = args.controller,
                "VL1 node running"
            );
            let attachments = {
                let (state, node, m) = (state.clone(), node.clone(), metrics.clone());
                let (target, timeout) = (
                    args.identity_pool,
                    std::time::Duration::from_secs(args.attach_timeout),
                );
                tokio::task::spawn_blocking(move || {
                    let pool =
                        pool::IdentityPool::start(&state, target, m.identity_pool_depth.clone())?;
                    let warm = node.clone();
                    pool.watch(move |id| {
                        warm.warm_identity(id.clone());
                    });
                    anyhow::Ok(attach::Attachments::new(
                        node,
                        host_identity,
                        Arc::new(pool),
                        &state,
                        timeout,
                    )?)
                })
                .await
                .context("identity pool start panicked")?
                .context("cannot set up pod attachments")?
            };
            let attachments = Arc::new(attachments);
            let started = std::time::Instant::now();
            let restored = attachments.restore().await;
            if restored > 0 {
                tracing::info!(
                    restored,
                    took_ms = started.elapsed().as_millis() as u64,
                    "pod attachments restored"
                );
            }
            (
                service::AgentService::with_node(node.clone(), attachments.clone()),
                Some(node),
                Some(attachments),
            )
        }
        None => {
            let reason = format!(
                "{}: no planet (pass --planet FILE or put one at {})",
                service::NODE_NOT_RUNNING,
                state.root().join(host::PLANET).display()
            );
            tracing::warn!(%address, "{reason}");
            (
                service::AgentService::not_running(address.to_string(), reason),
                None,
                None,
            )
        }
    };
    if let (Some(k), Some(node)) = (&kube_client, &node) {
        // Planets accepted from the ConfigMap go into force without a restart.
        tokio::spawn(kube_mode::apply_planets(k.planet.subscribe(), node.clone()));
    }
    if let (Some(k), Some(node), Some(attachments)) = (&kube_client, &args.kube_node, attached) {
        let (cache, watch) = kube_mode::watch_pods(k.client.clone(), node);
        tokio::spawn(watch);
        let grace = std::time::Duration::from_secs(args.pod_gc_grace);
        tokio::spawn(kube_mode::collect_pods(cache, attachments, grace));
    }
    let api = Arc::new(http_api::ApiContext {
        token,
        node: node.clone(),
        address,
        public_identity,
        home: state.root().to_path_buf(),
        networks_dir: state.root().join(NETWORKS_DIR),
        primary_port: args.port,
        controller: args.controller,
    });
    let api_task = tokio::spawn(http_api::serve(api_listener, api));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        home = %state.root().display(),
        socket = %args.socket.display(),
        metrics = %metrics_addr,
        api = %api_addr,
        udp_port = args.port,
        "flatwire-agent started"
    );

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = stopping_tx.send(());
    };
    let served = service::serve(listener, agent_service, shutdown);
    // Calls in flight get a short grace period; idle client connections do not hold us up.
    let served = tokio::select! {
        r = served => r,
        _ = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting anyway");
            Ok(())
        }
    };
    metrics_task.abort();
    api_task.abort();
    if let Some(node) = node {
        stop_node(node).await;
    }
    if let Err(e) = std::fs::remove_file(&args.socket) {
        tracing::warn!(socket = %args.socket.display(), error = %e, "cannot remove the API socket");
    }
    served.with_context(|| format!("gRPC server on {}", args.socket.display()))
}

/// Kubernetes mode's client and the planet kept in sync with the ConfigMap.
struct KubeMode {
    client: kube::Client,
    planet: tokio::sync::watch::Sender<Option<flatwire_vl1::World>>,
}

/// The planet ConfigMap of `args` (its default with --kube-node).
fn planet_configmap(args: &Args) -> ConfigMapRef {
    args.planet_configmap
        .clone()
        .unwrap_or_else(ConfigMapRef::default_planet)
}

/// Starts Kubernetes mode when asked (`--kube-node` or `--planet-configmap`): builds the
/// client (a bad kubeconfig is fatal), checks the Node (missing, or RBAC refusing to read
/// it, is fatal; an API server that does not answer is not), then keeps the planet in sync
/// and registers the host identity on the Node in the background.
async fn kube_start(
    args: &Args,
    state: &StateDir,
    public_identity: &str,
    planet: &mut Option<flatwire_vl1::World>,
) -> anyhow::Result<Option<KubeMode>> {
    if args.kube_node.is_none() && args.planet_configmap.is_none() {
        return Ok(None);
    }
    let client = kube_mode::client(args.kubeconfig.as_deref())
        .await
        .context("Kubernetes mode")?;
    if let Some(node) = &args.kube_node {
        match kube_mode::preflight(&client, node).await {
            Ok(()) => {}
            Err(e) if e.is_fatal() => return Err(anyhow::Error::new(e).context("Kubernetes mode")),
            Err(e) => tracing::warn!(
                error = %e,
                "the API server is not answering; running from the state directory and retrying"
            ),
        }
        tokio::spawn(kube_mode::register_node(
            client.clone(),
            node.clone(),
            public_identity.to_owned(),
        ));
    }
    let tx = tokio::sync::watch::Sender::new(planet.clone());
    tokio::spawn(kube_mode::sync_planet(
        client.clone(),
        planet_configmap(args),
        state.clone(),
        tx.clone(),
    ));
    Ok(Some(KubeMode { client, planet: tx }))
}

/// The controller's JSON-file store under the state directory.
const CONTROLLER_DIR: &str = "controller.d";
/// Joined networks under the state directory, one `<nwid>.json` each.
const NETWORKS_DIR: &str = "networks.d";

/// Records the networks of `--join` in `HOME/networks.d` and returns every network recorded
/// there (blocking file I/O: run off the tokio workers).
fn persist_networks(state: &StateDir, join: &[NetworkId]) -> anyhow::Result<Vec<NetworkId>> {
    let dir = StateDir::open(state.root().join(NETWORKS_DIR))?;
    for nwid in join {
        let name = format!("{nwid}.json");
        if dir.read(&name)?.is_none() {
            dir.write_json(
                &name,
                &serde_json::json!({ "id": nwid.to_string() }),
                Sensitivity::Public,
            )?;
        }
    }
    let nets = networks::persisted_networks(dir.root())
        .with_context(|| format!("cannot list {}", dir.root().display()))?;
    Ok(nets)
}

/// Stops the data-plane thread and waits (off the tokio workers) for it to end.
async fn stop_node(node: Arc<NodeHandle>) {
    node.stop();
    let _ = tokio::task::spawn_blocking(move || node.join()).await;
}

/// The control plane's consumer of data-plane events: logs them and persists a planet a
/// root pushed, so a restart keeps it.
async fn handle_events(mut events: tokio::sync::mpsc::Receiver<Event>, state: StateDir) {
    while let Some(e) = events.recv().await {
        match e {
            Event::PlanetUpdated { planet } => {
                let (id, timestamp) = (planet.id, planet.timestamp);
                let state = state.clone();
                let stored =
                    tokio::task::spawn_blocking(move || host::store_planet(&state, &planet)).await;
                match stored {
                    Ok(Ok(())) => tracing::info!(id, timestamp, "planet updated by a root"),
                    Ok(Err(e)) => {
                        tracing::error!(id, timestamp, error = %e, "cannot store the updated planet")
                    }
                    Err(e) => tracing::error!(error = %e, "planet store task failed"),
                }
            }
            Event::PeerLearned { peer, via, .. } => {
                tracing::debug!(%peer, via = ?via, "peer learned");
            }
            Event::HelloReceived {
                peer, addr, hops, ..
            } => tracing::debug!(%peer, %addr, hops, "HELLO"),
            Event::PathLearned { peer, addr, .. } => {
                tracing::debug!(%peer, %addr, "direct path");
            }
            Event::ExternalAddress { addr, .. } => {
                tracing::info!(%addr, "external address reported by a root");
            }
            Event::IdentityCollision { root, .. } => tracing::error!(
                %root,
                "a root reports that another identity holds our address"
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_zerotier_conventions() {
        let a = Args::try_parse_from(["flatwire-agent"]).unwrap();
        assert_eq!(a.port, 9993);
        assert_eq!(a.home, PathBuf::from("/var/lib/flatwire"));
        assert_eq!(a.socket, PathBuf::from(flatwire_api::DEFAULT_AGENT_SOCKET));
        assert!(a.metrics_listen.ip().is_loopback());
        assert_eq!(a.api_listen, None);
        let a = Args::try_parse_from(["flatwire-agent", "--api-listen", "127.0.0.1:1234"]).unwrap();
        assert_eq!(a.api_listen, Some("127.0.0.1:1234".parse().unwrap()));
        assert!(Args::try_parse_from(["flatwire-agent", "--port", "70000"]).is_err());
    }

    #[test]
    fn kubernetes_mode_flags() {
        let a = Args::try_parse_from(["flatwire-agent", "--kube-node", "n1"]).unwrap();
        assert_eq!(a.kube_node.as_deref(), Some("n1"));
        assert_eq!(planet_configmap(&a), ConfigMapRef::default_planet());
        assert_eq!(a.pod_gc_grace, kube_mode::DEFAULT_POD_GC_GRACE.as_secs());
        let a = Args::try_parse_from([
            "flatwire-agent",
            "--planet-configmap",
            "ns/cm",
            "--kubeconfig",
            "/k",
            "--pod-gc-grace",
            "5",
        ])
        .unwrap();
        assert_eq!(planet_configmap(&a).to_string(), "ns/cm");
        assert!(a.kube_node.is_none());
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(a.pod_gc_grace, 5);
        let e = Args::try_parse_from(["flatwire-agent", "--planet-configmap", "cm"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("NAMESPACE/NAME"), "{e}");
    }

    #[test]
    fn join_is_repeatable_and_checked() {
        let a = Args::try_parse_from([
            "flatwire-agent",
            "--controller",
            "--join",
            "8056c2e21c000001",
            "--join",
            "8056c2e21c000002",
        ])
        .unwrap();
        assert!(a.controller);
        assert_eq!(a.join.len(), 2);
        assert!(!Args::try_parse_from(["flatwire-agent"]).unwrap().controller);
        assert!(Args::try_parse_from(["flatwire-agent", "--join", "xyz"]).is_err());
    }
}
