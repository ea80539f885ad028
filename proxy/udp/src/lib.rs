//! Batched datagram I/O on Linux: `recvmmsg` and `sendmmsg`, for the proxy's workers and the
//! wrapper's anchor.
//!
//! The only `unsafe` code of the workspace lives here. The public API is safe: receive buffers are
//! owned by [`RecvBatch`], and [`SendBatch`] borrows payloads only for the duration of one call,
//! so no raw pointer outlives the memory it points to.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{BorrowedFd, RawFd};
use std::ptr;
use std::time::Duration;

use socket2::{SockAddr, SockAddrStorage};

/// Largest payload of a UDP datagram over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// Sender; `None` for an address family we do not speak.
    pub from: Option<SocketAddr>,
    /// The bytes that fit the buffer.
    pub payload: &'a [u8],
    /// The datagram was larger than the buffer.
    pub truncated: bool,
}

/// Control-message room per datagram, in 8-byte words (so `cmsghdr`s stay aligned): one
/// `SCM_TIMESTAMPNS` needs `CMSG_SPACE(16)` = 32 bytes and an `IP_TOS` or `IPV6_TCLASS`
/// `CMSG_SPACE(4)` = 24 at most; the rest is margin for others the socket may carry, which
/// are skipped.
const CONTROL_WORDS: usize = 10;

