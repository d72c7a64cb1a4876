//! Leader election with a `coordination.k8s.io/v1` Lease: a small loop of our own (kube-rs
//! has none built in).
//!
//! Candidates read the Lease every `retry_period`. One whose holder is empty, or whose record
//! has not changed for `lease_duration` as measured on the candidate's own monotonic clock
//! (so skewed wall clocks between nodes do not matter), takes it over with an update that
//! carries the read `resourceVersion`: of two racing candidates exactly one write succeeds,
//! the other gets a conflict. The holder renews every `retry_period` and considers itself
//! deposed when no renewal succeeded for `renew_deadline`; a holder that stops cleanly
//! releases the Lease (empty holder) so a standby takes over at its next retry.
//!
//! The holder identity is the pod name when the operator runs in a pod (the chart sets
//! `POD_NAME`). The leader labels its own pod [`LEADER_LABEL`]`=`[`LEADER_VALUE`] and removes
//! that label from every other pod of its namespace (a crashed leader's), so a Service
//! selecting the label sends the controller/root UDP traffic to the leader only; a candidate
//! removes the label from its own pod while it is not leading (at start, when leadership is
//! lost, and on release). Outside a pod there is no such pod and the labels are skipped.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// The label the leader puts on its own pod (the controller Service selects it).
pub const LEADER_LABEL: &str = "flatwire.io/role";
/// [`LEADER_LABEL`]'s value on the leader's pod.
pub const LEADER_VALUE: &str = "leader";
/// Field manager of the pod label patches.
const LABEL_MANAGER: &str = "flatwire-operator-leader";

/// A duration in Go's `time.ParseDuration` form as Kubernetes flags use it: one or more
/// `<number><unit>` with units `ms`, `s`, `m`, `h` (e.g. `15s`, `1m30s`, `500ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

/// Why a duration flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like 15s, 500ms or 1m30s (units ms, s, m, h)")]
pub struct DurationError(String);

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError(s.to_owned());
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(1),
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                _ => return Err(err()),
            };
            rest = &rest[unit_len..];
            let part = u32::try_from(n)
                .ok()
                .and_then(|n| unit.checked_mul(n))
                .ok_or_else(err)?;
            total = total.checked_add(part).ok_or_else(err)?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// How to take part in the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's holder identity (the pod name), unique among candidates.
    pub holder: String,
    /// How long a silent holder keeps the Lease before candidates take it.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often candidates try to acquire and the holder renews.
    pub retry_period: Duration,
}

/// Why an election could not run.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The durations do not satisfy `lease-duration > renew-deadline > retry-period > 0`.
    #[error(
        "leader election needs lease-duration > renew-deadline > retry-period > 0 \
         (got {lease_duration}, {renew_deadline}, {retry_period})"
    )]
    Durations {
        /// `--lease-duration`.
        lease_duration: GoDuration,
        /// `--renew-deadline`.
        renew_deadline: GoDuration,
        /// `--retry-period`.
        retry_period: GoDuration,
    },
    /// The holder identity is empty.
    #[error("the leader-election holder identity is empty (set POD_NAME or --leader-identity)")]
    NoHolder,
}

impl LeaseConfig {
    /// Checks the durations (as client-go does) and the holder identity.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if self.holder.is_empty() {
            return Err(LeaderError::NoHolder);
        }
        if self.retry_period.is_zero()
            || self.renew_deadline <= self.retry_period
            || self.lease_duration <= self.renew_deadline
        {
            return Err(LeaderError::Durations {
                lease_duration: GoDuration(self.lease_duration),
                renew_deadline: GoDuration(self.renew_deadline),
                retry_period: GoDuration(self.retry_period),
            });
        }
        Ok(())
    }
}

/// What was last seen of the Lease and when (on our monotonic clock).
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    at: Instant,
}

/// One candidate in the election.
pub struct Elector {
    api: Api<Lease>,
    pods: Api<Pod>,
    cfg: LeaseConfig,
    observed: Mutex<Option<Observed>>,
    /// Whether our pod carries the leader label as far as we know.
    labeled: AtomicBool,
}

