//! The identity pool: pre-generated member identities in `HOME/pool/` (one `<address>.secret`
//! file each, ZeroTier's secret text form, written atomically, `0600`), so attaching a pod does
//! not wait for the memory-hard address search.
//!
//! A background thread at the lowest CPU priority (nice 19 and `SCHED_IDLE`) keeps the pool at
//! its target depth; [`IdentityPool::take`] removes one identity (or generates one on the
//! calling thread when the pool is empty). The depth is the `flatwire_identity_pool_depth`
//! gauge. A file that does not parse is removed with a warning when it comes up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use flatwire_vl1::Identity;
use prometheus_client::metrics::gauge::Gauge;

use crate::host::parse_secret_identity;
use crate::state::{Sensitivity, StateDir, StateError};

/// The pool directory under the state directory.
pub const POOL_DIR: &str = "pool";
/// Suffix of pool files.
const SUFFIX: &str = ".secret";

/// Errors of the identity pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The pool directory or one of its files could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// Generating an identity failed.
    #[error("cannot generate an identity: {0}")]
    Generate(String),
}

struct Inner {
    /// File names of the identities in the pool.
    files: Vec<String>,
    /// Why the refill thread stopped, if it failed.
    failed: Option<String>,
}

struct Shared {
    dir: StateDir,
    target: usize,
    inner: Mutex<Inner>,
    wake: Condvar,
    stop: AtomicBool,
    depth: Gauge,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, inner: &Inner) {
        self.depth
            .set(i64::try_from(inner.files.len()).unwrap_or(i64::MAX));
    }
}

/// The pool and its refill thread (told to stop when the pool is dropped; it is not waited
/// for, since at idle priority it may not run for a while: an identity it was storing is
/// either complete or a temporary file the next start removes).
pub struct IdentityPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IdentityPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityPool")
            .field("dir", &self.shared.dir.root())
            .field("target", &self.shared.target)
            .field("depth", &self.depth())
            .finish()
    }
}

/// Lowers the calling thread to the lowest CPU priority: nice 19 and `SCHED_IDLE`.
#[allow(unsafe_code)]
fn lowest_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id; on Linux the nice value is per thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "identity pool: setpriority");
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid, initialized sched_param that
    // outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "identity pool: SCHED_IDLE");
    }
}

fn generate(cancel: &AtomicBool) -> Result<Identity, PoolError> {
    Identity::generate(cancel).map_err(|e| PoolError::Generate(e.to_string()))
}

impl IdentityPool {
    /// Opens (creating) `HOME/pool` under `state` and starts the refill thread that keeps
    /// `target` identities there; `depth` is the gauge to keep current. Blocking file I/O.
    pub fn start(state: &StateDir, target: usize, depth: Gauge) -> Result<Self, PoolError> {
        let dir = StateDir::open(state.root().join(POOL_DIR))?;
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir.root()).map_err(|source| StateError::Io {
            path: dir.root().to_path_buf(),
            source,
        })? {
            let e = e.map_err(|source| StateError::Io {
                path: dir.root().to_path_buf(),
                source,
            })?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(SUFFIX) {
                files.push(name);
            }
        }
        files.sort();
        let shared = Arc::new(Shared {
            dir,
            target,
            inner: Mutex::new(Inner {
                files,
                failed: None,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            depth,
        });
        shared.publish(&shared.lock());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("fw-idpool".into())
            .spawn(move || refill(&s))
            .map_err(|source| StateError::Io {
                path: shared.dir.root().to_path_buf(),
                source,
            })?;
        Ok(Self { shared })
    }

    /// Identities ready now.
    pub fn depth(&self) -> usize {
        self.shared.lock().files.len()
    }

    /// Why the pool cannot refill, if it cannot (attaching still generates on demand).
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Takes an identity out of the pool (its file is removed), or generates one when the pool
    /// is empty (about a second of CPU). Blocking: call it via `spawn_blocking`.
    pub fn take(&self) -> Result<Identity, PoolError> {
        loop {
            let name = {
                let mut inner = self.shared.lock();
                let name = inner.files.pop();
                self.shared.publish(&inner);
                self.shared.wake.notify_all();
                name
            };
            let Some(name) = name else {
                tracing::info!("identity pool empty: generating a member identity now");
                return generate(&AtomicBool::new(false));
            };
            let parsed = self.shared.dir.read_with(&name, parse_secret_identity);
            self.shared.dir.remove(&name)?;
            match parsed {
                Ok(Some(id)) => return Ok(id),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "identity pool: discarded an unusable file"),
            }
        }
    }
}

impl Drop for IdentityPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }
}

/// The refill thread: waits while the pool is full, generates and stores one identity at a
/// time otherwise.
fn refill(s: &Shared) {
    lowest_priority();
    loop {
        {
            let mut inner = s.lock();
            while inner.files.len() >= s.target && !s.stop.load(Ordering::Relaxed) {
                inner = s.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
            }
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let stored = generate(&s.stop).and_then(|id| {
            let name = format!("{}{SUFFIX}", id.address());
            let secret = id
                .to_secret_string()
                .ok_or_else(|| PoolError::Generate("no secret key".into()))?;
            s.dir
                .write(&name, format!("{secret}\n").as_bytes(), Sensitivity::Secret)?;
            Ok(name)
        });
        match stored {
            Ok(name) => {
                let mut inner = s.lock();
                inner.files.push(name);
                s.publish(&inner);
            }
            Err(_) if s.stop.load(Ordering::Relaxed) => return,
            Err(e) => {
                tracing::error!(error = %e, "identity pool: refill stopped");
                s.lock().failed = Some(e.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fills_to_target_and_hands_out_distinct_identities() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let gauge = Gauge::default();
        let pool = IdentityPool::start(&state, 2, gauge.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool.depth() < 2 {
            assert!(Instant::now() < deadline, "pool did not fill");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(gauge.get(), 2);
        let files = std::fs::read_dir(dir.path().join(POOL_DIR))
            .unwrap()
            .count();
        assert_eq!(files, 2);
        let a = pool.take().unwrap();
        assert!(a.has_secret() && a.locally_validate());
        assert!(
            !dir.path()
                .join(POOL_DIR)
                .join(format!("{}{SUFFIX}", a.address()))
                .exists(),
            "a taken identity leaves the pool"
        );
        let b = pool.take().unwrap();
        assert_ne!(a.address(), b.address());
        drop(pool);
        // A restart finds what the refill thread stored meanwhile, and garbage is skipped.
        std::fs::write(dir.path().join(POOL_DIR).join("junk.secret"), "junk").unwrap();
        let pool = IdentityPool::start(&state, 0, Gauge::default()).unwrap();
        let before = pool.depth();
        assert!(before >= 1);
        for _ in 0..before {
            let id = pool.take().unwrap();
            assert!(id.has_secret());
        }
        assert_eq!(pool.depth(), 0);
        assert!(pool.failure().is_none());
    }
}
