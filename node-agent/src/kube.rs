//! Kubernetes mode (`--kube-node`, `--planet-configmap`): the agent as a node of a cluster.
//!
//! - The planet comes from a ConfigMap (`binaryData.planet`, published by the operator): a
//!   watch keeps it current. A first planet is taken as is (whoever may write that ConfigMap
//!   is trusted, as the operator is); a later one only under ZeroTier's world update rule
//!   (same type and ID, newer, signed by the current planet's `updatesMustBeSignedBy` key). An
//!   accepted planet is stored in the state directory, where a restart finds it, so the agent
//!   keeps working from that copy while the API server is unreachable, and put in force in
//!   the running node at once ([`apply_planets`]): its new roots are contacted and traffic
//!   fails over among them without a restart.
//! - The host registers its public identity on its own Node object, in the annotation
//!   [`HOST_IDENTITY_ANNOTATION`] (a JSON merge patch with field manager [`FIELD_MANAGER`]),
//!   and puts it back when someone removes or changes it.
//! - The node's pods (field selector `spec.nodeName`) are cached; an attachment whose pod
//!   (namespace, name and UID of the attach request) has been missing from that cache for
//!   longer than a grace period is detached, like a CNI GC would.
//!
//! Every API failure is logged and retried with backoff; none stops the agent. Only a bad
//! kubeconfig, a missing Node and missing RBAC permissions at start are fatal
//! ([`preflight`]), with a message naming what to fix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flatwire_api::v1;
use flatwire_vl1::{PlanetChange, World};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tokio_stream::StreamExt;

use crate::attach::Attachments;
use crate::dataplane::NodeHandle;
use crate::host;
use crate::state::StateDir;

/// The Node annotation holding the host's public identity (`address:0:public`).
pub const HOST_IDENTITY_ANNOTATION: &str = "flatwire.io/host-identity";
/// The planet ConfigMap's `binaryData` key (as the operator publishes it).
pub const PLANET_KEY: &str = "planet";
/// The field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "flatwire-agent";
/// The namespace of the planet ConfigMap the operator publishes by default.
pub const DEFAULT_PLANET_NAMESPACE: &str = "flatwire-system";
/// The name of the planet ConfigMap the operator publishes by default.
pub const DEFAULT_PLANET_NAME: &str = "flatwire-planet";
/// How long an attachment's pod may be missing from the API server before it is detached.
pub const DEFAULT_POD_GC_GRACE: Duration = Duration::from_secs(60);
/// How often the Node annotation is checked (and put back if it went missing).
const NODE_RESYNC: Duration = Duration::from_secs(10);
/// How often attachments are compared with the pod cache.
const GC_PERIOD: Duration = Duration::from_secs(5);
/// Longest wait between retries of a failed API call.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait between retries of a failed watch: after an API server outage the pod cache
/// (and so the pod GC) and the planet catch up within this of its return, where kube-runtime's
/// default backoff would wait up to 30 s.
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(4);
/// How long [`preflight`] waits for the API server before carrying on without it.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// A ConfigMap named `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ConfigMapRef {
    /// The operator's default planet ConfigMap, `flatwire-system/flatwire-planet`.
    pub fn default_planet() -> Self {
        Self {
            namespace: DEFAULT_PLANET_NAMESPACE.to_owned(),
            name: DEFAULT_PLANET_NAME.to_owned(),
        }
    }
}

impl FromStr for ConfigMapRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

