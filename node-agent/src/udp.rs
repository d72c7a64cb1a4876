//! The host's UDP port, shared by every local identity: one socket, or one per data-plane
//! thread in a steered `SO_REUSEPORT` group ([`UdpPort::bind_group`]); dual-stack (IPv6 with
//! IPv4-mapped addresses) when bound to `[::]`, with batched receive (`recvmmsg`, UDP GRO) and
//! batched send (`sendmmsg` across destinations, UDP GSO for equal-sized runs to one
//! destination). Receive and GSO/GRO come from quinn-udp.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::poll::PollFlags;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, getsockopt, setsockopt,
    socket, sockopt,
};
pub use quinn_udp::{RecvMeta, Transmit};
use quinn_udp::{UdpSockRef, UdpSocketState};

/// At most this many datagrams go into one `sendmmsg` call.
pub const SEND_BATCH: usize = 64;

/// Kernel receive and send buffer asked for at bind (bytes, each way): the default (about
/// 200 KiB) overflows under a burst of a few thousand datagrams, e.g. one iperf3 stream.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Errors of binding the port.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind UDP {addr}: {source}")]
pub struct BindError {
    /// The address that was requested.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: io::Error,
}

/// What the kernel and platform offer this socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpCapabilities {
    /// Datagrams one `recv_batch` call can return (recvmmsg batch size; 1 without recvmmsg).
    pub recv_batch: usize,
    /// Datagrams one `send_batch` syscall can carry across destinations (sendmmsg).
    pub send_batch: usize,
    /// Segments one GSO send may carry (1: no UDP GSO).
    pub gso_segments: usize,
    /// Segments one GRO receive may coalesce (1: no UDP GRO).
    pub gro_segments: usize,
    /// Whether the socket takes IPv4 (mapped) and IPv6 peers.
    pub dual_stack: bool,
}

impl UdpCapabilities {
    /// The receive buffer length to use per slot for datagrams up to `max_payload` bytes, so a
    /// GRO-coalesced batch is never truncated.
    pub fn recv_buffer_len(&self, max_payload: usize) -> usize {
        max_payload * self.gro_segments.max(1)
    }
}

/// Outcome of [`UdpPort::send_batch`].
#[derive(Debug, Default)]
pub struct UdpSendOutcome {
    /// Transmits the kernel accepted.
    pub sent: usize,
    /// Transmits the kernel refused (unreachable, too large, ...); counted as drops.
    pub rejected: usize,
    /// The last refusal's error, if any.
    pub last_error: Option<io::Error>,
}

/// One UDP port of the host.
#[derive(Debug)]
pub struct UdpPort {
    socket: UdpSocket,
    state: UdpSocketState,
    v6: bool,
    dual_stack: bool,
}

