//! Member TAP devices: created right inside the network namespace they serve (the host's, or a
//! pod's under its final name), while the agent keeps reading and writing Ethernet frames on
//! its own fds.
//!
//! Work inside a namespace runs on a dedicated OS thread that `setns`es into it ([`in_netns`],
//! never on a tokio worker) and talks rtnetlink there; nothing here shells out to `ip`.
//!
//! Every TAP is opened with `IFF_VNET_HDR` and the TCP offloads (`TUN_F_CSUM`, `TUN_F_TSO4`,
//! `TUN_F_TSO6`): the kernel hands over TCP superframes of up to 64 KiB with partial
//! checksums, one read each, instead of one read per MTU-sized frame. [`TapQueue::recv_batch`]
//! completes checksums and splits superframes into MTU-sized frames ([`crate::offload`]), so
//! its callers see plain Ethernet frames as before. [`TapQueue::send_batch`] merges runs of
//! TCP segments of one flow whose checksums it verified into superframes
//! ([`offload::coalesce`]), one write each, and writes other frames behind an empty virtio
//! header (no offload claimed: frames come from remote peers, so the kernel checks them).
//! What was split, merged and dropped is counted ([`offload_counters`]).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use tokio_stream::StreamExt;
use tun_rs::{DeviceBuilder, Layer, SyncDevice};

use crate::offload::{self, HEAD_MAX, MAX_SEGMENTS, OffloadDrop, Plan, Received, VNET_HDR_LEN};

/// Errors of TAP creation and namespace configuration.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The TAP device (or one of its queues) could not be created.
    #[error("cannot create TAP device {name}: {source}")]
    Create {
        /// The requested host-side name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// The network namespace could not be opened or entered.
    #[error("cannot enter network namespace {}: {source}", path.display())]
    Netns {
        /// The namespace path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("netlink: cannot {what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The rtnetlink error.
        source: rtnetlink::Error,
    },
    /// The link disappeared between steps.
    #[error("link {0} not found")]
    LinkNotFound(String),
    /// Any other I/O error (runtime setup, thread spawn, poll).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The namespace worker thread panicked.
    #[error("the network namespace worker thread panicked")]
    ThreadPanicked,
}

/// How to create a TAP device in the host namespace.
#[derive(Debug, Clone)]
pub struct TapConfig {
    /// Host-side interface name (at most 15 bytes, unique on the host), e.g. `fwt1a2b3c4d`.
    pub name: String,
    /// The member's MAC address.
    pub mac: [u8; 6],
    /// The interface MTU.
    pub mtu: u16,
    /// Number of queues (fds); more than one creates an `IFF_MULTI_QUEUE` device.
    pub queues: usize,
}

/// An IP prefix: an address and a prefix length, e.g. `10.147.17.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl std::str::FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: no prefix length"))?;
        let addr: IpAddr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix length above {max}"));
        }
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A route through the link: destination prefix and optional gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRoute {
    /// Destination prefix.
    pub dst: IpPrefix,
    /// Next hop; `None` for on-link.
    pub gateway: Option<IpAddr>,
}

/// A TAP device held by the agent: one fd per queue. Dropping it closes the fds, which
/// destroys the (non-persistent) device wherever it lives.
#[derive(Debug)]
pub struct Tap {
    queues: Vec<TapQueue>,
    ifindex: u32,
}

/// One queue (fd) of a TAP device, non-blocking, with batched frame I/O.
pub struct TapQueue {
    dev: SyncDevice,
    /// The last superframe read and the segments of it not yet handed out.
    rx: Mutex<Superframe>,
}

/// Bytes of one read: the virtio header, the largest IP packet (64 KiB, IPv6 header on top)
/// behind an Ethernet header with a VLAN tag, and one more so that a cut read shows.
const READ_BUF: usize = VNET_HDR_LEN + 18 + 40 + 65_535 + 1;

/// A read from the TAP and the split in progress.
struct Superframe {
    buf: Vec<u8>,
    len: usize,
    /// The plan and the next segment to write.
    pending: Option<(Plan, usize)>,
}