impl fmt::Display for ConfigMapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why Kubernetes mode cannot start, or an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The `--kubeconfig` file cannot be read or used.
    // The causes are part of the messages (they are logged with `%`), not chained again.
    #[error("kubeconfig {}: {error}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: kube::config::KubeconfigError,
    },
    /// No kubeconfig was given and none could be inferred.
    #[error(
        "no Kubernetes client configuration (pass --kubeconfig PATH, set KUBECONFIG, \
         or run in a pod with a ServiceAccount): {0}"
    )]
    Infer(kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(kube::Error),
    /// RBAC refused a request.
    #[error(
        "forbidden: the agent may not {verb} {resource}; grant it in the agent's RBAC \
         (the Helm chart's flatwire agent ClusterRole/Role): {message}"
    )]
    Forbidden {
        /// The verb refused (`get`, `patch`, `watch`, ...).
        verb: &'static str,
        /// The resource (`nodes/NAME`, `pods`, `configmaps/NS/NAME`).
        resource: String,
        /// The API server's message.
        message: String,
    },
    /// The Node named by `--kube-node` does not exist.
    #[error(
        "node {0:?} not found in the API server: --kube-node (NODE_NAME) must name this host's \
         Node object (in a pod: the downward API's spec.nodeName)"
    )]
    NodeNotFound(String),
    /// The API server did not answer (or answered with an error other than the above).
    #[error("{what}: {error}")]
    Api {
        /// What was asked.
        what: String,
        /// The error.
        error: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("{what}: no answer from the API server within {timeout:?}")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
}

impl KubeError {
    /// Whether the agent should refuse to start over it (wrong configuration rather than an
    /// API server that is down for now).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::Api { .. } | Self::Timeout { .. })
    }

    /// Classifies `e` from `verb` on `resource`.
    fn from_api(verb: &'static str, resource: String, e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.is_forbidden() => Self::Forbidden {
                verb,
                resource,
                message: s.message.clone(),
            },
            _ => Self::Api {
                what: format!("{verb} {resource}"),
                error: e,
            },
        }
    }
}

/// A watch failure on `resource`, with RBAC refusals spelled out; `None` for the routine
/// "resource version too old" (410) after which the watcher simply lists again.
fn describe_watch_error(resource: String, e: watcher::Error) -> Option<String> {
    match e {
        watcher::Error::WatchError(s) if s.code == 410 => None,
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => {
            Some(KubeError::from_api("watch", resource, k).to_string())
        }
        other => Some(other.to_string()),
    }
}