/// `mmsghdr`s with one address and one iovec each: what both directions hand the kernel.
struct Headers {
    addrs: Box<[SockAddrStorage]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl Headers {
    fn new(capacity: usize) -> Self {
        Self {
            addrs: (0..capacity).map(|_| SockAddrStorage::zeroed()).collect(),
            iovecs: (0..capacity)
                .map(|_| libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            hdrs: (0..capacity)
                // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths); `set`
                // fills every pointer before a header goes to the kernel.
                .map(|_| unsafe { mem::zeroed::<libc::mmsghdr>() })
                .collect(),
        }
    }

    fn len(&self) -> usize {
        self.hdrs.len()
    }

    /// Points header `i` at `len` bytes from `base` and at its own address slot, whose
    /// meaningful length is `namelen`.
    fn set(&mut self, i: usize, base: *mut u8, len: usize, namelen: libc::socklen_t) {
        self.iovecs[i] = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        let hdr = &mut self.hdrs[i];
        hdr.msg_len = 0;
        hdr.msg_hdr.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
        hdr.msg_hdr.msg_namelen = namelen;
        hdr.msg_hdr.msg_iov = ptr::from_mut(&mut self.iovecs[i]);
        hdr.msg_hdr.msg_iovlen = 1;
        hdr.msg_hdr.msg_control = ptr::null_mut();
        hdr.msg_hdr.msg_controllen = 0;
        hdr.msg_hdr.msg_flags = 0;
    }
}

/// Receive buffers and headers for up to `capacity` datagrams per system call.
pub struct RecvBatch {
    slot_size: usize,
    bufs: Box<[u8]>,
    control: Box<[u64]>,
    headers: Headers,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slot_size", &self.slot_size)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl RecvBatch {
    /// `capacity` buffers of `slot_size` bytes each.
    pub fn new(capacity: usize, slot_size: usize) -> Self {
        let capacity = capacity.max(1);
        let slot_size = slot_size.max(1);
        Self {
            slot_size,
            bufs: vec![0u8; capacity * slot_size].into_boxed_slice(),
            control: vec![0u64; capacity * CONTROL_WORDS].into_boxed_slice(),
            headers: Headers::new(capacity),
        }
    }

    /// How many datagrams fit.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// Receives into slots `start..capacity` without blocking; returns how many arrived
    /// (filling `start..start + n`). `WouldBlock` when none is queued.
    pub fn recv(&mut self, fd: RawFd, start: usize) -> io::Result<usize> {
        let end = self.capacity();
        if start >= end {
            return Ok(0);
        }
        let base = self.bufs.as_mut_ptr();
        let namelen = mem::size_of::<SockAddrStorage>() as libc::socklen_t;
        for i in start..end {
            // SAFETY: i < capacity, so the offset stays inside `bufs`.
            let slot = unsafe { base.add(i * self.slot_size) };
            self.headers.set(i, slot, self.slot_size, namelen);
            self.set_control(i);
        }
        loop {
            // SAFETY: headers start..end point at live buffers owned by self, sized as declared.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.headers.hdrs.as_mut_ptr().add(start),
                    (end - start) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Puts a datagram in slot `i` as `recv` would have (truncated to the slot size): for
    /// in-memory networks, such as the one the proxy's worker is tested on.
    /// `received`, when given, is written as the kernel's `SCM_TIMESTAMPNS` would be, and
    /// `tos` as its `IP_TOS`.
    pub fn fill(
        &mut self,
        i: usize,
        from: SocketAddr,
        payload: &[u8],
        received: Option<Duration>,
        tos: Option<u8>,
    ) {
        let len = payload.len().min(self.slot_size);
        let start = i * self.slot_size;
        self.bufs[start..start + len].copy_from_slice(&payload[..len]);
        let namelen = encode(from, false, &mut self.headers.addrs[i]);
        self.set_control(i);
        let hdr = &mut self.headers.hdrs[i];
        hdr.msg_len = u32::try_from(len).unwrap_or(u32::MAX);
        hdr.msg_hdr.msg_namelen = namelen;
        hdr.msg_hdr.msg_flags = if payload.len() > self.slot_size {
            libc::MSG_TRUNC
        } else {
            0
        };
        hdr.msg_hdr.msg_controllen = 0;
        let msg = &mut hdr.msg_hdr;
        let mut used = 0usize;
        if let Some(at) = received {
            let ts = libc::timespec {
                tv_sec: at.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(at.subsec_nanos()),
            };
            // SAFETY: set_control pointed msg_control at this slot's CONTROL_WORDS words; the
            // first CMSG_SPACE(size_of::<timespec>()) = 32 bytes of them hold this message,
            // written at the buffer's (8-byte aligned) start, its data unaligned-safe.
            unsafe {
                let cmsg = msg.msg_control.cast::<libc::cmsghdr>();
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_TIMESTAMPNS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::timespec>() as u32) as _;
                ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>(), ts);
                used += libc::CMSG_SPACE(mem::size_of::<libc::timespec>() as u32) as usize;
            }
        }
        if let Some(tos) = tos {
            // SAFETY: `used` (0 or 32) plus CMSG_SPACE(1) = 24 bytes stays within the slot's
            // CONTROL_WORDS * 8 = 80 bytes, and `used` keeps the header 8-byte aligned.
            unsafe {
                let cmsg = msg
                    .msg_control
                    .cast::<u8>()
                    .add(used)
                    .cast::<libc::cmsghdr>();
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_TOS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
                *libc::CMSG_DATA(cmsg) = tos;
                used += libc::CMSG_SPACE(1) as usize;
            }
        }
        msg.msg_controllen = used as _;
    }

    /// Points header `i` at its slot's control buffer, all of it offered to the kernel.
    fn set_control(&mut self, i: usize) {
        let words = &mut self.control[i * CONTROL_WORDS..(i + 1) * CONTROL_WORDS];
        let msg = &mut self.headers.hdrs[i].msg_hdr;
        msg.msg_control = words.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(words) as _;
    }

    /// When the kernel received the datagram in slot `i` (`CLOCK_REALTIME`, since the Unix
    /// epoch): its `SCM_TIMESTAMPNS`, on sockets with [`enable_receive_timestamps`]. Read on
    /// demand, apart from [`get`](Self::get), so that only the callers who want it pay.
    pub fn received(&self, i: usize) -> Option<Duration> {
        let msg = &self.headers.hdrs[i].msg_hdr;
        let ts: libc::timespec = control(msg, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)?;
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u32::try_from(ts.tv_nsec).ok()?;
        Some(Duration::new(secs, nanos))
    }

    /// The traffic class of the datagram in slot `i` (IPv4 TOS, IPv6 traffic class: DSCP and
    /// ECN), on sockets with [`enable_receive_tos`]; `None` when the kernel gave none.
    pub fn tos(&self, i: usize) -> Option<u8> {
        let msg = &self.headers.hdrs[i].msg_hdr;
        // IPv4 (on either family of socket): one byte. IPv6: an int.
        control::<u8>(msg, libc::IPPROTO_IP, libc::IP_TOS).or_else(|| {
            control::<libc::c_int>(msg, libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
                .and_then(|class| u8::try_from(class).ok())
        })
    }

    /// The datagram in slot `i` (as filled by the last [`recv`](Self::recv) covering it).
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let hdr = &self.headers.hdrs[i];
        let len = (hdr.msg_len as usize).min(self.slot_size);
        let start = i * self.slot_size;
        Datagram {
            from: decode(&self.headers.addrs[i], hdr.msg_hdr.msg_namelen),
            payload: &self.bufs[start..start + len],
            truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        }
    }
}

/// Plain data a control message carries: every bit pattern is a valid value.
trait Pod: Copy {}
impl Pod for u8 {}
impl Pod for libc::c_int {}
impl Pod for libc::timespec {}
impl Pod for libc::sock_extended_err {}

/// The first control message of `msg` at `level` and of `kind` that is long enough to hold a
/// `T`, read as one.
fn control<T: Pod>(msg: &libc::msghdr, level: libc::c_int, kind: libc::c_int) -> Option<T> {
    if msg.msg_control.is_null() || msg.msg_controllen < mem::size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: msg_control points at a buffer of msg_controllen bytes that the kernel (or
    // `fill`) wrote; the CMSG_* macros walk only within it, a message's data is read only when
    // its cmsg_len covers a T, and T is plain data (any bit pattern is a value).
    unsafe {
        let wanted = libc::CMSG_LEN(mem::size_of::<T>() as u32) as usize;
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == level
                && (*cmsg).cmsg_type == kind
                && (*cmsg).cmsg_len as usize >= wanted
            {
                return Some(ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<T>()));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

/// What a batched send achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Bytes in those datagrams.
    pub bytes: u64,
    /// Datagrams refused (buffer full, unreachable family…).
    pub failed: u64,
}

impl std::ops::AddAssign for SendOutcome {
    fn add_assign(&mut self, o: Self) {
        self.sent += o.sent;
        self.bytes += o.bytes;
        self.failed += o.failed;
    }
}

/// Headers for up to `capacity` datagrams per `sendmmsg`.
pub struct SendBatch {
    headers: Headers,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("capacity", &self.headers.len())
            .finish()
    }
}

impl SendBatch {
    /// Room for `capacity` datagrams per system call.
    pub fn new(capacity: usize) -> Self {
        Self {
            headers: Headers::new(capacity.max(1)),
        }
    }

    /// Sends one `payload` to every address of `dests`: one buffer, many destinations, one
    /// system call for up to `capacity` of them. `v6_socket`: the socket is IPv6 (dual-stack),
    /// so IPv4 destinations are written as v4-mapped addresses.
    pub fn fan_out(
        &mut self,
        fd: RawFd,
        payload: &[u8],
        dests: &[SocketAddr],
        v6_socket: bool,
    ) -> SendOutcome {
        self.send_all(fd, dests.iter().map(|d| (payload, *d)), v6_socket)
    }

    /// Sends each `(payload, destination)` pair, batching up to `capacity` per system call.
    pub fn send_all<'a>(
        &mut self,
        fd: RawFd,
        items: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
        v6_socket: bool,
    ) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        let mut n = 0;
        for (payload, dest) in items {
            let namelen = encode(dest, v6_socket, &mut self.headers.addrs[n]);
            // The kernel only reads through this pointer (sendmmsg never writes to iov_base).
            let base = payload.as_ptr().cast_mut();
            self.headers.set(n, base, payload.len(), namelen);
            n += 1;
            if n == self.headers.len() {
                outcome += self.flush(fd, n);
                n = 0;
            }
        }
        if n > 0 {
            outcome += self.flush(fd, n);
        }
        outcome
    }

    /// Sends headers `0..n`, which point at payloads borrowed by the caller for this call.
    fn flush(&mut self, fd: RawFd, n: usize) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        let mut off = 0;
        // The message already sent again once because an earlier datagram's ICMP report
        // came back on it.
        let mut retried = None;
        while off < n {
            // SAFETY: headers off..n were filled by send_all in this call; their iovecs point at
            // payloads the caller still borrows and their names at self.addrs.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.headers.hdrs.as_mut_ptr().add(off),
                    (n - off) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                for hdr in &self.headers.hdrs[off..off + r as usize] {
                    outcome.bytes += u64::from(hdr.msg_len);
                }
                outcome.sent += r as u64;
                off += r as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                // The socket buffer is full: the rest would fail the same way. UDP makes no
                // promise, and queueing here would only add latency to a game stream.
                io::ErrorKind::WouldBlock => {
                    outcome.failed += (n - off) as u64;
                    break;
                }
                // A socket that queues ICMP errors (enable_errors), or a connected one, hands a
                // pending report (port or host unreachable, about an earlier datagram to some
                // replica) to the next send, which fails for it without being sent: send it
                // again, once. If that fails too, the error is this datagram's own.
                _ if is_report(&err) && retried != Some(off) => retried = Some(off),
                // This one destination failed (no route, wrong family…); go on with the rest.
                _ => {
                    outcome.failed += 1;
                    off += 1;
                }
            }
        }
        outcome
    }
}