/// Offload work of all TAPs of the process, counted since it started (see
/// [`offload_counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadCounters {
    /// TCP superframes read and split.
    pub superframes: u64,
    /// Frames they were split into.
    pub segments: u64,
    /// Reads dropped, per [`OffloadDrop::ALL`] reason.
    pub drops: [u64; OffloadDrop::ALL.len()],
    /// Reads that filled the whole buffer (cut by the kernel), dropped.
    pub too_long: u64,
    /// TCP superframes written, each merged from received segments.
    pub coalesced: u64,
    /// Frames merged into them.
    pub coalesced_frames: u64,
}

/// Name of the drop reason of [`OffloadCounters::too_long`].
pub const TOO_LONG: &str = "TapReadTooLong";

static SUPERFRAMES: AtomicU64 = AtomicU64::new(0);
static SEGMENTS: AtomicU64 = AtomicU64::new(0);
static TOO_LONG_READS: AtomicU64 = AtomicU64::new(0);
static COALESCED: AtomicU64 = AtomicU64::new(0);
static COALESCED_FRAMES: AtomicU64 = AtomicU64::new(0);
static DROPS: [AtomicU64; OffloadDrop::ALL.len()] =
    [const { AtomicU64::new(0) }; OffloadDrop::ALL.len()];

/// The offload counters of all TAPs of this process.
pub fn offload_counters() -> OffloadCounters {
    OffloadCounters {
        superframes: SUPERFRAMES.load(Ordering::Relaxed),
        segments: SEGMENTS.load(Ordering::Relaxed),
        drops: std::array::from_fn(|i| DROPS[i].load(Ordering::Relaxed)),
        too_long: TOO_LONG_READS.load(Ordering::Relaxed),
        coalesced: COALESCED.load(Ordering::Relaxed),
        coalesced_frames: COALESCED_FRAMES.load(Ordering::Relaxed),
    }
}

/// Counts one batch's offload work (one atomic add per kind, not per frame).
fn count(c: &OffloadCounters) {
    for (n, total) in [
        (c.superframes, &SUPERFRAMES),
        (c.segments, &SEGMENTS),
        (c.too_long, &TOO_LONG_READS),
        (c.coalesced, &COALESCED),
        (c.coalesced_frames, &COALESCED_FRAMES),
    ]
    .into_iter()
    .chain(c.drops.iter().copied().zip(&DROPS))
    {
        if n > 0 {
            total.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

impl std::fmt::Debug for TapQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TapQueue(fd {})", self.dev.as_raw_fd())
    }
}

/// Outcome of [`TapQueue::send_batch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Frames the kernel accepted.
    pub sent: usize,
    /// Their bytes (Ethernet headers included, virtio headers not).
    pub bytes: usize,
    /// Frames the kernel refused (e.g. oversized); the caller counts them as drops.
    pub rejected: usize,
}