impl Elector {
    /// A candidate for `cfg` (call [`LeaseConfig::validate`] first).
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client.clone(), &cfg.namespace),
            pods: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Mutex::new(None),
            labeled: AtomicBool::new(false),
        }
    }

    /// The election's configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// One attempt to acquire or renew: `Ok(true)` when this candidate holds the Lease after
    /// the call, `Ok(false)` when another one does or won the race. Call it every
    /// `retry_period`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let secs = i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(current) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.holder.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.cfg.holder.as_str());
        if !ours && holder.is_some() && !self.expired(&spec) {
            return Ok(false);
        }
        let mut next = current.clone();
        let mut s = spec;
        if !ours {
            s.acquire_time = Some(now.clone());
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        s.holder_identity = Some(self.cfg.holder.clone());
        s.lease_duration_seconds = Some(secs);
        s.renew_time = Some(now);
        next.spec = Some(s);
        // `replace` sends the read resourceVersion: a concurrent writer makes this a conflict.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the Lease record in `spec` is free to take: unchanged for `lease_duration`
    /// since this candidate first saw it.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let mut seen = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = seen
            .as_ref()
            .is_some_and(|o| o.holder == spec.holder_identity && o.renew == spec.renew_time);
        if !same {
            *seen = Some(Observed {
                holder: spec.holder_identity.clone(),
                renew: spec.renew_time.clone(),
                at: Instant::now(),
            });
        }
        seen.as_ref()
            .is_some_and(|o| o.at.elapsed() >= self.cfg.lease_duration)
    }

    /// Sets (`leader`) or removes the leader label on our pod (named like the holder). A
    /// missing pod (not running in a pod) is not an error: `Ok(false)`.
    async fn label_own_pod(&self, leader: bool) -> Result<bool, kube::Error> {
        self.label_pod(&self.cfg.holder, leader).await
    }

    async fn label_pod(&self, pod: &str, leader: bool) -> Result<bool, kube::Error> {
        let value = if leader {
            serde_json::Value::from(LEADER_VALUE)
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({ "metadata": { "labels": { LEADER_LABEL: value } } });
        let params = PatchParams {
            field_manager: Some(LABEL_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match self.pods.patch(pod, &params, &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Labels our pod as the leader's and unlabels every other pod that carries the label.
    async fn mark_leader(&self) -> Result<(), kube::Error> {
        let own = self.label_own_pod(true).await?;
        self.labeled.store(true, Ordering::Relaxed);
        if !own {
            tracing::debug!(pod = %self.cfg.holder, "no pod named like the holder; not labeling");
            return Ok(());
        }
        let others = self
            .pods
            .list(&ListParams::default().labels(&format!("{LEADER_LABEL}={LEADER_VALUE}")))
            .await?;
        for p in others.items {
            let Some(name) = p.metadata.name.filter(|n| *n != self.cfg.holder) else {
                continue;
            };
            self.label_pod(&name, false).await?;
            tracing::info!(pod = %name, "removed the leader label of a former leader's pod");
        }
        tracing::info!(pod = %self.cfg.holder, label = %format!("{LEADER_LABEL}={LEADER_VALUE}"), "labeled as the leader");
        Ok(())
    }

    /// Removes the leader label from our pod, logging a failure.
    async fn unmark_leader(&self) {
        self.labeled.store(false, Ordering::Relaxed);
        if let Err(e) = self.label_own_pod(false).await {
            tracing::warn!(pod = %self.cfg.holder, error = %e, "cannot remove the leader label");
        }
    }

    /// Retries [`Self::try_acquire_or_renew`] every `retry_period` until this candidate
    /// holds the Lease, then labels its pod as the leader's. API errors are logged and
    /// retried.
    pub async fn acquire(&self) {
        self.unmark_leader().await;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    if let Err(e) = self.mark_leader().await {
                        self.labeled.store(false, Ordering::Relaxed);
                        tracing::warn!(pod = %self.cfg.holder, error = %e, "cannot label the leader's pod; retrying while leading");
                    }
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(lease = %self.cfg.name, error = %e, "acquiring the Lease"),
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Renews every `retry_period` while leading (and retries labeling the pod if that
    /// failed); returns when leadership is lost: another holder took the Lease, or no renewal
    /// succeeded within `renew_deadline`. Then the pod's leader label is removed.
    pub async fn hold(&self) {
        self.renew_while_leading().await;
        self.unmark_leader().await;
    }

    async fn renew_while_leading(&self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry_period).await;
            let attempt =
                tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => {
                    last_ok = Instant::now();
                    if !self.labeled.load(Ordering::Relaxed)
                        && let Err(e) = self.mark_leader().await
                    {
                        tracing::warn!(pod = %self.cfg.holder, error = %e, "cannot label the leader's pod");
                    }
                }
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %self.cfg.name, "another candidate holds the Lease");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.cfg.name, error = %e, "renewing the Lease")
                }
                Err(_) => tracing::warn!(lease = %self.cfg.name, "renewing the Lease timed out"),
            }
            if last_ok.elapsed() >= self.cfg.renew_deadline {
                tracing::warn!(lease = %self.cfg.name, "no renewal within the renew deadline");
                return;
            }
        }
    }

    /// Removes our pod's leader label and gives the Lease up (empty holder) if this candidate
    /// still holds it, so a standby takes over at its next retry instead of waiting out the
    /// lease duration.
    pub async fn release(&self) -> Result<(), kube::Error> {
        self.unmark_leader().await;
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Duration {
        s.parse::<GoDuration>().unwrap().0
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(d("15s"), Duration::from_secs(15));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("2h"), Duration::from_secs(7200));
        for bad in ["", "15", "s", "15x", "1.5s", "-1s", "15 s", "99999999999h"] {
            let e = bad.parse::<GoDuration>().unwrap_err();
            assert!(e.to_string().contains("not a duration"), "{bad}: {e}");
        }
        assert_eq!(
            GoDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(GoDuration(Duration::from_secs(15)).to_string(), "15s");
    }

    #[test]
    fn lease_durations_are_checked() {
        let mut c = LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            holder: "a".into(),
            lease_duration: d("15s"),
            renew_deadline: d("10s"),
            retry_period: d("2s"),
        };
        c.validate().unwrap();
        c.renew_deadline = d("15s");
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("lease-duration > renew-deadline") && e.contains("15s"),
            "{e}"
        );
        c.renew_deadline = d("10s");
        c.holder.clear();
        assert!(matches!(c.validate(), Err(LeaderError::NoHolder)));
    }
}
