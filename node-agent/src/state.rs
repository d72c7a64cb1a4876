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
    /// A thread syncing staged files panicked.
    #[error("a thread syncing state files panicked")]
    SyncPanicked,
}

/// One change of a [`StateDir::commit`].
#[derive(Debug, Clone)]
pub enum Change {
    /// Write `bytes` to `name` atomically.
    Write {
        /// The file name.
        name: String,
        /// Its new contents.
        bytes: Vec<u8>,
        /// Its mode.
        sensitivity: Sensitivity,
    },
    /// Remove `name` (fine when it does not exist).
    Remove(String),
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
        let tmp = self.stage(name, bytes, sensitivity)?;
        self.replace(&tmp, name)?;
        self.sync_dir()
    }

    /// Removes `name` without waiting for the disk (a [`StateDir::commit`] naming this
    /// directory in `along` makes it durable); succeeds when it does not exist.
    pub fn remove_unsynced(&self, name: &str) -> Result<(), StateError> {
        self.unlink(name).map(drop)
    }

    /// Removes `name` durably; succeeds when it does not exist.
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        if self.unlink(name)? {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Makes `changes` durable together: the writes are staged as [`StateDir::write`] does
    /// (their temporary files synced in parallel, and with them the directories `along`, whose
    /// changes made with [`StateDir::remove_unsynced`] become durable first), renamed in order,
    /// the removals done, and the directory synced once. Each change stays atomic on its own;
    /// a batch of many small records costs about what one write does. On error, changes before
    /// the failing one may have been applied.
    pub fn commit(&self, changes: &[Change], along: &[&StateDir]) -> Result<(), StateError> {
        let mut staged = Vec::new();
        for c in changes {
            if let Change::Write {
                name,
                bytes,
                sensitivity,
            } = c
            {
                staged.push((
                    name.as_str(),
                    self.stage_unsynced(name, bytes, *sensitivity)?,
                ));
            }
        }
        let synced = std::thread::scope(|s| {
            // At most 8 threads: the file system commits concurrent syncs together.
            let per = staged.len().div_ceil(8).max(1);
            let mut workers: Vec<_> = staged
                .chunks(per)
                .map(|chunk| s.spawn(move || chunk.iter().try_for_each(|(_, st)| sync(st))))
                .collect();
            workers.extend(along.iter().map(|d| s.spawn(move || d.sync_dir())));
            workers
                .into_iter()
                .try_for_each(|w| w.join().unwrap_or(Err(StateError::SyncPanicked)))
        });
        let mut staged = staged.into_iter();
        let result = synced.and_then(|()| {
            for c in changes {
                match c {
                    Change::Write { .. } => {
                        if let Some((name, (tmp, _))) = staged.next() {
                            self.replace(&tmp, name)?;
                        }
                    }
                    Change::Remove(name) => {
                        self.unlink(name)?;
                    }
                }
            }
            self.sync_dir()
        });
        for (_, (tmp, _)) in staged {
            let _ = fs::remove_file(tmp);
        }
        result
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
        let staged = self.stage_unsynced(name, bytes, sensitivity)?;
        sync(&staged)?;
        Ok(staged.0)
    }

    /// Writes the temporary file of `name` (not synced yet).
    fn stage_unsynced(
        &self,
        name: &str,
        bytes: &[u8],
        sensitivity: Sensitivity,
    ) -> Result<(PathBuf, File), StateError> {
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
        Ok((tmp, f))
    }

    /// Renames the staged file `tmp` over `name` (removing `tmp` if that fails).
    fn replace(&self, tmp: &Path, name: &str) -> Result<(), StateError> {
        let path = self.path(name)?;
        fs::rename(tmp, &path).map_err(|source| {
            let _ = fs::remove_file(tmp);
            StateError::Io { path, source }
        })
    }

    /// Unlinks `name` (not synced); false when it did not exist.
    fn unlink(&self, name: &str) -> Result<bool, StateError> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Io { path, source }),
        }
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

/// Syncs a staged file (path, open file) to disk.
fn sync((path, f): &(PathBuf, File)) -> Result<(), StateError> {
    f.sync_all().map_err(|source| StateError::Io {
        path: path.clone(),
        source,
    })
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
    fn a_commit_writes_and_removes_together() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        s.write("old.json", b"old", Sensitivity::Public).unwrap();
        let mut changes: Vec<Change> = (0..20)
            .map(|i| Change::Write {
                name: format!("r{i}.json"),
                bytes: format!("record {i}").into_bytes(),
                sensitivity: Sensitivity::Secret,
            })
            .collect();
        changes.push(Change::Remove("old.json".into()));
        changes.push(Change::Remove("never-there.json".into()));
        let other = StateDir::open(dir.path().join("other")).unwrap();
        other.write("x", b"x", Sensitivity::Public).unwrap();
        other.remove_unsynced("x").unwrap();
        s.commit(&changes, &[&other]).unwrap();
        assert_eq!(other.read("x").unwrap(), None);
        assert_eq!(
            s.read("r7.json").unwrap().as_deref(),
            Some(&b"record 7"[..])
        );
        assert_eq!(mode(&s.path("r7.json").unwrap()), 0o600);
        assert_eq!(s.read("old.json").unwrap(), None);
        // The 20 records and `other`: no temporary file left.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 21);
        // A bad name fails the commit before anything is staged.
        let bad = [Change::Write {
            name: "../x".into(),
            bytes: Vec::new(),
            sensitivity: Sensitivity::Public,
        }];
        assert!(matches!(s.commit(&bad, &[]), Err(StateError::BadName(_))));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 21);
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