impl Tap {
    /// Creates the TAP device (L2, no packet-info header, virtio headers with the TCP
    /// offloads) with its MAC, MTU and queues in the current network namespace,
    /// administratively down.
    pub fn create(config: &TapConfig) -> Result<Self, TapError> {
        let err = |source| TapError::Create {
            name: config.name.clone(),
            source,
        };
        let queues = config.queues.max(1);
        let first = DeviceBuilder::new()
            .name(&config.name)
            .layer(Layer::L2)
            .mac_addr(config.mac)
            .mtu(config.mtu)
            .multi_queue(queues > 1)
            .offload(true)
            .enable(false)
            .build_sync()
            .map_err(err)?;
        set_offloads(&first).map_err(err)?;
        let ifindex = first.if_index().map_err(err)?;
        let mut devs = vec![first];
        for _ in 1..queues {
            devs.push(devs[0].try_clone().map_err(err)?);
        }
        let queues = devs
            .into_iter()
            .map(|dev| {
                dev.set_nonblocking(true)?;
                let rx = Mutex::new(Superframe {
                    buf: vec![0; READ_BUF],
                    len: 0,
                    pending: None,
                });
                Ok(TapQueue { dev, rx })
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(err)?;
        Ok(Self { queues, ifindex })
    }

    /// The queues; frames of one flow always arrive on the same queue.
    pub fn queues(&self) -> &[TapQueue] {
        &self.queues
    }

    /// The interface index (in the namespace it was created in).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

/// Sets the device's offloads to exactly the TCP ones (the builder also turns on UDP
/// segmentation where the kernel has it, which [`crate::offload`] does not split) and its
/// virtio header to [`VNET_HDR_LEN`] bytes. Both are device-wide.
#[allow(unsafe_code)]
fn set_offloads(dev: &SyncDevice) -> io::Result<()> {
    let fd = dev.as_raw_fd();
    let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: `fd` is the open TAP of `dev`; TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: `fd` is the open TAP of `dev`; TUNSETVNETHDRSZ reads one int through the
    // pointer, which points to `len`, alive for the call.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &len as *const libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a link in the current network namespace should look like (see [`configure_link`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// The interface MTU.
    pub mtu: u32,
    /// Exactly these addresses (others are removed, IPv6 link-local ones excepted).
    pub addresses: Vec<IpPrefix>,
    /// Routes to add through the link (ones that already exist are fine).
    pub routes: Vec<LinkRoute>,
}

/// Runs `f` with an rtnetlink handle on a fresh single-threaded runtime: netlink round trips
/// block, so call it from a plain OS thread, never from a tokio worker.
fn netlink<T>(
    f: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T, TapError>,
) -> Result<T, TapError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| TapError::Io {
            what: "build netlink runtime",
            source,
        })?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| TapError::Io {
            what: "open rtnetlink socket",
            source,
        })?;
        tokio::spawn(conn);
        f(handle).await
    })
}

/// Adds `routes` through link `index`; routes that already exist (the kernel adds the
/// connected route of an address itself) are fine.
async fn add_routes(
    handle: &rtnetlink::Handle,
    index: u32,
    routes: &[LinkRoute],
) -> Result<(), TapError> {
    let invalid = |what, e: String| TapError::Io {
        what,
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    };
    for r in routes {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.addr, r.dst.len)
            .map_err(|e| invalid("route destination", e.to_string()))?
            .output_interface(index);
        if let Some(gw) = r.gateway {
            b = b
                .gateway(gw)
                .map_err(|e| invalid("route gateway", e.to_string()))?;
        }
        match handle.route().add(b.build()).execute().await {
            Err(e) if !exists(&e) => {
                return Err(TapError::Netlink {
                    what: format!("add route {} via {:?}", r.dst, r.gateway),
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// Brings the link `ifindex` of the current network namespace up with `state`'s MTU,
/// reconciles its addresses to `state.addresses` and adds `state.routes`. Idempotent.
/// Blocks on its own single-threaded runtime: call it from a plain OS thread, never from a
/// tokio worker.
pub fn configure_link(ifindex: u32, state: &LinkState) -> Result<(), TapError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let nl = |what: String| move |source| TapError::Netlink { what, source };
    netlink(async |handle| {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(ifindex)
                    .mtu(state.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("set link {ifindex} up, mtu {}", state.mtu)))?;
        let mut have = Vec::new();
        let mut stale = Vec::new();
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute();
        while let Some(msg) = addrs.next().await {
            let msg = msg.map_err(nl(format!("list addresses of link {ifindex}")))?;
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(addr) = addr else { continue };
            let p = IpPrefix {
                addr,
                len: msg.header.prefix_len,
            };
            let link_local = matches!(addr, IpAddr::V6(a) if a.is_unicast_link_local());
            if state.addresses.contains(&p) {
                have.push(p);
            } else if !link_local {
                stale.push(msg);
            }
        }
        for msg in stale {
            handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl(format!("remove a stale address of link {ifindex}")))?;
        }
        for a in state.addresses.iter().filter(|a| !have.contains(a)) {
            match handle.address().add(ifindex, a.addr, a.len).execute().await {
                Err(e) if !exists(&e) => {
                    return Err(nl(format!("add address {a} to link {ifindex}"))(e));
                }
                _ => {}
            }
        }
        add_routes(&handle, ifindex, &state.routes).await?;
        Ok(())
    })
}

/// Runs `f` on a dedicated OS thread inside the network namespace at `netns` (the thread ends
/// afterwards, so the namespace never leaks to other work). Blocks the calling thread: from
/// async code call it via `spawn_blocking`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, TapError> + Send + 'static,
) -> Result<T, TapError> {
    in_netns_as(netns, f)
}

/// [`in_netns`] for work with an error type of its own.
pub fn in_netns_as<T: Send + 'static, E: From<TapError> + Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    let ns_path = netns.to_path_buf();
    let ns = File::open(netns).map_err(|source| TapError::Netns {
        path: ns_path.clone(),
        source,
    })?;
    let worker = std::thread::Builder::new()
        .name("fw-netns".into())
        .spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| TapError::Netns {
                path: ns_path,
                source: e.into(),
            })?;
            f()
        })
        .map_err(|source| TapError::Io {
            what: "spawn netns thread",
            source,
        })?;
    worker.join().map_err(|_| TapError::ThreadPanicked)?
}

