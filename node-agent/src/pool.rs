//! The identity pool: pre-generated member identities in `HOME/pool/` (one `<address>.secret`
//! file each, ZeroTier's secret text form, written atomically, `0600`), so attaching a pod does
//! not wait for the memory-hard address search.
//!
//! A background thread at the lowest CPU priority (nice 19 and `SCHED_IDLE`) keeps the pool at
//! its target depth (at most [`MAX_DEPTH`]); [`IdentityPool::take`] removes one identity (or
//! generates one on the calling thread when the pool is empty). The depth is the
//! `flatwire_identity_pool_depth` gauge.
//!
//! Identities the refill thread made are kept in memory as well as in their files, so taking
//! one costs a file removal, not a parse and a memory-hard hash. Files found at start (left by
//! an earlier run) are checked by the refill thread before it generates anything (or by
//! `take` itself when nothing checked is left); a file that does not parse or whose address
//! does not match its keys is removed with a warning.
//!
//! A watcher ([`IdentityPool::watch`]) hears of every identity that enters the pool (and of
//! those checked at start), so the data plane can introduce it to the roots ahead of use;
//! [`IdentityPool::take`] hands out the oldest identity first, the one most likely warmed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use flatwire_vl1::Identity;
use prometheus_client::metrics::gauge::Gauge;

use crate::host::parse_secret_identity;
use crate::state::{Sensitivity, StateDir, StateError};

/// The pool directory under the state directory.
pub const POOL_DIR: &str = "pool";
/// The largest target depth: a deeper request is lowered to it (with a warning). 4,096
/// identities are about 1 MiB of files and an hour of idle CPU to make.
pub const MAX_DEPTH: usize = 4096;
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
    /// Checked identities and their file names.
    ready: Vec<(String, Identity)>,
    /// File names found at start, not checked yet.
    unchecked: Vec<String>,
    /// Why the refill thread stopped, if it failed.
    failed: Option<String>,
    /// Told of each identity that enters the pool (set under this lock, so each identity is
    /// announced exactly once: by [`IdentityPool::watch`] or by the refill thread).
    watcher: Option<Watcher>,
}

impl Inner {
    fn depth(&self) -> usize {
        self.ready.len() + self.unchecked.len()
    }
}

