//! flatwire's test harness: the real tools at pinned versions ([`tools`]), topologies of
//! network namespaces ([`netns`]) and TCP bridges between them ([`bridge`]), a real etcd +
//! kube-apiserver ([`controlplane`]) and the Kubernetes side of tests on it ([`k8s`]), process
//! guards that end what a test started by PID ([`process`]), a lab for interop with a real
//! ZeroTier One ([`ztlab`]) and a planet of real agents ([`planet`]).
//!
//! Every end-to-end test and the demo build on this crate.

pub mod bridge;
pub mod controlplane;
pub mod k8s;
pub mod netns;
pub mod planet;
pub mod process;
pub mod tools;
pub mod ztlab;

use std::path::PathBuf;

/// Why the harness could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The binary is not in the pinned tools table.
    #[error("{0} is not a pinned tool (see tests/src/tools.rs)")]
    UnknownTool(String),
    /// A pinned tool is not installed.
    #[error("{binary} is not installed at {}: run `cargo xtask tools`", path.display())]
    ToolMissing {
        /// The binary asked for.
        binary: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// A process could not be started.
    #[error("could not start {what}: {source}")]
    Spawn {
        /// What was being started.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command exited with failure.
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The harness refused a request that would break its safety rules.
    #[error("refused: {0}")]
    Refused(String),
    /// A service did not become ready.
    #[error("{what} {why}; last log lines:\n{log}")]
    NotReady {
        /// The service.
        what: String,
        /// What went wrong.
        why: String,
        /// The tail of its log.
        log: String,
    },
    /// A file-system operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}
