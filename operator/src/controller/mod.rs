//! The operator's kube-runtime controllers (one reconciler per resource) and how they
//! connect to the API server.

pub mod counts;
pub mod ips;
pub mod member;
pub mod network;
pub mod node;
pub mod pod;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{Timestamp, TimestampRound, Unit};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Config, ResourceExt};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

use crate::crd::{Network, NetworkMember};
use crate::identity::{self, IdentityError};
use crate::leader::{Elector, LeaderError, LeaseConfig};
use crate::metrics::Metrics;
use crate::planet::{self, PlanetError};
use crate::sink::{ControllerSink, SinkError};

/// How long a shutdown waits for the controllers' first lists (see [`run_controllers`]).
const STORE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "flatwire-operator";

/// The operator's 40-bit ZeroTier controller address (10 hex digits), the top 40 bits of
/// every network ID it serves.
///
/// It is the address of the identity in the operator's Secret, unless
/// `--controller-address` overrides it (e.g. to serve networks of an external controller).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ControllerAddress(u64);

impl ControllerAddress {
    /// The address `v` (below 2^40, not zero, not starting with `ff`).
    pub fn from_u64(v: u64) -> Result<Self, AddressError> {
        format!("{v:010x}").parse()
    }

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
    /// Writing to the controller failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The finalizer helper refused the object.
    #[error("finalizer: {0}")]
    Finalizer(String),
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

/// Runs the `Network` and `NetworkMember` controllers, and with a `sink` the pod binding
/// controller ([`pod::run`]: host members from Nodes, pod bindings from Pods), until
/// `shutdown` completes (then lets running reconciles finish). Reconcile and watch errors
/// are logged, counted in `metrics` and retried with backoff; this never returns early
/// because of one object. Members are written to `sink` (none: they get `Ready=False`,
/// reason `NoController`).
pub async fn run_controllers(
    client: Client,
    address: ControllerAddress,
    sink: Option<Arc<dyn ControllerSink>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (net_stop, net_stopped) = oneshot::channel::<()>();
    let (mem_stop, mem_stopped) = oneshot::channel::<()>();
    let (pod_stop, pod_stopped) = oneshot::channel::<()>();
    let pods = sink.clone().map(|sink| {
        pod::run(client.clone(), address, sink, metrics.clone(), async move {
            let _ = pod_stopped.await;
        })
    });
    let nets: Api<Network> = Api::all(client.clone());
    let wc = watcher::Config::default().any_semantic();

    let net_ctl = Controller::new(nets.clone(), wc.clone());
    let net_store = net_ctl.store();
    let net_ctx = Arc::new(network::Context::new(client.clone(), address));
    let net_stream = net_ctl
        .graceful_shutdown_on(async move {
            let _ = net_stopped.await;
        })
        .run(network::reconcile, network::error_policy, net_ctx)
        .map(|r| ("network", r.map(|_| ()).map_err(|e| e.to_string())));

    let mem_ctl = Controller::new(Api::<NetworkMember>::all(client.clone()), wc.clone());
    let mem_store = mem_ctl.store();
    let by_network = mem_store.clone();
    let mem_ctx = Arc::new(member::Context::new(client, address, sink));
    let mem_stream = mem_ctl
        // A Network's change (rules, tags, deletion) is reconciled into its members.
        .watches(nets, wc, move |net: Network| {
            let name = net.name_any();
            by_network
                .state()
                .into_iter()
                .filter(|m| m.spec.network == name)
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move {
            let _ = mem_stopped.await;
        })
        .run(member::reconcile, member::error_policy, mem_ctx)
        .map(|r| ("networkmember", r.map(|_| ()).map_err(|e| e.to_string())));

    // kube-runtime's runner waits for its store's first list before it can stop, so a
    // shutdown right after the start gives the lists a moment; if they cannot finish (API
    // server unreachable), the streams are dropped (no reconcile has started then).
    let abort = Arc::new(tokio::sync::Notify::new());
    let (ns, ms, abort_tx) = (net_store.clone(), mem_store.clone(), abort.clone());
    tokio::spawn(async move {
        shutdown.await;
        let lists = async {
            let _ = ns.wait_until_ready().await;
            let _ = ms.wait_until_ready().await;
        };
        let ready = tokio::time::timeout(STORE_GRACE, lists).await.is_ok();
        let _ = net_stop.send(());
        let _ = mem_stop.send(());
        let _ = pod_stop.send(());
        if !ready {
            abort_tx.notify_one();
        }
    });
    let mut events = Box::pin(net_stream).merge(Box::pin(mem_stream));
    tracing::info!(%address, "Network and NetworkMember controllers running");
    let pods = async move {
        if let Some(p) = pods {
            p.await;
        }
    };
    let main = async {
        // The cache gauges follow reconciles and, for deletions (which reconcile nothing),
        // a once-a-second refresh.
        let gauges = || {
            metrics
                .networks
                .set(i64::try_from(net_store.state().len()).unwrap_or(i64::MAX));
            metrics
                .members
                .set(i64::try_from(mem_store.state().len()).unwrap_or(i64::MAX));
        };
        let mut refresh = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            let (resource, res) = tokio::select! {
                item = events.next() => match item {
                    Some(item) => item,
                    None => break,
                },
                _ = refresh.tick() => {
                    gauges();
                    continue;
                }
                () = abort.notified() => {
                    tracing::warn!("the controllers' caches never filled; stopping without them");
                    break;
                }
            };
            metrics.reconciled(resource, res.is_ok());
            gauges();
            match res {
                Ok(()) => tracing::debug!(resource, "reconciled"),
                Err(e) => tracing::warn!(resource, error = %e, "controller"),
            }
        }
    };
    tokio::join!(main, pods);
    tracing::info!("controllers stopped");
}

/// What [`run`] does besides the controllers.
pub struct Options {
    /// The operator's namespace (Lease, identity Secret, planet ConfigMap).
    pub namespace: String,
    /// The controller address; `None`: the identity's address.
    pub address: Option<ControllerAddress>,
    /// The identity Secret's name; it is read (or created) when `address` is `None` or a
    /// root is configured.
    pub identity_secret: String,
    /// Publish a planet with this controller as its root.
    pub root: Option<RootOptions>,
    /// Take part in leader election; `None`: always lead.
    pub election: Option<LeaseConfig>,
    /// Where members are written.
    pub sink: Option<Arc<dyn ControllerSink>>,
    /// Metrics to update.
    pub metrics: Arc<Metrics>,
}

/// The root role's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootOptions {
    /// The ConfigMap (in the operator's namespace) holding the planet.
    pub configmap: String,
    /// The root's stable endpoints.
    pub endpoints: Vec<SocketAddr>,
}