/// A client from `path`, else `$KUBECONFIG`, `~/.kube/config` or the in-cluster
/// ServiceAccount (the operator's order).
pub async fn client(path: Option<&Path>) -> Result<Client, KubeError> {
    let config = match path {
        Some(p) => {
            let bad = |error| KubeError::Kubeconfig {
                path: p.to_path_buf(),
                error,
            };
            let kc = Kubeconfig::read_from(p).map_err(bad)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Checks at start that the Node `node` exists and that the agent may read it; an API
/// server that does not answer within a few seconds is [`KubeError::Timeout`] or
/// [`KubeError::Api`] (not fatal: the agent then runs from its state directory).
pub async fn preflight(client: &Client, node: &str) -> Result<(), KubeError> {
    let what = format!("get nodes/{node}");
    let nodes: Api<Node> = Api::all(client.clone());
    match tokio::time::timeout(PREFLIGHT_TIMEOUT, nodes.get_opt(node)).await {
        Err(_) => Err(KubeError::Timeout {
            what,
            timeout: PREFLIGHT_TIMEOUT,
        }),
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(KubeError::NodeNotFound(node.to_owned())),
        Ok(Err(e)) => Err(KubeError::from_api("get", format!("nodes/{node}"), e)),
    }
}

/// What to do with a planet read from the ConfigMap.
#[derive(Debug, PartialEq)]
pub enum PlanetUpdate {
    /// It is the planet we have.
    Same,
    /// Take it (first planet, or a valid update).
    New(World),
    /// Refuse it, for this reason.
    Rejected(String),
}

/// Judges `bytes` (a serialized planet) against the `current` one: a first planet is taken
/// if it parses and lists roots; a later one must pass the world update rule (vl1's
/// [`flatwire_vl1::check_planet_update`], the rule the running node applies too).
pub fn judge_planet(current: Option<&World>, bytes: &[u8]) -> PlanetUpdate {
    let w = match World::parse(bytes) {
        Ok((w, _)) => w,
        Err(e) => return PlanetUpdate::Rejected(format!("not a planet: {e}")),
    };
    if w.roots.is_empty() {
        return PlanetUpdate::Rejected("the planet lists no roots".into());
    }
    let Some(cur) = current else {
        return PlanetUpdate::New(w);
    };
    match flatwire_vl1::check_planet_update(cur, &w) {
        Ok(PlanetChange::Same) => PlanetUpdate::Same,
        Ok(PlanetChange::Newer) => PlanetUpdate::New(w),
        Err(why) => PlanetUpdate::Rejected(why.to_string()),
    }
}

/// Keeps the planet of ConfigMap `cm` in the state directory: watches it, judges each
/// revision with [`judge_planet`] against the stored planet (else `planet`'s value), stores
/// an accepted one and publishes it in `planet`. Runs until the task is dropped; API errors are logged and
/// retried with backoff while the stored planet stays in use.
pub async fn sync_planet(
    client: Client,
    cm: ConfigMapRef,
    state: StateDir,
    planet: tokio::sync::watch::Sender<Option<World>>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &cm.namespace);
    // A field selector on the name lets RBAC scope list/watch to this one ConfigMap.
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", cm.name));
    let mut events = std::pin::pin!(watcher(api, cfg).backoff(watch_backoff()));
    let mut failing = false;
    while let Some(ev) = events.next().await {
        let obj = match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(configmap = %cm, "the planet ConfigMap was deleted; keeping our planet");
                continue;
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(configmap = %cm, "watching the planet ConfigMap again");
                }
                continue;
            }
            Err(e) => {
                let Some(e) = describe_watch_error(format!("configmaps/{cm}"), e) else {
                    continue;
                };
                failing = true;
                tracing::warn!(
                    configmap = %cm,
                    error = %e,
                    "cannot watch the planet ConfigMap; running from the planet in the state \
                     directory, retrying with backoff"
                );
                continue;
            }
        };
        let Some(bytes) = obj
            .binary_data
            .as_ref()
            .and_then(|d| d.get(PLANET_KEY))
            .map(|b| b.0.clone())
        else {
            tracing::warn!(configmap = %cm, key = PLANET_KEY, "the planet ConfigMap has no binaryData key");
            continue;
        };
        // The state directory is the reference: a root may have pushed a newer planet there.
        let st = state.clone();
        let stored = tokio::task::spawn_blocking(move || host::load_planet(&st, None)).await;
        let current = match stored {
            Ok(Ok(Some(w))) => Some(w),
            _ => planet.borrow().clone(),
        };
        match judge_planet(current.as_ref(), &bytes) {
            PlanetUpdate::Same => {}
            PlanetUpdate::Rejected(why) => {
                tracing::error!(configmap = %cm, reason = %why, "refusing the planet in the ConfigMap")
            }
            PlanetUpdate::New(w) => {
                let (id, timestamp) = (w.id, w.timestamp);
                let (st, stored_w) = (state.clone(), w.clone());
                match tokio::task::spawn_blocking(move || host::store_planet(&st, &stored_w)).await
                {
                    Ok(Ok(())) => {
                        tracing::info!(configmap = %cm, id, timestamp, "planet from the ConfigMap stored");
                        planet.send_replace(Some(w));
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot store the planet"),
                    Err(e) => tracing::error!(error = %e, "planet store task failed"),
                }
            }
        }
    }
}

