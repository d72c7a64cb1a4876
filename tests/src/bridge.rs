//! A TCP bridge between two network namespaces, for control-plane traffic only: e.g. agents in
//! harness namespaces reaching the test's kube-apiserver on the root namespace's loopback, or
//! an operator on loopback reaching a controller agent's HTTP API inside a namespace.
//!
//! The listening socket is created inside one namespace and each outgoing connection inside
//! the other, each from a short-lived thread that enters the namespace (a socket stays in the
//! namespace it was made in). Both ends are loopback or harness addresses, so nothing leaves
//! the machine. Dropping the bridge stops accepting; open connections end with their peers.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::HarnessError;
use crate::netns::Host;

/// A running bridge (see the module documentation).
#[derive(Debug)]
pub struct TcpBridge {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// Runs `f` on a fresh thread inside `ns` (or the caller's namespace when `None`).
fn in_ns<T: Send + 'static>(
    ns: Option<&Host>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = ns.map(Host::netns_path);
    std::thread::spawn(move || {
        if let Some(path) = path {
            let file = std::fs::File::open(&path)?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

impl TcpBridge {
    /// Listens on `listen` inside `listen_ns` and connects every accepted connection to `to`
    /// inside `to_ns` (`None` = the test's own namespace), copying bytes both ways.
    pub fn start(
        listen_ns: Option<&Host>,
        listen: SocketAddr,
        to_ns: Option<&Host>,
        to: SocketAddr,
    ) -> Result<Self, HarnessError> {
        let listener = in_ns(listen_ns, move || {
            let l = TcpListener::bind(listen)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(|e| HarnessError::Io(format!("bridge listener on {listen}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| HarnessError::Io("bridge listener address".into(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, to_ns) = (stop.clone(), to_ns.cloned());
        let acceptor = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        let ns = to_ns.clone();
                        std::thread::spawn(move || {
                            if let Ok(outbound) = in_ns(ns.as_ref(), move || TcpStream::connect(to))
                            {
                                splice(inbound, outbound);
                            }
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            local,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on (inside its listening namespace).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Copies both ways until either side closes.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let _ = a.set_nonblocking(false);
    let one = std::thread::spawn(move || copy(a, b2));
    copy(b, a2);
    let _ = one.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for TcpBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}