/// An error that reports on an earlier datagram (ICMP): the socket is fine.
pub fn is_report(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::EHOSTDOWN
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EMSGSIZE
        )
    )
}

/// A non-blocking UDP socket on an ephemeral port of `any` (0.0.0.0 or [::], dual-stack),
/// bound by number. The number matters: Linux keeps a port across [`disconnect`] only when it
/// was bound explicitly, and a session's port is the player's identity at the replicas.
pub fn bind_ephemeral(any: std::net::IpAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if any.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let new = || -> io::Result<Socket> {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if any.is_ipv6() {
            s.set_only_v6(false)?;
        }
        Ok(s)
    };
    let mut last = None;
    for _ in 0..16 {
        // Let the kernel pick a free port, then take that number (another program may take it
        // in between: try again).
        let probe = new()?;
        probe.bind(&SocketAddr::new(any, 0).into())?;
        let port = probe.local_addr()?.as_socket().map_or(0, |a| a.port());
        drop(probe);
        let socket = new()?;
        match socket.bind(&SocketAddr::new(any, port).into()) {
            Ok(()) => {
                socket.set_nonblocking(true)?;
                return Ok(socket);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Asks the kernel to stamp each datagram with its receive time (`SO_TIMESTAMPNS`), which
/// [`RecvBatch`] reads back as [`Datagram::received`]: time spent queued in the socket then
/// counts as time spent in the program, as it should.
pub fn enable_receive_timestamps(socket: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor (borrowed), and a pointer to a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            ptr::from_ref(&on).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to hand over each datagram's traffic class (`IP_RECVTOS`, and
/// `IPV6_RECVTCLASS` on an IPv6 socket, which may carry IPv4 too), read back as
/// [`RecvBatch::tos`].
pub fn enable_receive_tos(socket: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    set_int(socket, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).or_else(|e| {
        // An IPv6-only socket has no IPv4 options.
        if v6 { Ok(()) } else { Err(e) }
    })?;
    if v6 {
        set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 1)?;
    }
    Ok(())
}

/// Sends every datagram of `socket` with traffic class `tos` (IPv4 TOS, and on an IPv6
/// socket its traffic class as well, for both families it may send).
pub fn set_tos(socket: BorrowedFd<'_>, v6: bool, tos: u8) -> io::Result<()> {
    let tos = libc::c_int::from(tos);
    if v6 {
        set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos)?;
        // IPv4 through a dual-stack socket takes the IPv4 option; an IPv6-only one has none.
        let _ = set_int(socket, libc::IPPROTO_IP, libc::IP_TOS, tos);
        Ok(())
    } else {
        set_int(socket, libc::IPPROTO_IP, libc::IP_TOS, tos)
    }
}

fn set_int(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor (borrowed), and a pointer to a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            ptr::from_ref(&value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to queue the ICMP errors a socket's datagrams provoke, each with the
/// address it was sent to (`IP_RECVERR`, and `IPV6_RECVERR` on an IPv6 socket), as quinn-udp
/// does: an unconnected socket hears of them only so. Read them with [`read_errors`].
pub fn enable_errors(socket: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    if v6 {
        set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
        // IPv4 through a dual-stack socket reports through the IPv4 option.
        let _ = set_int(socket, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        Ok(())
    } else {
        set_int(socket, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}

/// One error the kernel tied to a datagram the socket sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendError {
    /// Where the datagram that provoked it was going.
    pub to: SocketAddr,
    /// The error (`ECONNREFUSED` for port unreachable, `EHOSTUNREACH`, `ENETUNREACH`,
    /// `EMSGSIZE`…).
    pub errno: i32,
}

/// Drains `socket`'s error queue (see [`enable_errors`]) into `out`, without blocking; returns
/// how many it read. Errors without a destination or an extended error record are skipped.
pub fn read_errors(socket: BorrowedFd<'_>, out: &mut Vec<SendError>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n = 0;
    loop {
        let mut name = SockAddrStorage::zeroed();
        // The offending datagram's head comes back too; its bytes are not wanted.
        let mut head = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        };
        let mut space = [0u64; 16];
        // SAFETY: all-zero is a valid msghdr; every pointer is filled below before use.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = ptr::from_mut(&mut name).cast();
        msg.msg_namelen = mem::size_of::<SockAddrStorage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&space) as _;
        // SAFETY: msg points at live buffers of the sizes it declares, all owned here.
        let r = unsafe {
            libc::recvmsg(
                socket.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(n),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        n += 1;
        let Some(to) = decode(&name, msg.msg_namelen) else {
            continue;
        };
        let record = control::<libc::sock_extended_err>(&msg, libc::IPPROTO_IP, libc::IP_RECVERR)
            .or_else(|| control(&msg, libc::IPPROTO_IPV6, libc::IPV6_RECVERR));
        let errno = record.and_then(|ee| i32::try_from(ee.ee_errno).ok());
        if let Some(errno) = errno {
            out.push(SendError { to, errno });
        }
    }
}

/// Dissolves a UDP socket's association (`connect` with `AF_UNSPEC`), so that it receives
/// from every address again and sends to the address each datagram names. The local port
/// stays only if it was bound by number ([`bind_ephemeral`]).
pub fn disconnect(socket: BorrowedFd<'_>) -> io::Result<()> {
    rustix::net::connect_unspec(socket).map_err(io::Error::from)
}

/// Writes `addr` as a C socket address for a socket of the given family (socket2 lays it
/// out); returns its length.
fn encode(addr: SocketAddr, v6_socket: bool, out: &mut SockAddrStorage) -> libc::socklen_t {
    let addr = match addr {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        other => other,
    };
    let sa = SockAddr::from(addr);
    let len = sa.len();
    *out = sa.as_storage();
    len
}

/// Reads a C socket address; v4-mapped IPv6 addresses come back as IPv4, so a client is the
/// same session whichever socket family saw it.
fn decode(s: &SockAddrStorage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: SockAddrStorage is plain old data (repr(transparent) over sockaddr_storage), so
    // a bitwise copy is sound; the kernel (or `encode`) wrote a family-tagged address of `len`
    // bytes into it, which is what SockAddr::new requires, and as_socket checks family and
    // length before it reads.
    let sa = unsafe { SockAddr::new(ptr::read(s), len) };
    match sa.as_socket()? {
        SocketAddr::V6(a) => Some(match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => SocketAddr::V6(a),
        }),
        v4 => Some(v4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::{AsFd, AsRawFd};

    #[test]
    fn address_round_trip() {
        let mut st = SockAddrStorage::zeroed();
        for addr in [
            "127.0.0.1:7777".parse().unwrap(),
            "[::1]:9".parse().unwrap(),
            "[fe80::1%3]:65535".parse().unwrap(),
        ] {
            let len = encode(addr, false, &mut st);
            assert_eq!(decode(&st, len), Some(addr));
        }
        let v4: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let len = encode(v4, true, &mut st);
        assert_eq!(
            len as usize,
            mem::size_of::<libc::sockaddr_in6>(),
            "written as IPv6"
        );
        assert_eq!(decode(&st, len), Some(v4), "mapped back to IPv4");
    }

    #[test]
    fn batched_fan_out_and_receive_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dests = [rx.local_addr().unwrap(), rx2.local_addr().unwrap()];
        let mut send = SendBatch::new(4);
        for i in 0..3u8 {
            let out = send.fan_out(tx.as_raw_fd(), &[i; 10], &dests, false);
            assert_eq!(
                out,
                SendOutcome {
                    sent: 2,
                    bytes: 20,
                    failed: 0
                }
            );
        }
        let mut recv = RecvBatch::new(8, 16);
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            // Block for the first datagram, then take whatever queued in one call.
            let mut peek = [0u8; 1];
            rx.peek_from(&mut peek).unwrap();
            let n = recv.recv(rx.as_raw_fd(), 0).unwrap();
            for i in 0..n {
                let d = recv.get(i);
                assert_eq!(d.from, Some(tx.local_addr().unwrap()));
                assert!(!d.truncated);
                got.push(d.payload.to_vec());
            }
        }
        assert_eq!(got, vec![vec![0; 10], vec![1; 10], vec![2; 10]]);
        let err = recv.recv(rx.as_raw_fd(), 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn receive_timestamps_are_read_when_asked_for() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut recv = RecvBatch::new(2, 64);
        let mut peek = [0u8; 1];
        tx.send_to(b"plain", to).unwrap();
        rx.peek_from(&mut peek).unwrap();
        assert_eq!(recv.recv(rx.as_raw_fd(), 0).unwrap(), 1);
        assert_eq!(recv.received(0), None, "not asked for");
        enable_receive_timestamps(rx.as_fd()).unwrap();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        tx.send_to(b"stamped", to).unwrap();
        rx.peek_from(&mut peek).unwrap();
        assert_eq!(recv.recv(rx.as_raw_fd(), 1).unwrap(), 1);
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert_eq!(recv.get(1).payload, b"stamped");
        let at = recv.received(1).expect("a kernel timestamp");
        assert!(
            before <= at && at <= after,
            "{before:?} <= {at:?} <= {after:?}"
        );
        // A filled slot carries the same control message, read back the same way.
        recv.fill(0, to, b"sim", Some(Duration::new(5, 7)), None);
        assert_eq!(recv.received(0), Some(Duration::new(5, 7)));
        recv.fill(0, to, b"sim", None, None);
        assert_eq!(recv.received(0), None);
    }

    #[test]
    fn the_traffic_class_a_sender_sets_is_read_on_both_families() {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
        for (bind, dual) in [
            (SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), false),
            (SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), true),
        ] {
            let rx: UdpSocket = bind_ephemeral(bind.ip()).unwrap().into();
            rx.set_nonblocking(false).unwrap();
            let port = rx.local_addr().unwrap().port();
            let mut recv = RecvBatch::new(2, 64);
            let mut peek = [0u8; 1];
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            tx.send_to(b"before", to).unwrap();
            rx.peek_from(&mut peek).unwrap();
            assert_eq!(recv.recv(rx.as_raw_fd(), 0).unwrap(), 1);
            assert_eq!(recv.tos(0), None, "not asked for");
            enable_receive_tos(rx.as_fd(), dual).unwrap();
            set_tos(tx.as_fd(), false, 0xbc).unwrap();
            tx.send_to(b"marked", to).unwrap();
            rx.peek_from(&mut peek).unwrap();
            assert_eq!(recv.recv(rx.as_raw_fd(), 0).unwrap(), 1);
            assert_eq!(
                recv.tos(0),
                Some(0xbc),
                "IPv4 to a dual-stack socket: {dual}"
            );
            if dual {
                let tx6 = UdpSocket::bind("[::1]:0").unwrap();
                set_tos(tx6.as_fd(), true, 0xbc).unwrap();
                tx6.send_to(b"six", SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
                    .unwrap();
                rx.peek_from(&mut peek).unwrap();
                assert_eq!(recv.recv(rx.as_raw_fd(), 1).unwrap(), 1);
                assert_eq!(recv.get(1).payload, b"six");
                assert_eq!(recv.tos(1), Some(0xbc), "IPv6");
            }
        }
        // A filled slot carries both messages, each read back.
        let mut recv = RecvBatch::new(1, 64);
        let at = Duration::new(5, 7);
        recv.fill(
            0,
            "127.0.0.1:9".parse().unwrap(),
            b"sim",
            Some(at),
            Some(0xbd),
        );
        assert_eq!((recv.received(0), recv.tos(0)), (Some(at), Some(0xbd)));
        recv.fill(0, "127.0.0.1:9".parse().unwrap(), b"sim", None, Some(4));
        assert_eq!((recv.received(0), recv.tos(0)), (None, Some(4)));
    }

    #[test]
    fn port_unreachable_is_tied_to_the_address_that_provoked_it() {
        use std::net::SocketAddr;
        for any in ["127.0.0.1", "::"] {
            let sock: UdpSocket = bind_ephemeral(any.parse().unwrap()).unwrap().into();
            enable_errors(sock.as_fd(), any.contains(':')).unwrap();
            let live = UdpSocket::bind("127.0.0.1:0").unwrap();
            // A port nobody holds: the kernel answers with ICMP port unreachable.
            let dead = UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let mut send = SendBatch::new(2);
            let to = [live.local_addr().unwrap(), dead];
            let out = send.fan_out(sock.as_raw_fd(), b"hello", &to, any.contains(':'));
            assert_eq!(out.sent, 2);
            let mut errors = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while errors.is_empty() && std::time::Instant::now() < deadline {
                read_errors(sock.as_fd(), &mut errors).unwrap();
            }
            let want: SocketAddr = dead;
            assert_eq!(
                errors,
                vec![SendError {
                    to: want,
                    errno: libc::ECONNREFUSED
                }],
                "{any}"
            );
            // Drained: nothing more, and the live replica got its datagram.
            assert_eq!(read_errors(sock.as_fd(), &mut errors).unwrap(), 0);
            let mut buf = [0u8; 8];
            assert_eq!(live.recv(&mut buf).unwrap(), 5);
        }
    }

    #[test]
    fn truncation_is_reported() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7; 100], rx.local_addr().unwrap()).unwrap();
        let mut recv = RecvBatch::new(2, 64);
        let mut peek = [0u8; 1];
        rx.peek_from(&mut peek).unwrap();
        assert_eq!(recv.recv(rx.as_raw_fd(), 1).unwrap(), 1);
        let d = recv.get(1);
        assert!(d.truncated);
        assert_eq!(d.payload.len(), 64);
    }

    #[test]
    fn a_disconnected_socket_keeps_its_port_and_hears_everyone_again() {
        let sock: UdpSocket = bind_ephemeral(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
            .unwrap()
            .into();
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (a, b) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        let to = sock.local_addr().unwrap();
        sock.connect(a.local_addr().unwrap()).unwrap();
        b.send_to(b"filtered", to).unwrap();
        a.send_to(b"from a", to).unwrap();
        let mut buf = [0u8; 16];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"from a", "connected: only a is heard");
        disconnect(sock.as_fd()).unwrap();
        assert_eq!(sock.local_addr().unwrap(), to, "the port survives");
        b.send_to(b"from b", to).unwrap();
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"from b"[..], b.local_addr().unwrap()));
        assert!(sock.send(b"x").is_err(), "no default destination any more");
    }
}