/// Puts every planet [`sync_planet`] accepts in force in the running `node`, without a
/// restart: the node judges it by the same update rule ([`NodeHandle::offer_planet`]) and
/// takes its roots at once. The planet current when this starts is offered too (one
/// accepted while the node was starting would otherwise be missed; the node answers `Same`
/// to the one it started with). Runs until the planet's sender is gone.
pub async fn apply_planets(
    mut planets: tokio::sync::watch::Receiver<Option<World>>,
    node: Arc<NodeHandle>,
) {
    loop {
        let offered = planets.borrow_and_update().clone();
        if let Some(w) = offered {
            let (id, timestamp) = (w.id, w.timestamp);
            let roots: Vec<String> = w
                .roots
                .iter()
                .map(|r| r.identity.address().to_string())
                .collect();
            match node.offer_planet(w).await {
                Some(Ok(PlanetChange::Newer)) => tracing::info!(
                    id,
                    timestamp,
                    roots = %roots.join(","),
                    "planet from the ConfigMap in force in the running node"
                ),
                Some(Ok(PlanetChange::Same)) => {}
                // E.g. a root pushed an even newer one meanwhile: the node keeps that.
                Some(Err(why)) => tracing::warn!(
                    id,
                    timestamp,
                    reason = %why,
                    "the running node refuses the planet from the ConfigMap"
                ),
                None => tracing::error!(
                    id,
                    timestamp,
                    "the data plane did not take the planet; it is used at the next start"
                ),
            }
        }
        if planets.changed().await.is_err() {
            return;
        }
    }
}

/// Makes Node `node` carry [`HOST_IDENTITY_ANNOTATION`] = `public_identity`, checking every
/// few seconds and patching when it is missing or different. Runs until dropped.
pub async fn register_node(client: Client, node: String, public_identity: String) {
    let nodes: Api<Node> = Api::all(client);
    let mut backoff = Duration::from_secs(1);
    loop {
        match ensure_annotation(&nodes, &node, &public_identity).await {
            Ok(changed) => {
                if changed {
                    tracing::info!(%node, annotation = HOST_IDENTITY_ANNOTATION, "host identity registered on the Node");
                }
                backoff = Duration::from_secs(1);
                tokio::time::sleep(NODE_RESYNC).await;
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot register the host identity; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One check of the annotation; true when it had to be written.
async fn ensure_annotation(nodes: &Api<Node>, node: &str, value: &str) -> Result<bool, KubeError> {
    let resource = || format!("nodes/{node}");
    let current = nodes
        .get_opt(node)
        .await
        .map_err(|e| KubeError::from_api("get", resource(), e))?
        .ok_or_else(|| KubeError::NodeNotFound(node.to_owned()))?;
    let has = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HOST_IDENTITY_ANNOTATION))
        .is_some_and(|v| v == value);
    if has {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": { "annotations": { HOST_IDENTITY_ANNOTATION: value } }
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    nodes
        .patch(node, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| KubeError::from_api("patch", resource(), e))?;
    Ok(true)
}

/// Starts caching the pods of Node `node` (watch with field selector `spec.nodeName`).
/// Returns the cache and the future that keeps it current (spawn it); watch errors are
/// logged and retried with backoff, and the cache keeps its last contents meanwhile.
pub fn watch_pods(
    client: Client,
    node: &str,
) -> (
    Store<Pod>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (store, writer) = reflector::store();
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let node = node.to_owned();
    let run = async move {
        let stream = watcher(api, cfg)
            .modify(|p| {
                // Only identity matters to the GC: keep the cache small.
                p.spec = None;
                p.status = None;
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
            })
            .backoff(watch_backoff())
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!(%node, "watching the node's pods again");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let Some(e) = describe_watch_error("pods".into(), e) else {
                        continue;
                    };
                    failing = true;
                    tracing::warn!(%node, error = %e, "cannot watch the node's pods; keeping the cache, retrying with backoff");
                }
            }
        }
    };
    (store, run)
}

/// The retry policy of the agent's watches: exponential from 0.5 s, doubling, with jitter, capped
/// at [`MAX_WATCH_BACKOFF`]; it starts over once a watch has worked for two minutes.
fn watch_backoff() -> ResetTimerBackoff<watcher::ExponentialBackoff> {
    let exp = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(MAX_WATCH_BACKOFF)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(exp.into(), Duration::from_secs(120))
}

/// Which attachments' pods are gone: tracks since when each pod has been missing.
#[derive(Debug)]
pub struct PodGc {
    grace: Duration,
    missing: HashMap<(String, String, String), Instant>,
}