/// A link as found in a namespace (see [`inspect_link`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Its interface index.
    pub ifindex: u32,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses (IPv6 link-local ones left out).
    pub addresses: Vec<IpPrefix>,
}

/// The link named `ifname` in the current network namespace, `None` if there is none.
/// Blocks on its own single-threaded runtime: call it from a plain OS thread (e.g. inside
/// [`in_netns`]), never from a tokio worker.
pub fn inspect_link(ifname: &str) -> Result<Option<LinkInfo>, TapError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::link::LinkAttribute;
    let nl = |what: String| move |source| TapError::Netlink { what, source };
    netlink(async |handle| {
        let mut links = handle.link().get().match_name(ifname.to_string()).execute();
        let msg = match links.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(rtnetlink::Error::NetlinkError(e))) if e.raw_code() == -libc::ENODEV => {
                return Ok(None);
            }
            Some(Err(e)) => return Err(nl(format!("look up {ifname}"))(e)),
            None => return Ok(None),
        };
        let ifindex = msg.header.index;
        let mut info = LinkInfo {
            ifindex,
            mac: [0; 6],
            mtu: 0,
            addresses: Vec::new(),
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::Address(m) => {
                    if let Ok(m) = <[u8; 6]>::try_from(m.as_slice()) {
                        info.mac = m;
                    }
                }
                LinkAttribute::Mtu(m) => info.mtu = *m,
                _ => {}
            }
        }
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute();
        while let Some(msg) = addrs.next().await {
            let msg = msg.map_err(nl(format!("list addresses of {ifname}")))?;
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            match addr {
                Some(IpAddr::V6(a)) if a.is_unicast_link_local() => {}
                Some(addr) => info.addresses.push(IpPrefix {
                    addr,
                    len: msg.header.prefix_len,
                }),
                None => {}
            }
        }
        Ok(Some(info))
    })
}

