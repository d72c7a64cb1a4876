//! Prometheus metrics of the operator and their HTTP endpoint (`GET /metrics`, OpenMetrics
//! text): reconciles by resource and result, leadership, how many Networks and
//! NetworkMembers the controllers see, pod bindings written, deleted and failed, and
//! controller networks deleted because their Network went.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of the reconcile counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `network`, `networkmember` or `pod` (a pass of the pod binding controller).
    pub resource: String,
    /// `ok` or `error`.
    pub result: String,
}

/// The operator's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by resource and result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// 1 while this instance leads (or runs without leader election), else 0.
    pub leader: Gauge,
    /// Networks in the controller's cache.
    pub networks: Gauge,
    /// NetworkMembers in the controller's cache.
    pub members: Gauge,
    /// Pod bindings written to the controller (created or changed).
    pub pod_bindings_written: Counter,
    /// Pod bindings deleted from the controller (their members revoked).
    pub pod_bindings_deleted: Counter,
    /// Failed controller writes of pod bindings, host members and their networks.
    pub pod_binding_errors: Counter,
    /// Pod bindings the controller holds, as last seen.
    pub pod_bindings: Gauge,
    /// Controller networks deleted because no Network maps to them any more.
    pub networks_deleted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `flatwire_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flatwire_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by resource and result",
            reconciles.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance is the leader and runs the controllers",
            leader.clone(),
        );
        let networks = Gauge::default();
        registry.register("networks", "Networks the controller sees", networks.clone());
        let members = Gauge::default();
        registry.register(
            "network_members",
            "NetworkMembers the controller sees",
            members.clone(),
        );
        let pod_bindings_written = Counter::default();
        registry.register(
            "pod_bindings_written",
            "Pod bindings written to the controller",
            pod_bindings_written.clone(),
        );
        let pod_bindings_deleted = Counter::default();
        registry.register(
            "pod_bindings_deleted",
            "Pod bindings deleted from the controller (their members revoked)",
            pod_bindings_deleted.clone(),
        );
        let pod_binding_errors = Counter::default();
        registry.register(
            "pod_binding_errors",
            "Failed controller writes of pod bindings, host members and networks",
            pod_binding_errors.clone(),
        );
        let pod_bindings = Gauge::default();
        registry.register(
            "pod_bindings",
            "Pod bindings in the controller",
            pod_bindings.clone(),
        );
        let networks_deleted = Counter::default();
        registry.register(
            "controller_networks_deleted",
            "Controller networks deleted because no Network maps to them any more",
            networks_deleted.clone(),
        );
        Self {
            registry,
            reconciles,
            leader,
            networks,
            members,
            pod_bindings_written,
            pod_bindings_deleted,
            pod_binding_errors,
            pod_bindings,
            networks_deleted,
        }
    }

    /// Counts one reconcile of `resource` with its result.
    pub fn reconciled(&self, resource: &str, ok: bool) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                resource: resource.to_owned(),
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped (one task per connection).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, metrics.encode()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Binds `addr` and serves the metrics there in a background task.
pub async fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, metrics));
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_encoded() {
        let m = Metrics::new();
        m.reconciled("network", true);
        m.reconciled("network", true);
        m.reconciled("networkmember", false);
        m.leader.set(1);
        m.networks.set(3);
        let text = m.encode();
        assert!(
            text.contains(
                r#"flatwire_operator_reconciles_total{resource="network",result="ok"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"flatwire_operator_reconciles_total{resource="networkmember",result="error"} 1"#
        ));
        assert!(text.contains("flatwire_operator_leader 1"));
        assert!(text.contains("flatwire_operator_networks 3"));
        assert!(text.contains("flatwire_operator_network_members 0"));
        m.pod_bindings_written.inc();
        let text = m.encode();
        assert!(
            text.contains("flatwire_operator_pod_bindings_written_total 1"),
            "{text}"
        );
        assert!(text.contains("flatwire_operator_pod_bindings_deleted_total 0"));
        assert!(text.contains("flatwire_operator_pod_binding_errors_total 0"));
    }
}
