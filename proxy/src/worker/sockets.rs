//! The worker's network in production: the kernel's UDP sockets, polled with mio, read and
//! written in batches (`recvmmsg`, `sendmmsg`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use super::{ANSWER_ARENA, Net, SESSION_BASE, WAKER, error_token, front_token, session_token};
use crate::dedupe::MAX_SLOTS;
use crate::session::SessionId;
use crate::udp::{self, RecvBatch, SendBatch, SendOutcome};

/// A front socket, shared by the workers through `SO_REUSEPORT`.
#[derive(Debug)]
pub(crate) struct Front {
    socket: UdpSocket,
    v6: bool,
    addr: SocketAddr,
}

impl Front {
    /// `stamps`: ask the kernel for receive timestamps (`--kernel-timestamps`).
    pub(crate) fn new(socket: std::net::UdpSocket, stamps: bool) -> io::Result<Self> {
        let addr = socket.local_addr()?;
        if stamps && let Err(e) = udp::enable_receive_timestamps(socket.as_fd()) {
            tracing::warn!(%addr, error = %e, "no kernel receive timestamps: time in the proxy counts from each turn instead");
        }
        // Without the traffic class no loop marker can be read: refuse to run blind.
        udp::enable_receive_tos(socket.as_fd(), addr.is_ipv6())?;
        Ok(Self {
            socket: UdpSocket::from_std(socket),
            v6: addr.is_ipv6(),
            addr,
        })
    }
}

/// A session's socket: its own ephemeral port, so each replica sees each player as a distinct
/// source.
#[derive(Debug)]
pub(crate) struct Upstream {
    socket: UdpSocket,
    v6: bool,
}

const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// One worker's sockets and its poll.
#[derive(Debug)]
pub(crate) struct Sockets {
    poll: Poll,
    events: Events,
    fronts: Vec<Front>,
    tx: SendBatch,
    /// Session sockets ask for kernel receive timestamps too.
    stamps: bool,
}

impl Sockets {
    /// Registers the front sockets; returns them and the waker that interrupts the poll.
    pub(crate) fn new(mut fronts: Vec<Front>, stamps: bool) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        for (i, f) in fronts.iter_mut().enumerate() {
            poll.registry()
                .register(&mut f.socket, front_token(i), Interest::READABLE)?;
        }
        let sockets = Self {
            poll,
            events: Events::with_capacity(1024),
            fronts,
            tx: SendBatch::new(ANSWER_ARENA.max(MAX_SLOTS)),
            stamps,
        };
        Ok((sockets, waker))
    }

    /// Waits up to `timeout` for readiness; the ready tokens replace `ready`'s contents.
    pub(crate) fn wait(&mut self, timeout: Duration, ready: &mut Vec<Token>) -> io::Result<()> {
        ready.clear();
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
        for e in self.events.iter() {
            let token = e.token();
            // A session socket's queued ICMP reports are read before its answers, so that a
            // replica known dead has left the session before answers are judged.
            if e.is_error() && token.0 >= SESSION_BASE {
                ready.push(error_token(token.0 - SESSION_BASE));
            }
            ready.push(token);
        }
        Ok(())
    }
}

impl Net for Sockets {
    type Upstream = Upstream;

    fn listeners(&self) -> usize {
        self.fronts.len()
    }

    fn clock(&self) -> Duration {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn listen_addr(&self, listener: usize) -> SocketAddr {
        self.fronts.get(listener).map_or(UNSPECIFIED, |f| f.addr)
    }

    fn recv_front(
        &mut self,
        listener: usize,
        batch: &mut RecvBatch,
        start: usize,
    ) -> io::Result<usize> {
        match self.fronts.get(listener) {
            Some(f) => batch.recv(f.socket.as_raw_fd(), start),
            None => Ok(0),
        }
    }

    fn send_front<'a>(
        &mut self,
        listener: usize,
        items: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
    ) -> SendOutcome {
        match self.fronts.get(listener) {
            Some(f) => self.tx.send_all(f.socket.as_raw_fd(), items, f.v6),
            None => SendOutcome::default(),
        }
    }

    /// Bound by number ([`udp::bind_ephemeral`]), so the port survives a disconnect.
    fn open(&mut self, id: SessionId, v6: bool) -> io::Result<Upstream> {
        let any = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let socket = udp::bind_ephemeral(any)?;
        udp::set_tos(socket.as_fd(), v6, crate::marker::TOS)?;
        // ICMP reports tied to the replica that provoked them, unconnected sockets included.
        udp::enable_errors(socket.as_fd(), v6)?;
        // Without timestamps answers still flow, timed from the turn instead (the front
        // sockets' warning says so once).
        if self.stamps {
            let _ = udp::enable_receive_timestamps(socket.as_fd());
        }
        let mut socket = UdpSocket::from_std(socket.into());
        self.poll
            .registry()
            .register(&mut socket, session_token(id), Interest::READABLE)?;
        Ok(Upstream { socket, v6 })
    }

    fn close(&mut self, mut up: Upstream) {
        // Dropping the socket closes it; deregistering first keeps epoll tidy.
        let _ = self.poll.registry().deregister(&mut up.socket);
    }

    fn errors(&mut self, up: &Upstream, out: &mut Vec<udp::SendError>) -> io::Result<usize> {
        udp::read_errors(up.socket.as_fd(), out)
    }

    fn recv(&mut self, up: &Upstream, batch: &mut RecvBatch, start: usize) -> io::Result<usize> {
        batch.recv(up.socket.as_raw_fd(), start)
    }

    fn connect(&mut self, up: &Upstream, to: SocketAddr) -> io::Result<()> {
        up.socket.connect(to)
    }

    fn disconnect(&mut self, up: &Upstream) -> io::Result<()> {
        udp::disconnect(up.socket.as_fd())
    }

    fn send(&mut self, up: &Upstream, payload: &[u8]) -> io::Result<usize> {
        up.socket.send(payload)
    }

    fn fan_out(&mut self, up: &Upstream, payload: &[u8], targets: &[SocketAddr]) -> SendOutcome {
        self.tx
            .fan_out(up.socket.as_raw_fd(), payload, targets, up.v6)
    }
}
