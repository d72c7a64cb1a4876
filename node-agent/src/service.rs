//! The agent's gRPC service (`flatwire.agent.v1.Agent`), and serving it on a Unix socket.
//!
//! [`AgentService`] validates every request (`INVALID_ARGUMENT` naming the field), then hands
//! attachments to [`Attachments`]. `Status` is ready once the VL1 node has a root online and
//! the identity pool works (and says why not otherwise); `Attach` is `UNAVAILABLE` while it is
//! not ready. Without a running node (no planet) nothing can be attached: `Detach` and
//! `GarbageCollect` succeed with nothing removed, `Check` is `NOT_FOUND`.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flatwire_api::v1;
use flatwire_api::{AgentServer, parse_network_id};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::attach::{AttachError, AttachSpec, Attachments};
use crate::dataplane::NodeHandle;
use crate::shaping::Bandwidth;

/// The reason the agent gives while its VL1 node is not running.
pub const NODE_NOT_RUNNING: &str = "the VL1 node is not running yet";

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct AgentService {
    node: Option<Arc<NodeHandle>>,
    attachments: Option<Arc<Attachments>>,
    node_address: String,
    not_ready_reasons: Vec<String>,
}

impl Default for AgentService {
    fn default() -> Self {
        Self::not_running(String::new(), NODE_NOT_RUNNING.to_string())
    }
}

impl AgentService {
    /// A service for an agent whose node does not run, for `reason`; `node_address` is the
    /// host identity's address (empty when there is none).
    pub fn not_running(node_address: String, reason: String) -> Self {
        Self {
            node: None,
            attachments: None,
            node_address,
            not_ready_reasons: vec![reason],
        }
    }

    /// A service reporting on the running node `node` and attaching through `attachments`.
    pub fn with_node(node: Arc<NodeHandle>, attachments: Arc<Attachments>) -> Self {
        Self {
            node_address: node.address().to_string(),
            node: Some(node),
            attachments: Some(attachments),
            not_ready_reasons: Vec::new(),
        }
    }

    /// Node address (empty without a node) and the reasons it is not ready (empty: ready).
    async fn readiness(&self) -> (String, Vec<String>) {
        let Some(node) = &self.node else {
            return (self.node_address.clone(), self.not_ready_reasons.clone());
        };
        let address = self.node_address.clone();
        let mut reasons = match node.snapshot().await {
            Some(s) if s.online => Vec::new(),
            Some(s) => vec![format!(
                "no root of planet {} has answered yet (roots: {})",
                s.planet_id,
                s.roots
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )],
            None => vec!["the VL1 data plane is not answering".to_string()],
        };
        if let Some(f) = self.attachments.as_ref().and_then(|a| a.pool().failure()) {
            reasons.push(format!("the identity pool cannot refill: {f}"));
        }
        (address, reasons)
    }
}

fn check_key(key: Option<&v1::AttachmentKey>) -> Result<&v1::AttachmentKey, Status> {
    let key = key.ok_or_else(|| Status::invalid_argument("key is required"))?;
    for (field, v) in [
        ("key.network_name", &key.network_name),
        ("key.container_id", &key.container_id),
        ("key.ifname", &key.ifname),
    ] {
        if v.trim().is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
    }
    if key.ifname.len() > 15 || key.ifname.contains(['/', ' ', '\0']) {
        return Err(Status::invalid_argument(format!(
            "key.ifname {:?} is not a valid interface name",
            key.ifname
        )));
    }
    Ok(key)
}

fn check_netns(path: &str, required: bool) -> Result<(), Status> {
    if path.is_empty() && !required {
        return Ok(());
    }
    if !Path::new(path).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "netns_path {path:?} must be an absolute path"
        )));
    }
    Ok(())
}

/// Runs `work` as its own task, so it completes even when the gRPC call is cancelled.
async fn run_detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, AttachError>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(work).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("the attachment task failed: {e}"))),
    }
}

