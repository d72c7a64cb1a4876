//! `flatwire-agent`: the per-host daemon that runs the flatwire node.
//!
//! Today it opens the state directory, serves the gRPC API on its Unix socket (answering
//! `Status` with ready=false until the VL1 node runs) and Prometheus metrics on a loopback TCP
//! port, and exits cleanly on SIGINT/SIGTERM, removing its socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use flatwire_agent::{metrics, service, state::StateDir};
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
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let state = StateDir::open(&args.home)
        .with_context(|| format!("cannot use the state directory {}", args.home.display()))?;

    let metrics = Arc::new(metrics::Metrics::new());
    let metrics_listener = metrics::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, metrics.clone()));

    let listener = service::bind_socket(&args.socket)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        home = %state.root().display(),
        socket = %args.socket.display(),
        metrics = %metrics_addr,
        udp_port = args.port,
        "flatwire-agent started; not ready: {}",
        service::NODE_NOT_RUNNING
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = stopping_tx.send(());
    };
    let served = service::serve(listener, service::AgentService::default(), shutdown);
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
    if let Err(e) = std::fs::remove_file(&args.socket) {
        tracing::warn!(socket = %args.socket.display(), error = %e, "cannot remove the API socket");
    }
    served.with_context(|| format!("gRPC server on {}", args.socket.display()))
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
        assert!(Args::try_parse_from(["flatwire-agent", "--port", "70000"]).is_err());
    }
}