impl PodGc {
    /// A GC that detaches after `grace` of absence.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            missing: HashMap::new(),
        }
    }

    /// Call every few seconds with every attachment: returns the keys of those whose pod
    /// `present` has said is missing for at least the grace period, as of `now`.
    /// Attachments without a pod reference (outside Kubernetes) are never collected.
    pub fn sweep(
        &mut self,
        attachments: &[v1::Attachment],
        present: impl Fn(&v1::PodRef) -> bool,
        now: Instant,
    ) -> Vec<v1::AttachmentKey> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for a in attachments {
            let (Some(key), Some(pod)) = (&a.key, &a.pod) else {
                continue;
            };
            if pod.namespace.is_empty() || pod.name.is_empty() {
                continue;
            }
            let id = (pod.namespace.clone(), pod.name.clone(), pod.uid.clone());
            seen.insert(id.clone());
            if present(pod) {
                self.missing.remove(&id);
                continue;
            }
            let since = *self.missing.entry(id).or_insert(now);
            if now.saturating_duration_since(since) >= self.grace {
                out.push(key.clone());
            }
        }
        self.missing.retain(|k, _| seen.contains(k));
        out
    }
}

/// Whether `cache` holds the pod of `r` (same UID when `r` names one).
pub fn pod_present(cache: &Store<Pod>, r: &v1::PodRef) -> bool {
    cache
        .get(&ObjectRef::new(&r.name).within(&r.namespace))
        .is_some_and(|p| r.uid.is_empty() || p.metadata.uid.as_deref() == Some(r.uid.as_str()))
}