impl UdpPort {
    /// Binds `addr`. An unspecified IPv6 address (`[::]:port`) gives one dual-stack socket that
    /// serves IPv4 peers too; other addresses bind exactly that family and address.
    pub fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        Self::bind_one(addr, false)
    }

    /// Binds `count` sockets on `addr` (port 0: one port the kernel picks) in one
    /// `SO_REUSEPORT` group, one per data-plane thread, and attaches `steering`, a classic BPF
    /// program that picks the socket (by bind order) for each arriving datagram from its UDP
    /// payload (see [`crate::shard`]). A GRO batch (or a sender's GSO run) is steered whole,
    /// by its first datagram. `count` 1 is [`UdpPort::bind`].
    pub fn bind_group(
        addr: SocketAddr,
        count: usize,
        steering: &[libc::sock_filter],
    ) -> Result<Vec<Self>, BindError> {
        if count <= 1 {
            return Ok(vec![Self::bind(addr)?]);
        }
        let first = Self::bind_one(addr, true)?;
        let port = first
            .local_addr()
            .map_err(|source| BindError { addr, source })?
            .port();
        let addr = SocketAddr::new(addr.ip(), port);
        let err = |source| BindError { addr, source };
        let mut group = vec![first];
        for _ in 1..count {
            group.push(Self::bind_one(addr, true)?);
        }
        let prog = libc::sock_fprog {
            len: u16::try_from(steering.len())
                .map_err(|_| err(io::ErrorKind::InvalidInput.into()))?,
            filter: steering.as_ptr().cast_mut(),
        };
        setsockopt(&group[0].socket, sockopt::AttachReusePortCbpf, &prog)
            .map_err(|e| err(e.into()))?;
        Ok(group)
    }

    fn bind_one(addr: SocketAddr, reuse_port: bool) -> Result<Self, BindError> {
        let err = |source| BindError { addr, source };
        let dual = matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified());
        let family = if addr.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let fd: OwnedFd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| err(e.into()))?;
        if dual {
            setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(|e| err(e.into()))?;
        }
        if reuse_port {
            setsockopt(&fd, sockopt::ReusePort, &true).map_err(|e| err(e.into()))?;
        }
        let bound = match addr {
            SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
            SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        };
        bound.map_err(|e| err(e.into()))?;
        let socket = UdpSocket::from(fd);
        let state = UdpSocketState::new(UdpSockRef::from(&socket)).map_err(err)?;
        size_buffers(&socket, SOCKET_BUFFER);
        Ok(Self {
            v6: addr.is_ipv6(),
            dual_stack: dual,
            socket,
            state,
        })
    }

    /// The bound address (with the actual port when 0 was asked for).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// What batching and offloads this socket has.
    pub fn capabilities(&self) -> UdpCapabilities {
        UdpCapabilities {
            recv_batch: quinn_udp::BATCH_SIZE,
            send_batch: SEND_BATCH,
            gso_segments: self.state.max_gso_segments(),
            gro_segments: self.state.gro_segments(),
            dual_stack: self.dual_stack,
        }
    }

    /// Sets the kernel receive buffer size (bytes); the kernel may cap it.
    pub fn set_recv_buffer_size(&self, bytes: usize) -> io::Result<()> {
        self.state
            .set_recv_buffer_size(UdpSockRef::from(&self.socket), bytes)
    }

    /// The kernel's (receive, send) buffer sizes in bytes, as `getsockopt` reports them (the
    /// kernel doubles the asked size for its bookkeeping).
    pub fn buffer_sizes(&self) -> io::Result<(usize, usize)> {
        Ok((
            getsockopt(&self.socket, sockopt::RcvBuf)?,
            getsockopt(&self.socket, sockopt::SndBuf)?,
        ))
    }

    /// Waits up to `timeout` (`None`: forever) for a datagram; false on timeout.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        crate::tap::wait(&self.socket, PollFlags::POLLIN, timeout)
    }

    /// Receives without blocking into `bufs`, filling `metas` (one per used buffer); returns
    /// how many buffers were filled (0 when nothing is pending). With GRO a buffer may hold
    /// several datagrams of `meta.stride` bytes each: split with [`segments`]. Source
    /// addresses are canonical (IPv4 peers appear as IPv4, not IPv4-mapped IPv6).
    pub fn recv_batch(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = match self.state.recv(UdpSockRef::from(&self.socket), bufs, metas) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        for m in &mut metas[..n] {
            m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
            m.dst_ip = m.dst_ip.map(|ip| ip.to_canonical());
        }
        Ok(n)
    }

    /// Sends every transmit, waiting while the socket buffer is full. Transmits with a
    /// `segment_size` go out as one GSO send each (or segment by segment without GSO);
    /// runs of plain transmits go out `sendmmsg` by `sendmmsg`. Per-transmit refusals are
    /// counted, not returned; only a failure of the socket itself is an error.
    pub fn send_batch(&self, transmits: &[Transmit<'_>]) -> io::Result<UdpSendOutcome> {
        let mut out = UdpSendOutcome::default();
        let mut i = 0;
        while i < transmits.len() {
            if transmits[i].segment_size.is_some() {
                self.send_segmented(&transmits[i], &mut out)?;
                i += 1;
                continue;
            }
            let run = transmits[i..]
                .iter()
                .take(SEND_BATCH)
                .take_while(|t| t.segment_size.is_none())
                .count();
            i += self.send_mmsg(&transmits[i..i + run], &mut out)?;
        }
        Ok(out)
    }

    fn send_segmented(&self, t: &Transmit<'_>, out: &mut UdpSendOutcome) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let segments = t.contents.len().div_ceil(seg);
        if segments <= 1 || self.state.max_gso_segments() >= segments {
            let t = Transmit {
                destination: self.dest(t.destination),
                segment_size: (segments > 1).then_some(seg),
                ..*t
            };
            loop {
                match self.state.try_send(UdpSockRef::from(&self.socket), &t) {
                    Ok(()) => out.sent += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.wait_writable()?;
                        continue;
                    }
                    Err(e) => {
                        out.rejected += 1;
                        out.last_error = Some(e);
                    }
                }
                return Ok(());
            }
        }
        // No (or too little) GSO: one datagram per segment, counted as one transmit.
        let parts: Vec<Transmit<'_>> = t
            .contents
            .chunks(seg)
            .map(|c| Transmit {
                contents: c,
                segment_size: None,
                ..*t
            })
            .collect();
        let mut sub = UdpSendOutcome::default();
        let mut k = 0;
        while k < parts.len() {
            let end = (k + SEND_BATCH).min(parts.len());
            k += self.send_mmsg(&parts[k..end], &mut sub)?;
        }
        if sub.rejected == 0 {
            out.sent += 1;
        } else {
            out.rejected += 1;
            out.last_error = sub.last_error;
        }
        Ok(())
    }

    /// Sends up to [`SEND_BATCH`] plain transmits with `sendmmsg`; returns how many were
    /// consumed (sent or rejected), at least one.
    #[allow(unsafe_code)]
    fn send_mmsg(&self, ts: &[Transmit<'_>], out: &mut UdpSendOutcome) -> io::Result<usize> {
        let n = ts.len().min(SEND_BATCH);
        // SAFETY: all-zero bytes are a valid value of these plain C structs.
        let mut names: [libc::sockaddr_storage; SEND_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for (k, t) in ts[..n].iter().enumerate() {
            let len = write_sockaddr(&mut names[k], self.dest(t.destination));
            iovs[k].iov_base = t.contents.as_ptr() as *mut libc::c_void;
            iovs[k].iov_len = t.contents.len();
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = (&mut names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = len;
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: hdrs[done..n] point at names/iovs that live until the end of this
            // function and at transmit contents borrowed for its duration; the kernel only
            // reads them (and writes msg_len inside hdrs).
            let r = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    hdrs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r >= 0 {
                out.sent += r as usize;
                done += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => self.wait_writable()?,
                _ if is_socket_failure(&e) => return Err(e),
                _ => {
                    // The first datagram of the rest was refused: count it, go on.
                    out.rejected += 1;
                    out.last_error = Some(e);
                    done += 1;
                }
            }
        }
        Ok(n)
    }

    fn wait_writable(&self) -> io::Result<()> {
        crate::tap::wait(
            &self.socket,
            PollFlags::POLLOUT,
            Some(Duration::from_secs(1)),
        )
        .map(|_| ())
    }

    /// The address to hand the kernel: IPv4 destinations become IPv4-mapped on IPv6 sockets.
    fn dest(&self, d: SocketAddr) -> SocketAddr {
        match d {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => other,
        }
    }
}

impl AsFd for UdpPort {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Asks for `bytes` of receive and send buffer: beyond `net.core.[rw]mem_max` with
/// `SO_*BUFFORCE` when we may (CAP_NET_ADMIN), else the plain option, which the kernel caps at
/// that limit. Logs the sizes obtained; a refusal only costs throughput, so it is not an error.
fn size_buffers(socket: &UdpSocket, bytes: usize) {
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    }
    let rcv = getsockopt(socket, sockopt::RcvBuf).unwrap_or(0);
    let snd = getsockopt(socket, sockopt::SndBuf).unwrap_or(0);
    if rcv < bytes || snd < bytes {
        tracing::warn!(
            asked = bytes,
            receive = rcv,
            send = snd,
            "UDP socket buffers capped (no CAP_NET_ADMIN: raise net.core.rmem_max/wmem_max)"
        );
    } else {
        tracing::info!(receive = rcv, send = snd, "UDP socket buffers");
    }
}

/// Errors that mean the socket itself is unusable rather than one destination refused.
fn is_socket_failure(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// Writes `addr` into `storage`; returns its length.
fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            store(storage, sin)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            store(storage, sin6)
        }
    }
}