/// How [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `shutdown` completed (the Lease, if held, was released).
    Stopped,
    /// Another candidate took the Lease or renewals failed; the controllers were stopped.
    LostLeadership,
}

/// Why [`run`] could not lead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad leader election settings.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// The identity Secret could not be read or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The planet could not be published.
    #[error(transparent)]
    Planet(#[from] PlanetError),
}

/// The operator: waits for leadership (with `opts.election`), loads or creates the identity,
/// publishes the planet (with `opts.root`), then runs [`run_controllers`] until `shutdown`
/// completes or leadership is lost. On `shutdown` a held Lease is released.
pub async fn run(
    client: Client,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Outcome, RunError> {
    let elector = match opts.election {
        Some(cfg) => {
            cfg.validate()?;
            Some(Elector::new(client.clone(), cfg))
        }
        None => None,
    };
    let mut stop = pin!(shutdown);
    opts.metrics.leader.set(0);
    if let Some(e) = &elector {
        let cfg = e.config();
        tracing::info!(lease = %cfg.name, holder = %cfg.holder, "waiting for leadership");
        tokio::select! {
            () = e.acquire() => {}
            () = &mut stop => return Ok(Outcome::Stopped),
        }
        tracing::info!(lease = %cfg.name, holder = %cfg.holder, "became the leader");
    }
    opts.metrics.leader.set(1);

    let (ctl_stop, ctl_stopped) = oneshot::channel::<()>();
    let work = async {
        let (address, identity) = match (opts.address, &opts.root) {
            (Some(a), None) => (a, None),
            (given, _) => {
                let (id, created) = identity::load_or_create(
                    client.clone(),
                    &opts.namespace,
                    &opts.identity_secret,
                )
                .await?;
                tracing::info!(
                    address = %id.address(), created, secret = %opts.identity_secret,
                    "controller identity"
                );
                (given.unwrap_or_else(|| id.address()), Some(id))
            }
        };
        if let (Some(root), Some(id)) = (&opts.root, &identity) {
            let (world, written) = planet::publish(
                client.clone(),
                &opts.namespace,
                &root.configmap,
                id,
                &root.endpoints,
            )
            .await?;
            tracing::info!(
                configmap = %root.configmap, id = world.id, timestamp = world.timestamp,
                endpoints = ?root.endpoints, written, "planet published"
            );
        }
        run_controllers(
            client.clone(),
            address,
            opts.sink.clone(),
            opts.metrics.clone(),
            async {
                let _ = ctl_stopped.await;
            },
        )
        .await;
        Ok::<_, RunError>(())
    };
    let mut work = pin!(work);
    let hold = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    let mut hold = pin!(hold);
    let mut ctl_stop = Some(ctl_stop);
    let mut lost = false;
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            () = &mut hold, if !lost => {
                lost = true;
                tracing::warn!("lost leadership; stopping the controllers");
                if let Some(t) = ctl_stop.take() {
                    let _ = t.send(());
                }
            }
            () = &mut stop, if ctl_stop.is_some() => {
                tracing::info!("stopping the controllers");
                if let Some(t) = ctl_stop.take() {
                    let _ = t.send(());
                }
            }
        }
    };
    opts.metrics.leader.set(0);
    if let Some(e) = &elector
        && !lost
        && let Err(err) = e.release().await
    {
        tracing::warn!(error = %err, "releasing the Lease");
    }
    result?;
    Ok(if lost {
        Outcome::LostLeadership
    } else {
        Outcome::Stopped
    })
}

/// A condition of type `type_` for `generation` at `now` (rounded to seconds); it keeps the
/// `lastTransitionTime` of the same type and status in `prev`.
pub(crate) fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(
            || {
                Time(
                    now.round(TimestampRound::new().smallest(Unit::Second))
                        .unwrap_or(now),
                )
            },
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The Event recorder of the operator (reporting controller `flatwire-operator`).
pub(crate) fn recorder(client: &Client) -> Recorder {
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: None,
    };
    Recorder::new(client.clone(), reporter)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
