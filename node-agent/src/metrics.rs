//! Prometheus metrics: the registry of the agent's metric families and a tiny HTTP endpoint
//! (`GET /metrics`, OpenMetrics text) meant for a loopback TCP port.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Kind of a path to a peer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum PathKind {
    /// A direct UDP path (possibly after NAT traversal).
    Direct,
    /// Relayed through a root.
    Relayed,
}

/// Direction of traffic, seen from the local members.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Received from the overlay.
    Rx,
    /// Sent to the overlay.
    Tx,
}

macro_rules! lowercase_label {
    ($t:ty, $($v:ident => $s:literal),+) => {
        impl $t {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                e.write_str(self.as_str())
            }
        }
    };
}
lowercase_label!(PathKind, Direct => "direct", Relayed => "relayed");
lowercase_label!(Direction, Rx => "rx", Tx => "tx");

/// Labels of the path gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// Direct or relayed.
    pub kind: PathKind,
}

/// Labels of the traffic counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    /// Network id, 16 hex digits.
    pub network: String,
    /// Rx or tx.
    pub direction: Direction,
}

/// Labels of the drop counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// The drop reason's name (a `DropReason` of vl1/vl2 or the I/O shell).
    pub reason: &'static str,
}

/// Labels of the rule-hit counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// Network id, 16 hex digits.
    pub network: String,
    /// The action that decided (accept, drop, tee, redirect, watch, break, no_match: a
    /// `RuleAction` of vl2).
    pub action: &'static str,
    /// Tx: the sender's rules on a frame from a local member; rx: the receiver's rules on
    /// a frame from the overlay.
    pub direction: Direction,
}

/// Labels of the controller request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// The request kind (network config, member authorization, ...).
    pub kind: &'static str,
    /// The outcome (ok, denied, error, ...).
    pub result: &'static str,
}

/// Labels of the per-thread data-plane metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabels {
    /// The data-plane thread's index (0 owns the host identity).
    pub thread: u64,
}