/// Detaches the attachments whose pods left the API server for longer than `grace`, once
/// the pod cache had its first full list. Runs until dropped.
pub async fn collect_pods(cache: Store<Pod>, attachments: Arc<Attachments>, grace: Duration) {
    if cache.wait_until_ready().await.is_err() {
        return;
    }
    let mut gc = PodGc::new(grace);
    let mut tick = tokio::time::interval(GC_PERIOD);
    loop {
        tick.tick().await;
        let all = attachments.list("").await;
        let pods: BTreeMap<String, String> = all
            .iter()
            .filter_map(|a| Some((a.key.as_ref()?.container_id.clone(), pod_of(a)?)))
            .collect();
        for key in gc.sweep(&all, |p| pod_present(&cache, p), Instant::now()) {
            let pod = pods.get(&key.container_id).cloned().unwrap_or_default();
            match attachments.detach(&key).await {
                Ok(true) => tracing::info!(
                    %pod,
                    network = %key.network_name,
                    container = %key.container_id,
                    "detached: the pod has been gone from the API server for {grace:?}"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(%pod, error = %e, "cannot detach a gone pod's attachment"),
            }
        }
    }
}

fn pod_of(a: &v1::Attachment) -> Option<String> {
    a.pod
        .as_ref()
        .map(|p| format!("{}/{}", p.namespace, p.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatwire_vl1::{Identity, Root, WorldType};
    use std::sync::atomic::AtomicBool;

    #[test]
    fn configmap_refs_parse() {
        let r: ConfigMapRef = "flatwire-system/flatwire-planet".parse().unwrap();
        assert_eq!(r, ConfigMapRef::default_planet());
        assert_eq!(r.to_string(), "flatwire-system/flatwire-planet");
        for bad in ["", "x", "/x", "x/", "a/b/c"] {
            let e = bad.parse::<ConfigMapRef>().unwrap_err();
            assert!(e.contains("NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    fn world(
        id: u64,
        ts: u64,
        key: &([u8; 64], [u8; 64]),
        sign: &[u8; 64],
        root: &Identity,
    ) -> World {
        World::create(
            WorldType::Planet,
            id,
            ts,
            key.0,
            vec![Root {
                identity: root.to_public(),
                stable_endpoints: vec!["198.18.0.1:9993".parse().unwrap()],
            }],
            sign,
        )
        .unwrap()
    }

    #[test]
    fn planets_follow_the_world_update_rule() {
        let root = Identity::generate(&AtomicBool::new(false)).unwrap();
        let k = flatwire_vl1::identity::generate_key_pair().unwrap();
        let other = flatwire_vl1::identity::generate_key_pair().unwrap();
        let w1 = world(7, 10, &k, &k.1, &root);
        let b1 = w1.serialize(false);
        assert_eq!(judge_planet(None, &b1), PlanetUpdate::New(w1.clone()));
        assert_eq!(judge_planet(Some(&w1), &b1), PlanetUpdate::Same);
        let w2 = world(7, 11, &k, &k.1, &root);
        assert_eq!(
            judge_planet(Some(&w1), &w2.serialize(false)),
            PlanetUpdate::New(w2.clone())
        );
        let reason = |r| match r {
            PlanetUpdate::Rejected(s) => s,
            other => panic!("accepted: {other:?}"),
        };
        let old = reason(judge_planet(Some(&w2), &b1));
        assert!(old.contains("not newer"), "{old}");
        let forged = world(7, 12, &k, &other.1, &root);
        let e = reason(judge_planet(Some(&w1), &forged.serialize(false)));
        assert!(e.contains("updatesMustBeSignedBy"), "{e}");
        let foreign = world(8, 99, &other, &other.1, &root);
        let e = reason(judge_planet(Some(&w1), &foreign.serialize(false)));
        assert!(e.contains("world 8") && e.contains("world 7"), "{e}");
        let e = reason(judge_planet(None, b"junk"));
        assert!(e.contains("not a planet"), "{e}");
    }

    fn attachment(container: &str, ns: &str, name: &str, uid: &str) -> v1::Attachment {
        v1::Attachment {
            key: Some(v1::AttachmentKey {
                network_name: "flatwire".into(),
                container_id: container.into(),
                ifname: "eth0".into(),
            }),
            pod: Some(v1::PodRef {
                namespace: ns.into(),
                name: name.into(),
                uid: uid.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn gone_pods_are_collected_after_the_grace_period() {
        let grace = Duration::from_secs(60);
        let mut gc = PodGc::new(grace);
        let a = attachment("c1", "default", "web", "u1");
        let b = attachment("c2", "default", "db", "u2");
        let mut no_pod = attachment("c3", "", "", "");
        no_pod.pod = None;
        let all = vec![a.clone(), b.clone(), no_pod];
        let t0 = Instant::now();
        let only_web = |p: &v1::PodRef| p.name == "web";
        assert!(gc.sweep(&all, only_web, t0).is_empty(), "just noticed");
        assert!(gc.sweep(&all, only_web, t0 + grace / 2).is_empty());
        let out = gc.sweep(&all, only_web, t0 + grace);
        assert_eq!(out, vec![b.key.clone().unwrap()]);
        // A pod that comes back (the watch had lagged) restarts its clock.
        let everyone = |_: &v1::PodRef| true;
        assert!(gc.sweep(&all, everyone, t0 + grace).is_empty());
        assert!(gc.sweep(&all, only_web, t0 + grace * 2).is_empty());
        assert!(gc.missing.len() == 1);
        // Forgotten attachments leave the bookkeeping.
        assert!(gc.sweep(&[a], only_web, t0 + grace * 3).is_empty());
        assert!(gc.missing.is_empty());
    }

    #[test]
    fn fatal_errors_are_configuration_errors() {
        assert!(KubeError::NodeNotFound("n".into()).is_fatal());
        let t = KubeError::Timeout {
            what: "get nodes/n".into(),
            timeout: PREFLIGHT_TIMEOUT,
        };
        assert!(!t.is_fatal());
        let f = KubeError::from_api(
            "patch",
            "nodes/n".into(),
            kube::Error::Api(Box::new(
                kube::core::Status::failure("no", "Forbidden").with_code(403),
            )),
        );
        assert!(f.is_fatal());
        let s = f.to_string();
        assert!(s.contains("patch nodes/n"), "{s}");
    }
}
