//! `flatwire-cni install`: puts the plugin binary into the runtime's CNI binary directory and
//! the network configuration list ([`CONFLIST_TEMPLATE`]: flatwire chained with the reference
//! `portmap` and `tuning` plugins) into its configuration directory.
//!
//! The reference `bandwidth` plugin is left out on purpose: it shapes traffic on the host end
//! of a veth pair, and a flatwire pod interface is a TAP the agent holds, with no host end, so
//! its CHECK always fails ("has no veth peer") and its ADD fails as soon as a pod asks for a
//! bandwidth limit. flatwire declares the `bandwidth` capability itself instead: the agent
//! shapes the pod interface inside the pod's namespace (see `flatwire_agent::shaping`).
//!
//! Both files are written atomically (a temporary file in the same directory, then a rename),
//! so a runtime never reads half a file and a running plugin binary is never overwritten in
//! place. Installing again with the same inputs changes nothing.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The configuration list template shipped with the crate (`conf/10-flatwire.conflist`).
pub const CONFLIST_TEMPLATE: &str = include_str!("../conf/10-flatwire.conflist");
/// The file name of the installed configuration list.
pub const CONFLIST_NAME: &str = "10-flatwire.conflist";
/// The file name of the installed plugin (the conflist's `type`).
pub const BINARY_NAME: &str = "flatwire-cni";

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// `--network` is not a network ID.
    #[error("--network {0:?} is not a network ID: expected 16 hex digits, e.g. 8056c2e21c000001")]
    BadNetwork(String),
    /// `--agent-socket` is relative (the runtime runs the plugin from another directory).
    #[error("--agent-socket {} must be an absolute path", .0.display())]
    RelativeSocket(PathBuf),
    /// A file-system step failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// The step, e.g. "read the plugin binary".
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Whether a file had to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It was created or replaced.
    Written,
    /// It already had the wanted content.
    Unchanged,
}

/// What one install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The installed binary and whether it changed.
    pub binary: (PathBuf, Change),
    /// The installed configuration list and whether it changed.
    pub conflist: (PathBuf, Change),
}

/// One install request.
#[derive(Debug, Clone)]
pub struct Install {
    /// The plugin binary to copy (normally the running executable).
    pub binary: PathBuf,
    /// The runtime's CNI binary directory (e.g. `/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The runtime's CNI configuration directory (e.g. `/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The flatwire network ID pods join; the template has none without it.
    pub network: Option<String>,
    /// The agent's socket; the template's default (`/run/flatwire/agent.sock`) without it.
    pub agent_socket: Option<PathBuf>,
}

/// The configuration list for `network` and `agent_socket`, from [`CONFLIST_TEMPLATE`].
pub fn conflist(
    network: Option<&str>,
    agent_socket: Option<&Path>,
) -> Result<String, InstallError> {
    let mut doc: Value =
        serde_json::from_str(CONFLIST_TEMPLATE).expect("the shipped template is valid JSON");
    let ours = &mut doc["plugins"][0];
    if let Some(n) = network {
        if flatwire_api::parse_network_id(n).is_none() {
            return Err(InstallError::BadNetwork(n.to_owned()));
        }
        ours["network"] = n.to_ascii_lowercase().into();
    }
    if let Some(s) = agent_socket {
        if !s.is_absolute() {
            return Err(InstallError::RelativeSocket(s.to_path_buf()));
        }
        ours["agentSocket"] = s.to_string_lossy().into_owned().into();
    }
    let mut text = serde_json::to_string_pretty(&doc).expect("a JSON value serializes");
    text.push('\n');
    Ok(text)
}

impl Install {
    /// Installs the binary (mode 0755) and the configuration list (mode 0644), creating the
    /// directories when missing.
    pub fn run(&self) -> Result<Report, InstallError> {
        let conf = conflist(self.network.as_deref(), self.agent_socket.as_deref())?;
        let binary = fs::read(&self.binary).map_err(|source| InstallError::Io {
            what: "read the plugin binary",
            path: self.binary.clone(),
            source,
        })?;
        let bin_path = self.bin_dir.join(BINARY_NAME);
        let bin_change = write_atomic(&bin_path, &binary, 0o755)?;
        let conf_path = self.conf_dir.join(CONFLIST_NAME);
        let conf_change = write_atomic(&conf_path, conf.as_bytes(), 0o644)?;
        Ok(Report {
            binary: (bin_path, bin_change),
            conflist: (conf_path, conf_change),
        })
    }
}

/// Writes `bytes` to `path` with `mode` through a temporary file and a rename, unless the file
/// already holds exactly `bytes` with that mode.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<Change, InstallError> {
    let io = |what, p: &Path| {
        let path = p.to_path_buf();
        move |source| InstallError::Io { what, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("create the directory", dir))?;
    let same_mode = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if same_mode && fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(Change::Unchanged);
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io("rename a temporary file onto", path)(e));
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the directory", dir))?;
    Ok(Change::Written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Command, NetConf};

    #[test]
    fn the_template_chains_flatwire_with_the_reference_plugins() {
        let text = conflist(Some("8056C2E21C000001"), Some(Path::new("/run/fw.sock"))).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let types: Vec<&str> = doc["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, [BINARY_NAME, "portmap", "tuning"]);
        assert_eq!(doc["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(doc["plugins"][0]["capabilities"]["bandwidth"], true);
        // Our plugin's part, as the runtime would hand it over, parses for ADD.
        let mut ours = doc["plugins"][0].clone();
        ours["name"] = doc["name"].clone();
        ours["cniVersion"] = doc["cniVersion"].clone();
        let conf = NetConf::parse(ours.to_string().as_bytes(), Command::Add).unwrap();
        assert_eq!(conf.network.as_deref(), Some("8056c2e21c000001"));
        assert_eq!(conf.agent_socket, Path::new("/run/fw.sock"));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_flag_named() {
        let e = conflist(Some("xyz"), None).unwrap_err();
        assert!(e.to_string().contains("--network \"xyz\""), "{e}");
        let e = conflist(None, Some(Path::new("agent.sock"))).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn atomic_writes_are_idempotent_and_fix_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file");
        assert_eq!(write_atomic(&path, b"one", 0o644).unwrap(), Change::Written);
        assert_eq!(
            write_atomic(&path, b"one", 0o644).unwrap(),
            Change::Unchanged
        );
        assert_eq!(write_atomic(&path, b"one", 0o755).unwrap(), Change::Written);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(write_atomic(&path, b"two", 0o755).unwrap(), Change::Written);
        assert_eq!(fs::read(&path).unwrap(), b"two");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
    }
}
