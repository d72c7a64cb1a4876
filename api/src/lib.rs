//! flatwire-api: the contract between the node agent and its local clients (the CNI plugin
//! and the CLI), served over a Unix socket.
//!
//! The gRPC service is defined in `proto/flatwire/agent/v1/agent.proto` (package
//! `flatwire.agent.v1`) and compiled at build time; [`v1`] holds the generated messages, the
//! client ([`v1::agent_client::AgentClient`]) and the server trait ([`v1::agent_server::Agent`]).
//! [`connect`] opens a client over the agent's Unix socket; [`check_api_version`] decides whether
//! an agent's API version is one this crate speaks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated code of `flatwire.agent.v1`: messages, client and server.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("flatwire.agent.v1");
}

pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};

/// Version of the agent API; a client refuses an agent whose major version differs.
pub const API_VERSION: &str = "v1";

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/flatwire/agent.sock";

/// The agent socket to use: the configured one if given and not empty, else the default.
pub fn agent_socket(configured: Option<&str>) -> PathBuf {
    PathBuf::from(
        configured
            .filter(|s| !s.trim().is_empty())
            .unwrap_or(DEFAULT_AGENT_SOCKET),
    )
}

/// Errors of the client helpers.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected (missing, refused, permission denied).
    #[error("cannot reach the flatwire agent at {}: {cause} (is flatwire-agent running?)", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// What went wrong, with the underlying cause chain.
        cause: String,
    },
    /// The connection did not complete within the connect timeout.
    #[error("the flatwire agent at {} did not answer within {timeout:?}", path.display())]
    Timeout {
        /// The socket path that was tried.
        path: PathBuf,
        /// The connect timeout that expired.
        timeout: Duration,
    },
    /// The agent speaks an API version this client does not.
    #[error("the flatwire agent speaks API {agent}, this client speaks {API_VERSION}")]
    Version {
        /// The agent's API version string.
        agent: String,
    },
    /// The agent answered a call with an error status.
    #[error("the flatwire agent refused {call}: {status}")]
    Call {
        /// The RPC that failed.
        call: &'static str,
        /// The gRPC status returned.
        status: Box<tonic::Status>,
    },
}

/// Timeouts used by [`connect`].
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// How long establishing the connection may take.
    pub connect_timeout: Duration,
    /// Deadline of every call made through the client; `None` for none.
    pub request_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Connects a gRPC client to the agent's Unix socket at `socket`.
///
/// The connection is made eagerly, so a missing or dead agent is reported here, as a
/// [`ClientError::Connect`] or [`ClientError::Timeout`] naming the socket path.
pub async fn connect(
    socket: impl AsRef<Path>,
    options: ClientOptions,
) -> Result<AgentClient<Channel>, ClientError> {
    let path = socket.as_ref().to_path_buf();
    // The URI is required by tonic but never resolved: the connector below ignores it.
    let mut endpoint = Endpoint::from_static("http://flatwire-agent.localhost")
        .connect_timeout(options.connect_timeout);
    if let Some(t) = options.request_timeout {
        endpoint = endpoint.timeout(t);
    }
    let dial = path.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let dial = dial.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(dial).await?)) }
    });
    let channel = tokio::time::timeout(
        options.connect_timeout,
        endpoint.connect_with_connector(connector),
    )
    .await
    .map_err(|_| ClientError::Timeout {
        path: path.clone(),
        timeout: options.connect_timeout,
    })?
    .map_err(|e| ClientError::Connect {
        path: path.clone(),
        cause: error_chain(&e),
    })?;
    Ok(AgentClient::new(channel))
}

/// Connects like [`connect`], then calls `Status` and checks the agent's API version.
pub async fn connect_checked(
    socket: impl AsRef<Path>,
    options: ClientOptions,
) -> Result<(AgentClient<Channel>, v1::StatusResponse), ClientError> {
    let mut client = connect(socket, options).await?;
    let status = client
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| ClientError::Call {
            call: "Status",
            status: Box::new(s),
        })?
        .into_inner();
    check_api_version(&status.api_version)?;
    Ok((client, status))
}

/// Accepts an agent API version whose major version equals [`API_VERSION`]'s (`v1`, `v1.3`).
pub fn check_api_version(agent: &str) -> Result<(), ClientError> {
    fn major(v: &str) -> Option<&str> {
        let m = v.strip_prefix('v')?.split('.').next()?;
        (!m.is_empty() && m.bytes().all(|b| b.is_ascii_digit())).then_some(m)
    }
    match (major(agent), major(API_VERSION)) {
        (Some(a), Some(ours)) if a == ours => Ok(()),
        _ => Err(ClientError::Version {
            agent: agent.to_string(),
        }),
    }
}

/// Parses a ZeroTier network id: exactly 16 hex digits.
pub fn parse_network_id(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// Formats an error and its sources as "a: b: c", skipping repeated messages.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if parts.last() != Some(&m) {
            parts.push(m);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_defaults_and_overrides() {
        assert_eq!(agent_socket(None), PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(
            agent_socket(Some("  ")),
            PathBuf::from(DEFAULT_AGENT_SOCKET)
        );
        assert_eq!(
            agent_socket(Some("/tmp/a.sock")),
            PathBuf::from("/tmp/a.sock")
        );
    }

    #[test]
    fn api_versions() {
        assert!(check_api_version("v1").is_ok());
        assert!(check_api_version("v1.7").is_ok());
        for bad in ["v2", "1", "", "v", "v10", "vx"] {
            let e = check_api_version(bad).unwrap_err();
            assert!(matches!(e, ClientError::Version { .. }), "{bad}");
        }
        assert!(
            check_api_version("v2")
                .unwrap_err()
                .to_string()
                .contains("v2")
        );
    }

    #[test]
    fn network_ids() {
        assert_eq!(
            parse_network_id("8056c2e21c000001"),
            Some(0x8056c2e21c000001)
        );
        assert_eq!(
            parse_network_id("8056C2E21C000001"),
            Some(0x8056c2e21c000001)
        );
        for bad in [
            "",
            "8056c2e21c00000",
            "8056c2e21c0000011",
            "8056c2e21c00000g",
            "+056c2e21c000001",
        ] {
            assert_eq!(parse_network_id(bad), None, "{bad}");
        }
    }
}