/// The agent's metric families; clone the handles to update them from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Known peers.
    pub peers: Gauge,
    /// Active paths by kind.
    pub paths: Family<PathLabels, Gauge>,
    /// Payload bytes per network and direction.
    pub bytes: Family<TrafficLabels, Counter>,
    /// Frames per network and direction.
    pub packets: Family<TrafficLabels, Counter>,
    /// Dropped packets or frames by reason.
    pub drops: Family<DropLabels, Counter>,
    /// Frames per network, deciding rule action and direction.
    pub rule_hits: Family<RuleLabels, Counter>,
    /// Pre-generated identities ready for new members.
    pub identity_pool_depth: Gauge,
    /// Requests handled by (or sent to) the network controller.
    pub controller_requests: Family<ControllerLabels, Counter>,
    /// VL1 packets and fragments this node forwarded for others (as a root: relayed traffic).
    pub relayed_packets: Counter,
    /// Bytes (UDP payload) of the VL1 packets and fragments this node forwarded for others.
    pub relayed_bytes: Counter,
    /// RENDEZVOUS introductions this node sent (as a root).
    pub rendezvous_sent: Counter,
    /// Identity validations (memory-hard hashes) this node spent on first contacts.
    pub identity_validations: Counter,
    /// TCP superframes read from the TAPs (offloaded segmentation) and split.
    pub tap_superframes: Counter,
    /// Frames the TCP superframes were split into.
    pub tap_segments: Counter,
    /// TCP superframes written to the TAPs, each merged from received segments.
    pub tap_coalesced_writes: Counter,
    /// Received frames merged into them.
    pub tap_coalesced_frames: Counter,
    /// Datagrams each data-plane thread received from its socket.
    pub dataplane_datagrams: Family<ThreadLabels, Counter>,
    /// Datagrams each data-plane thread handed to another (not for one of its identities).
    pub dataplane_forwarded: Family<ThreadLabels, Counter>,
    /// Local identities (host, pod members, warmed pool identities) per data-plane thread.
    pub dataplane_identities: Family<ThreadLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `flatwire_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flatwire");
        let m = Self {
            peers: Gauge::default(),
            paths: Family::default(),
            bytes: Family::default(),
            packets: Family::default(),
            drops: Family::default(),
            rule_hits: Family::default(),
            identity_pool_depth: Gauge::default(),
            controller_requests: Family::default(),
            relayed_packets: Counter::default(),
            relayed_bytes: Counter::default(),
            rendezvous_sent: Counter::default(),
            identity_validations: Counter::default(),
            tap_superframes: Counter::default(),
            tap_segments: Counter::default(),
            tap_coalesced_writes: Counter::default(),
            tap_coalesced_frames: Counter::default(),
            dataplane_datagrams: Family::default(),
            dataplane_forwarded: Family::default(),
            dataplane_identities: Family::default(),
            registry: Registry::default(),
        };
        registry.register("peers", "Known VL1 peers", m.peers.clone());
        registry.register("paths", "Active paths to peers by kind", m.paths.clone());
        registry.register(
            "bytes",
            "Payload bytes per network and direction",
            m.bytes.clone(),
        );
        registry.register(
            "packets",
            "Ethernet frames per network and direction",
            m.packets.clone(),
        );
        registry.register("drops", "Dropped packets by reason", m.drops.clone());
        registry.register(
            "rule_hits",
            "Frames per network, deciding rule action and direction",
            m.rule_hits.clone(),
        );
        registry.register(
            "identity_pool_depth",
            "Pre-generated identities ready for new members",
            m.identity_pool_depth.clone(),
        );
        registry.register(
            "controller_requests",
            "Network controller requests by kind and result",
            m.controller_requests.clone(),
        );
        registry.register(
            "relayed_packets",
            "VL1 packets and fragments forwarded for other nodes",
            m.relayed_packets.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Bytes of VL1 packets and fragments forwarded for other nodes",
            m.relayed_bytes.clone(),
        );
        registry.register(
            "rendezvous_sent",
            "RENDEZVOUS introductions sent to peers",
            m.rendezvous_sent.clone(),
        );
        registry.register(
            "identity_validations",
            "Identity validations (memory-hard hashes) spent on new peers' first HELLO",
            m.identity_validations.clone(),
        );
        registry.register(
            "tap_superframes",
            "TCP superframes (segmentation offloaded by the kernel) read from TAPs and split",
            m.tap_superframes.clone(),
        );
        registry.register(
            "tap_segments",
            "Frames the TCP superframes read from TAPs were split into",
            m.tap_segments.clone(),
        );
        registry.register(
            "tap_coalesced_writes",
            "TCP superframes written to TAPs, each merged from received segments of one flow",
            m.tap_coalesced_writes.clone(),
        );
        registry.register(
            "tap_coalesced_frames",
            "Received frames merged into the TCP superframes written to TAPs",
            m.tap_coalesced_frames.clone(),
        );
        registry.register(
            "dataplane_datagrams",
            "Datagrams each data-plane thread received from its socket",
            m.dataplane_datagrams.clone(),
        );
        registry.register(
            "dataplane_forwarded",
            "Datagrams a data-plane thread handed to another thread",
            m.dataplane_forwarded.clone(),
        );
        registry.register(
            "dataplane_identities",
            "Local identities per data-plane thread",
            m.dataplane_identities.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Binds the metrics endpoint (use a loopback address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` until the task is dropped; one short-lived task per
/// connection, `Connection: close`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &metrics).await {
                        tracing::debug!(error = %e, "metrics connection");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head (at most 8 KiB, 5 s) and answers it.
async fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    let mut len = 0;
    let head_end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok::<_, std::io::Error>(Some(i));
            }
            if len == buf.len() {
                return Ok(None);
            }
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok(None);
            }
            len += n;
        }
    })
    .await
    .unwrap_or(Ok(None))?;
    let Some(end) = head_end else {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            "bad request\n",
        )
        .await;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            respond(&mut stream, "200 OK", CONTENT_TYPE, &metrics.encode()).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await,
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    }
}

/// Writes one `Connection: close` answer and shuts the stream down (also used by the HTTP
/// API).
pub(crate) async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut head = String::new();
    let _ = write!(
        head,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
