//! The operator's kube-runtime controllers (one reconciler per resource) and how they
//! connect to the API server.

pub mod network;

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::str::FromStr;
use std::sync::Arc;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Config};
use tokio_stream::StreamExt;

use crate::crd::Network;

/// The field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "flatwire-operator";

/// The operator's 40-bit ZeroTier controller address (10 hex digits), the top 40 bits of
/// every network ID it serves.
///
/// Until the operator has its own persistent identity this is a placeholder given with
/// `--controller-address`; later it will be the identity's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ControllerAddress(u64);

impl ControllerAddress {
    /// The address as an integer (< 2^40).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ControllerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010x}", self.0)
    }
}

/// Why a controller address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not exactly 10 hex digits.
    #[error("controller address {0:?} is not 10 hex digits")]
    Format(String),
    /// Zero, or starting with `ff` (reserved by ZeroTier).
    #[error("controller address {0:?} is reserved (zero or starting with ff)")]
    Reserved(String),
}

impl FromStr for ControllerAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 10 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AddressError::Format(s.into()));
        }
        let v = u64::from_str_radix(s, 16).map_err(|_| AddressError::Format(s.into()))?;
        if v == 0 || v >> 32 == 0xff {
            return Err(AddressError::Reserved(s.into()));
        }
        Ok(Self(v))
    }
}

/// Why the operator could not connect or a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the kubeconfig file failed.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// Neither a kubeconfig nor the in-cluster environment gave a configuration.
    #[error("inferring the Kubernetes client configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// A request to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object has no `metadata.name`.
    #[error("object without a name")]
    NoName,
}

/// A client from the kubeconfig at `path`, or else the usual inference (`$KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account).
pub async fn client(path: Option<&Path>) -> Result<Client, Error> {
    let config = match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs the `Network` controller until `shutdown` completes (then lets running reconciles
/// finish). Reconcile and watch errors are logged and retried with backoff; this never
/// returns early because of one object.
pub async fn run(
    client: Client,
    address: ControllerAddress,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Network> = Api::all(client.clone());
    let ctx = Arc::new(network::Context::new(client, address));
    let stream = Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(shutdown)
        .run(network::reconcile, network::error_policy, ctx);
    let mut stream = pin!(stream);
    tracing::info!(%address, "Network controller running");
    while let Some(res) = stream.next().await {
        match res {
            Ok((obj, _)) => tracing::debug!(network = %obj.name, "reconciled"),
            Err(e) => tracing::warn!(error = %e, "Network controller"),
        }
    }
    tracing::info!("Network controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_reject_reserved() {
        let a: ControllerAddress = "89E92ceee5".parse().unwrap();
        assert_eq!(a.to_string(), "89e92ceee5");
        assert!(matches!(
            "89e92ceee".parse::<ControllerAddress>(),
            Err(AddressError::Format(_))
        ));
        assert!(matches!(
            "+9e92ceee5".parse::<ControllerAddress>(),
            Err(AddressError::Format(_))
        ));
        assert!(matches!(
            "ff00000001".parse::<ControllerAddress>(),
            Err(AddressError::Reserved(_))
        ));
        assert!(matches!(
            "0000000000".parse::<ControllerAddress>(),
            Err(AddressError::Reserved(_))
        ));
    }
}
