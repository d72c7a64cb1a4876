//! The agent's state directory (default `/var/lib/flatwire`, `--home` to change).
//!
//! Every file is written atomically: a temporary file in the same directory, `fsync`, `rename`
//! over the old one, `fsync` of the directory. A crash at any point leaves either the old or the
//! new file, never a mix. Secrets are created `0600`. A file that exists but cannot be read or
//! parsed is an error naming its path: the agent refuses to start rather than regenerate state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Suffix of temporary files; leftovers of a crash are removed by [`StateDir::open`].
const TMP_SUFFIX: &str = ".fwtmp";

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or the directory could not be read, written or synced.
    #[error("state file {}: {source}", path.display())]
    Io {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file exists but its contents are not what the agent wrote.
    #[error(
        "state file {} is corrupted: {reason}; refusing to start (restore it from a backup or \
         remove it deliberately)",
        path.display()
    )]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A name that is not a plain file name inside the directory.
    #[error("invalid state file name {0:?}")]
    BadName(String),
}

/// Whether a file holds secrets (created `0600`) or not (`0644`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitivity {
    /// Readable by the owner only.
    Secret,
    /// World-readable.
    Public,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating with mode `0700` if missing) the directory and removes temporary files
    /// left by a crash mid-write.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err(&root))?;
        for entry in fs::read_dir(&root).map_err(io_err(&root))? {
            let entry = entry.map_err(io_err(&root))?;
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(TMP_SUFFIX) {
                let p = entry.path();
                fs::remove_file(&p).map_err(io_err(&p))?;
                tracing::warn!(path = %p.display(), "removed a temporary state file left by a crash");
            }
        }
        Ok(Self { root })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of the file `name` (a plain file name, no separators).
    pub fn path(&self, name: &str) -> Result<PathBuf, StateError> {
        let ok = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\0')
            && !name.ends_with(TMP_SUFFIX);
        if ok {
            Ok(self.root.join(name))
        } else {
            Err(StateError::BadName(name.to_string()))
        }
    }

    /// Reads a file; `None` when it does not exist, an error naming the path when it exists
    /// but cannot be read.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.path(name)?;
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Reads and parses a file with `parse`; a parse failure is [`StateError::Corrupt`] naming
    /// the path. `None` when the file does not exist.
    pub fn read_with<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, StateError> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        parse(&bytes)
            .map(Some)
            .map_err(|reason| StateError::Corrupt {
                path: self.root.join(name),
                reason,
            })
    }

    /// Reads a JSON file written by [`StateDir::write_json`].
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        self.read_with(name, |b| {
            serde_json::from_slice(b).map_err(|e| e.to_string())
        })
    }

    /// Writes a value as pretty JSON, atomically.
    pub fn write_json<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        sensitivity: Sensitivity,
    ) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Io {
            path: self.root.join(name),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        bytes.push(b'\n');
        self.write(name, &bytes, sensitivity)
    }

    /// Writes `bytes` to `name` atomically (temp file, fsync, rename, directory fsync).
    pub fn write(
        &self,
        name: &str,
        bytes: &[u8],
        sensitivity: Sensitivity,
    ) -> Result<(), StateError> {
        let path = self.path(name)?;
        let tmp = self.stage(name, bytes, sensitivity)?;
        fs::rename(&tmp, &path).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            StateError::Io {
                path: path.clone(),
                source,
            }
        })?;
        self.sync_dir()
    }

    /// Removes `name` durably; succeeds when it does not exist.
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// First half of [`StateDir::write`]: writes and syncs the temporary file, returning its
    /// path, without replacing `name`. Public so crash behaviour can be tested.
    #[doc(hidden)]
    pub fn stage(
        &self,
        name: &str,
        bytes: &[u8],
        sensitivity: Sensitivity,
    ) -> Result<PathBuf, StateError> {
        self.path(name)?;
        let tmp = self
            .root
            .join(format!(".{name}.{}{TMP_SUFFIX}", std::process::id()));
        let mode = match sensitivity {
            Sensitivity::Secret => 0o600,
            Sensitivity::Public => 0o644,
        };
        let io_err = |source| StateError::Io {
            path: tmp.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err)?;
        // The mode given to open() is filtered by the umask and ignored for an existing file.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(io_err)?;
        f.write_all(bytes).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        Ok(tmp)
    }

    fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(|source| StateError::Io {
                path: self.root.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Networks {
        joined: Vec<String>,
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let s = StateDir::open(&home).unwrap();
        assert_eq!(mode(&home), 0o700);
        assert_eq!(s.read("identity.secret").unwrap(), None);

        s.write("identity.secret", b"secret bytes", Sensitivity::Secret)
            .unwrap();
        assert_eq!(
            s.read("identity.secret").unwrap().as_deref(),
            Some(&b"secret bytes"[..])
        );
        assert_eq!(mode(&s.path("identity.secret").unwrap()), 0o600);

        let v = Networks {
            joined: vec!["8056c2e21c000001".into()],
        };
        s.write_json("networks.json", &v, Sensitivity::Public)
            .unwrap();
        assert_eq!(s.read_json::<Networks>("networks.json").unwrap(), Some(v));
        assert_eq!(mode(&s.path("networks.json").unwrap()), 0o644);

        // Overwrite replaces; remove is idempotent.
        s.write("identity.secret", b"new", Sensitivity::Secret)
            .unwrap();
        assert_eq!(
            s.read("identity.secret").unwrap().as_deref(),
            Some(&b"new"[..])
        );
        s.remove("identity.secret").unwrap();
        s.remove("identity.secret").unwrap();
        assert_eq!(s.read("identity.secret").unwrap(), None);
        // Nothing temporary is left behind.
        let names: Vec<_> = fs::read_dir(&home)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["networks.json"]);
    }

    #[test]
    fn corrupted_file_is_an_error_naming_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let v = Networks {
            joined: vec!["8056c2e21c000001".into(), "8056c2e21c000002".into()],
        };
        s.write_json("networks.json", &v, Sensitivity::Public)
            .unwrap();
        let path = s.path("networks.json").unwrap();

        // Truncated.
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() / 2]).unwrap();
        let e = s.read_json::<Networks>("networks.json").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");

        // Garbled.
        fs::write(&path, [0xff, 0x00, 0x13, 0x37]).unwrap();
        let e = s.read_json::<Networks>("networks.json").unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(e.to_string().contains("refusing to start"), "{e}");

        // Unreadable (a directory where a file should be).
        fs::create_dir(s.path("planet").unwrap()).unwrap();
        let e = s.read("planet").unwrap_err();
        assert!(matches!(e, StateError::Io { .. }), "{e}");
        assert!(e.to_string().contains("planet"), "{e}");
    }

    #[test]
    fn crash_between_temp_write_and_rename_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        s.write("identity.secret", b"old", Sensitivity::Secret)
            .unwrap();
        // The process "dies" after the temp file is written and synced, before the rename.
        let tmp = s
            .stage(
                "identity.secret",
                b"new but never renamed",
                Sensitivity::Secret,
            )
            .unwrap();
        assert!(tmp.exists());
        assert_eq!(
            s.read("identity.secret").unwrap().as_deref(),
            Some(&b"old"[..])
        );

        // The restarted agent sees the old file and the leftover is cleaned up.
        let s = StateDir::open(dir.path()).unwrap();
        assert!(!tmp.exists());
        assert_eq!(
            s.read("identity.secret").unwrap().as_deref(),
            Some(&b"old"[..])
        );
    }

    #[test]
    fn names_stay_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        for bad in ["", ".", "..", "../x", "a/b", "x.fwtmp"] {
            assert!(matches!(s.path(bad), Err(StateError::BadName(_))), "{bad}");
        }
    }
}