#[tonic::async_trait]
impl flatwire_api::Agent for AgentService {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let (node_address, not_ready_reasons) = self.readiness().await;
        Ok(Response::new(v1::StatusResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: flatwire_api::API_VERSION.to_string(),
            ready: not_ready_reasons.is_empty(),
            node_address,
            not_ready_reasons,
        }))
    }

    async fn attach(
        &self,
        req: Request<v1::AttachRequest>,
    ) -> Result<Response<v1::AttachResponse>, Status> {
        let req = req.into_inner();
        let key = check_key(req.key.as_ref())?.clone();
        check_netns(&req.netns_path, true)?;
        let nwid = parse_network_id(&req.network_id)
            .map(flatwire_vl2::NetworkId::from)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "network_id {:?} is not 16 hex digits",
                    req.network_id
                ))
            })?;
        let mode = match v1::Mode::try_from(req.mode) {
            Ok(v1::Mode::Secondary) => v1::Mode::Secondary,
            Ok(_) => v1::Mode::Primary,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "mode {} is not a known mode",
                    req.mode
                )));
            }
        };
        let bandwidth = Bandwidth::from(&req.bandwidth.unwrap_or_default());
        bandwidth
            .validate(None)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (_, reasons) = self.readiness().await;
        let attachments = match &self.attachments {
            Some(a) if reasons.is_empty() => a,
            _ => {
                return Err(Status::unavailable(format!(
                    "cannot attach: {}",
                    reasons.join("; ")
                )));
            }
        };
        let spec = AttachSpec {
            key,
            netns_path: req.netns_path,
            nwid,
            mode,
            pod: req.pod,
            bandwidth,
        };
        // Run to the end even if the caller goes away: a half-done attach is never left
        // behind, and the caller's retry gets the finished result.
        let a = attachments.clone();
        let result = run_detached(async move { a.attach(spec).await }).await?;
        Ok(Response::new(v1::AttachResponse {
            result: Some(result),
        }))
    }

    async fn detach(
        &self,
        req: Request<v1::DetachRequest>,
    ) -> Result<Response<v1::DetachResponse>, Status> {
        let req = req.into_inner();
        let key = check_key(req.key.as_ref())?;
        check_netns(&req.netns_path, false)?;
        let removed = match &self.attachments {
            Some(a) => {
                let (a, key) = (a.clone(), key.clone());
                run_detached(async move { a.detach(&key).await }).await?
            }
            None => false,
        };
        Ok(Response::new(v1::DetachResponse { removed }))
    }

    async fn check(
        &self,
        req: Request<v1::CheckRequest>,
    ) -> Result<Response<v1::CheckResponse>, Status> {
        let req = req.into_inner();
        let key = check_key(req.key.as_ref())?;
        check_netns(&req.netns_path, true)?;
        match &self.attachments {
            Some(a) => {
                let bandwidth = Bandwidth::from(&req.bandwidth.unwrap_or_default());
                a.check(key, &req.netns_path, req.prev_result.as_ref(), bandwidth)
                    .await?;
                Ok(Response::new(v1::CheckResponse {}))
            }
            None => Err(Status::not_found(format!(
                "no attachment {}/{}/{}",
                key.network_name, key.container_id, key.ifname
            ))),
        }
    }

    async fn list_attachments(
        &self,
        req: Request<v1::ListAttachmentsRequest>,
    ) -> Result<Response<v1::ListAttachmentsResponse>, Status> {
        let attachments = match &self.attachments {
            Some(a) => a.list(&req.get_ref().network_name).await,
            None => Vec::new(),
        };
        Ok(Response::new(v1::ListAttachmentsResponse { attachments }))
    }

    async fn garbage_collect(
        &self,
        req: Request<v1::GarbageCollectRequest>,
    ) -> Result<Response<v1::GarbageCollectResponse>, Status> {
        let req = req.into_inner();
        if req.network_name.trim().is_empty() {
            return Err(Status::invalid_argument("network_name is required"));
        }
        let removed = match &self.attachments {
            Some(a) => {
                let a = a.clone();
                run_detached(async move { a.garbage_collect(&req.network_name, &req.keep).await })
                    .await?
            }
            None => Vec::new(),
        };
        Ok(Response::new(v1::GarbageCollectResponse { removed }))
    }
}

/// Errors of binding the API socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process accepts connections on the socket.
    #[error("another agent is already listening on {}", .0.display())]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket; refusing to remove it", .0.display())]
    NotASocket(PathBuf),
    /// Any other I/O error.
    #[error("cannot listen on {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Binds the API socket at `path`: creates the parent directory, replaces a stale socket left
/// by a dead agent, refuses a live one or a non-socket file. Call from within a tokio runtime.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
            tracing::info!(path = %path.display(), "removed a stale API socket");
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    UnixListener::bind(path).map_err(io_err)
}

/// Serves `service` on `listener` until `shutdown` completes, then stops accepting and lets
/// calls in flight finish.
pub async fn serve(
    listener: UnixListener,
    service: AgentService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