impl TapQueue {
    /// Waits up to `timeout` (`None`: forever) until a frame can be read; false on timeout.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        wait(&self.dev, PollFlags::POLLIN, timeout)
    }

    /// Reads up to `bufs.len()` frames without blocking, frame `i` into `bufs[i]` with its
    /// length in `lens[i]`; returns how many were read (0 when none is pending). Checksums
    /// left partial by the kernel are completed and TCP superframes are split into frames of
    /// the link's MTU (segments left over come first in the next call). A frame longer than
    /// its buffer is cut to it; callers size buffers for the MTU plus the 14-byte Ethernet
    /// header. Malformed reads are dropped and counted ([`offload_counters`]).
    pub fn recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        lens: &mut [usize],
    ) -> io::Result<usize> {
        let max = bufs.len().min(lens.len());
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let rx = &mut *rx;
        let mut counts = OffloadCounters::default();
        let mut n = 0;
        let mut result = Ok(());
        while n < max {
            let out = bufs[n].as_mut();
            if let Some((plan, i)) = rx.pending {
                let len = plan.write_segment(&rx.buf[VNET_HDR_LEN..rx.len], i, out);
                rx.pending = (i + 1 < plan.segments()).then_some((plan, i + 1));
                if len == 0 {
                    // A smaller buffer than the plan was made for.
                    counts.drops[OffloadDrop::BadGsoSize as usize] += 1;
                    rx.pending = None;
                    continue;
                }
                lens[n] = len;
                n += 1;
                continue;
            }
            let len = match self.dev.recv(&mut rx.buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if n == 0 {
                        result = Err(e);
                    }
                    break;
                }
            };
            if len == rx.buf.len() {
                counts.too_long += 1;
                continue;
            }
            let read = &mut rx.buf[..len];
            match offload::classify(read, out.len()) {
                Ok(Received::Frame) => {
                    let frame = &read[VNET_HDR_LEN..];
                    let len = frame.len().min(out.len());
                    out[..len].copy_from_slice(&frame[..len]);
                    lens[n] = len;
                    n += 1;
                }
                Ok(Received::Split(plan)) => {
                    counts.superframes += 1;
                    counts.segments += plan.segments() as u64;
                    rx.len = len;
                    rx.pending = Some((plan, 0));
                }
                Err(r) => counts.drops[r as usize] += 1,
            }
        }
        count(&counts);
        result.map(|()| n)
    }

    /// Writes the frames in order: runs of TCP segments of one flow as one superframe each
    /// ([`offload::coalesce`]), other frames each behind an empty virtio header. Stops early
    /// (returning what was done) only when the device would block; frames the kernel refuses
    /// are counted in [`SendOutcome::rejected`], merged ones in [`offload_counters`].
    pub fn send_batch<F: AsRef<[u8]>>(&self, frames: &[F]) -> io::Result<SendOutcome> {
        const NO_OFFLOAD: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
        let mut out = SendOutcome::default();
        let mut counts = OffloadCounters::default();
        let mut head = [0u8; HEAD_MAX];
        let mut rest = frames;
        let result = loop {
            let Some(first) = rest.first() else {
                break Ok(());
            };
            let run = offload::coalesce(rest, &mut head);
            let (run_frames, after) = rest.split_at(run.frames);
            rest = after;
            let bytes: usize = run_frames.iter().map(|f| f.as_ref().len()).sum();
            let written = if run.is_superframe() {
                let mut iov = [io::IoSlice::new(&[]); MAX_SEGMENTS + 1];
                for (slot, part) in iov.iter_mut().zip(run.parts(&head, run_frames)) {
                    *slot = io::IoSlice::new(part);
                }
                self.write(&iov[..run.frames + 1])
            } else {
                self.write(&[
                    io::IoSlice::new(&NO_OFFLOAD),
                    io::IoSlice::new(first.as_ref()),
                ])
            };
            match written {
                Ok(true) => {
                    out.sent += run.frames;
                    out.bytes += bytes;
                    if run.is_superframe() {
                        counts.coalesced += 1;
                        counts.coalesced_frames += run.frames as u64;
                    }
                }
                Ok(false) => out.rejected += run.frames,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        count(&counts);
        result.map(|()| out)
    }

    /// Writes one frame (virtio header first) from `iov`: true when the kernel took it, false
    /// when it refused it; errors only when the device would block or is gone.
    fn write(&self, iov: &[io::IoSlice<'_>]) -> io::Result<bool> {
        loop {
            return match self.dev.send_vectored(iov) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::EBADFD) =>
                {
                    Err(e)
                }
                Err(_) => Ok(false),
            };
        }
    }

    /// The queue's raw fd (for an external poller).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.dev.as_raw_fd()
    }
}

/// Polls one fd for `events`; false on timeout.
pub(crate) fn wait(
    fd: &impl AsFd,
    events: PollFlags,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
    };
    let mut fds = [PollFd::new(fd.as_fd(), events)];
    loop {
        match poll(&mut fds, t) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p: IpPrefix = "198.18.0.1/24".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.0.1/24");
        let p: IpPrefix = "fd00::1/88".parse().unwrap();
        assert_eq!(p.len, 88);
        for bad in [
            "198.18.0.1",
            "198.18.0.1/33",
            "fd00::1/129",
            "x/1",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<IpPrefix>().is_err(), "{bad}");
        }
    }
}