/// Told of each identity that enters the pool.
type Watcher = Arc<dyn Fn(&Identity) + Send + Sync>;

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
            .set(i64::try_from(inner.depth()).unwrap_or(i64::MAX));
    }

    /// Reads and checks the pool file `name` (removing it when it is unusable).
    fn check(&self, name: &str) -> Result<Option<Identity>, PoolError> {
        match self.dir.read_with(name, parse_secret_identity) {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "identity pool: discarded an unusable file");
                self.dir.remove(name)?;
                Ok(None)
            }
        }
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
    /// `target` identities there (at most [`MAX_DEPTH`]); `depth` is the gauge to keep
    /// current. Blocking file I/O.
    pub fn start(state: &StateDir, target: usize, depth: Gauge) -> Result<Self, PoolError> {
        if target > MAX_DEPTH {
            tracing::warn!(
                requested = target,
                max = MAX_DEPTH,
                "identity pool depth lowered to its maximum"
            );
        }
        let target = target.min(MAX_DEPTH);
        let dir = StateDir::open(state.root().join(POOL_DIR))?;
        let mut unchecked = Vec::new();
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
                unchecked.push(name);
            }
        }
        unchecked.sort();
        let shared = Arc::new(Shared {
            dir,
            target,
            inner: Mutex::new(Inner {
                ready: Vec::new(),
                unchecked,
                failed: None,
                watcher: None,
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

    /// Calls `f` with every identity ready now and, from then on, with each identity that
    /// enters the pool (from the refill thread; `f` must not block).
    pub fn watch(&self, f: impl Fn(&Identity) + Send + Sync + 'static) {
        let f: Watcher = Arc::new(f);
        let ready: Vec<Identity> = {
            let mut inner = self.shared.lock();
            inner.watcher = Some(f.clone());
            inner.ready.iter().map(|(_, id)| id.clone()).collect()
        };
        for id in &ready {
            f(id);
        }
    }

    /// Identities ready now.
    pub fn depth(&self) -> usize {
        self.shared.lock().depth()
    }

    /// Why the pool cannot refill, if it cannot (attaching still generates on demand).
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// The pool directory: a [`StateDir::commit`] naming it makes the removals of
    /// [`IdentityPool::take`] durable.
    pub fn dir(&self) -> &StateDir {
        &self.shared.dir
    }

    /// Takes an identity out of the pool (its file is removed, not durably yet: whoever
    /// records its use durably syncs [`IdentityPool::dir`] first, see [`StateDir::commit`]),
    /// or generates one when the pool is empty (about a second of CPU). Blocking: call it via
    /// `spawn_blocking`.
    pub fn take(&self) -> Result<Identity, PoolError> {
        loop {
            let (ready, unchecked) = {
                let mut inner = self.shared.lock();
                // The oldest first: it is the one most likely introduced to the roots.
                let ready = (!inner.ready.is_empty()).then(|| inner.ready.remove(0));
                let unchecked = match ready {
                    Some(_) => None,
                    None => inner.unchecked.pop(),
                };
                self.shared.publish(&inner);
                self.shared.wake.notify_all();
                (ready, unchecked)
            };
            if let Some((name, id)) = ready {
                self.shared.dir.remove_unsynced(&name)?;
                return Ok(id);
            }
            let Some(name) = unchecked else {
                tracing::info!("identity pool empty: generating a member identity now");
                return generate(&AtomicBool::new(false));
            };
            if let Some(id) = self.shared.check(&name)? {
                self.shared.dir.remove_unsynced(&name)?;
                return Ok(id);
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

/// What the refill thread does next.
enum Work {
    /// Check a file found at start.
    Check(String),
    /// Generate and store a new identity.
    Generate,
}

/// The refill thread: checks the files found at start, then waits while the pool is full
/// and generates and stores one identity at a time otherwise.
fn refill(s: &Shared) {
    lowest_priority();
    loop {
        let work = {
            let mut inner = s.lock();
            loop {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(name) = inner.unchecked.pop() {
                    break Work::Check(name);
                }
                if inner.depth() < s.target {
                    break Work::Generate;
                }
                inner = s.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
            }
        };
        let stored = match work {
            Work::Check(name) => s.check(&name).map(|id| id.map(|id| (name, id))),
            Work::Generate => generate(&s.stop).and_then(|id| {
                let name = format!("{}{SUFFIX}", id.address());
                let secret = id
                    .to_secret_string()
                    .ok_or_else(|| PoolError::Generate("no secret key".into()))?;
                s.dir
                    .write(&name, format!("{secret}\n").as_bytes(), Sensitivity::Secret)?;
                Ok(Some((name, id)))
            }),
        };
        match stored {
            Ok(Some(entry)) => {
                let id = entry.1.clone();
                let watcher = {
                    let mut inner = s.lock();
                    inner.ready.push(entry);
                    s.publish(&inner);
                    inner.watcher.clone()
                };
                // Outside the lock: the watcher must not hold up `take`.
                if let Some(w) = watcher {
                    w(&id);
                }
            }
            Ok(None) => s.publish(&s.lock()),
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
    fn the_watcher_hears_of_every_identity_and_the_oldest_is_taken_first() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let pool = IdentityPool::start(&state, 2, Gauge::default()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool.depth() < 1 {
            assert!(Instant::now() < deadline, "pool did not fill");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Registered late: the identities already there are announced at once.
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        pool.watch(move |id| h.lock().unwrap().push(id.address()));
        while heard.lock().unwrap().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "the watcher heard of too few identities"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let heard = heard.lock().unwrap().clone();
        assert_eq!(pool.take().unwrap().address(), heard[0]);
        assert_eq!(pool.take().unwrap().address(), heard[1]);
    }

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
        // A start finds the files of an earlier run; the refill thread checks them and
        // removes garbage (a wrong address for its keys is garbage too).
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let pool_dir = dir.path().join(POOL_DIR);
        std::fs::create_dir_all(&pool_dir).unwrap();
        let secret = a.to_secret_string().unwrap();
        std::fs::write(pool_dir.join(format!("{}{SUFFIX}", a.address())), &secret).unwrap();
        std::fs::write(pool_dir.join("junk.secret"), "junk").unwrap();
        let mut forged = secret.clone();
        forged.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
        std::fs::write(pool_dir.join("forged.secret"), forged).unwrap();
        let gauge = Gauge::default();
        let pool = IdentityPool::start(&state, 0, gauge.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let garbage = || ["junk.secret", "forged.secret"].map(|f| pool_dir.join(f).exists());
        // The refill thread pops a file while it checks it: wait until it checked all three.
        while garbage() != [false, false] || pool.depth() != 1 || gauge.get() != 1 {
            assert!(
                Instant::now() < deadline,
                "garbage {:?}, depth {}",
                garbage(),
                pool.depth()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pool.take().unwrap().address(), a.address());
        assert_eq!(pool.depth(), 0);
        assert_eq!(gauge.get(), 0);
        assert_eq!(std::fs::read_dir(&pool_dir).unwrap().count(), 0);
        assert!(pool.failure().is_none());
    }
}