/// Copies a concrete sockaddr into a `sockaddr_storage`; returns its length.
#[allow(unsafe_code)]
fn store<T: Copy>(storage: &mut libc::sockaddr_storage, v: T) -> libc::socklen_t {
    const { assert!(size_of::<T>() <= size_of::<libc::sockaddr_storage>()) };
    // SAFETY: sockaddr_storage is large enough and suitably aligned for every sockaddr type
    // (checked size above; its alignment is the largest of them by definition).
    unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast::<T>(), v) };
    size_of::<T>() as libc::socklen_t
}

/// Most UDP payload bytes one GSO send carries (the IPv4 total length and the UDP length are
/// 16-bit fields; this leaves room for the IP and UDP headers).
pub const GSO_MAX_BYTES: usize = 65_535 - 60 - 8;

/// Groups datagrams laid back to back in `buf` (`queued`: the length and destination of each,
/// in order) into `out`: a run to one destination whose datagrams all have the first one's
/// length, but for a last one that may be shorter, and the same `key`, becomes one GSO
/// transmit of at most `max_segments` segments and [`GSO_MAX_BYTES`]; every other datagram
/// goes alone. Order is kept. (A receiver takes a GSO run whole, so the key keeps apart what
/// it must be able to tell apart: the data plane's is the VL1 destination, by which a
/// receiving agent steers datagrams to its threads.)
pub fn coalesce<'a, K: PartialEq>(
    buf: &'a [u8],
    queued: &[(usize, SocketAddr)],
    max_segments: usize,
    key: impl Fn(&[u8]) -> K,
    out: &mut Vec<Transmit<'a>>,
) {
    let (mut i, mut at) = (0, 0);
    while i < queued.len() {
        let (seg, to) = queued[i];
        let limit = max_segments.min(GSO_MAX_BYTES / seg.max(1)).max(1);
        let first = key(&buf[at..at + seg]);
        let mut run = 1;
        let mut bytes = seg;
        while run < limit && i + run < queued.len() {
            let (len, next) = queued[i + run];
            if next != to || len > seg || len == 0 {
                break;
            }
            if key(&buf[at + bytes..at + bytes + len]) != first {
                break;
            }
            run += 1;
            bytes += len;
            if len < seg {
                break;
            }
        }
        out.push(Transmit {
            destination: to,
            ecn: None,
            contents: &buf[at..at + bytes],
            segment_size: (run > 1).then_some(seg),
            src_ip: None,
        });
        i += run;
        at += bytes;
    }
}

/// The datagrams in a received buffer: `meta.len` bytes cut into `meta.stride`-sized pieces
/// (one piece without GRO).
pub fn segments<'a>(buf: &'a [u8], meta: &RecvMeta) -> impl Iterator<Item = &'a [u8]> {
    buf[..meta.len.min(buf.len())].chunks(meta.stride.max(1))
}

/// The unspecified dual-stack address for `port` (`[::]:port`).
pub fn dual_stack_any(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
}
