//! flatwire-api: the contract between the node agent and its local clients (the CNI plugin
//! and the CLI), served over a Unix socket.

use std::path::PathBuf;

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
}
