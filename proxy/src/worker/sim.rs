//! An in-memory network for the worker's unit tests: front sockets with client datagrams
//! queued, session sockets with ports, the kernel's connected-socket filter, edge-triggered
//! readiness, and a send buffer that can be made to fill up.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use mio::Token;

use super::{Net, WAKER, error_token, front_token, session_token};
use crate::session::SessionId;
use crate::udp::{RecvBatch, SendOutcome};

/// Where a datagram the worker sent left from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Front socket (listener) `n`: an answer to a client.
    Front(usize),
    /// A session socket, by its port: a client datagram to a replica.
    Port(u16),
}

/// One datagram the worker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) from: Origin,
    pub(crate) to: SocketAddr,
    pub(crate) payload: Vec<u8>,
}

#[derive(Debug)]
struct SimSocket {
    id: SessionId,
    port: u16,
    open: bool,
    connected: Option<SocketAddr>,
    inbox: VecDeque<Queued>,
    /// ICMP reports queued for the socket (its error queue).
    errors: Vec<crate::udp::SendError>,
}

/// A datagram waiting to be read: its sender, its bytes, when it "arrived", and its traffic
/// class (as the front sockets ask the kernel for it).
type Queued = (SocketAddr, Vec<u8>, Duration, Option<u8>);

/// The network. Sockets are never reused, so a closed session's port stays closed.
#[derive(Debug, Default)]
pub(crate) struct SimNet {
    fronts: Vec<VecDeque<Queued>>,
    /// The realtime clock: datagrams are stamped with it as they arrive, and the worker
    /// reads it as it sends. Tests move it.
    pub(crate) clock: Duration,
    /// Received datagrams carry no kernel timestamp, as without `--kernel-timestamps`.
    pub(crate) unstamped: bool,
    sockets: Vec<SimSocket>,
    ready: Vec<Token>,
    sent: Vec<Sent>,
    /// Datagrams the send buffers still take; `None`: unlimited.
    pub(crate) send_room: Option<usize>,
    /// Next `open` fails (the descriptor limit, say).
    pub(crate) fail_open: bool,
    /// Calls made, for assertions on the connect switching.
    pub(crate) connects: usize,
    pub(crate) disconnects: usize,
    /// Answers the connected-socket filter dropped.
    pub(crate) filtered: usize,
    /// System calls that sent (one per connected send or batch).
    pub(crate) send_calls: usize,
}

impl SimNet {
    /// A network with `listeners` front sockets.
    pub(crate) fn new(listeners: usize) -> Self {
        Self {
            fronts: vec![VecDeque::new(); listeners],
            ..Self::default()
        }
    }

    /// A client datagram arrives on front `listener`.
    pub(crate) fn client_datagram(&mut self, listener: usize, client: SocketAddr, payload: &[u8]) {
        self.client_datagram_with_tos(listener, client, payload, 0);
    }

    /// A client datagram with traffic class `tos` arrives on front `listener`.
    pub(crate) fn client_datagram_with_tos(
        &mut self,
        listener: usize,
        client: SocketAddr,
        payload: &[u8],
        tos: u8,
    ) {
        let queued = (client, payload.to_vec(), self.clock, Some(tos));
        self.fronts[listener].push_back(queued);
        self.mark(front_token(listener));
    }

    /// A replica's answer arrives at the session socket on `port` (dropped as the kernel
    /// would when that socket is connected to another address, or closed).
    pub(crate) fn answer_at(&mut self, port: u16, from: SocketAddr, payload: &[u8]) {
        let Some(s) = self.sockets.iter_mut().find(|s| s.port == port && s.open) else {
            self.filtered += 1;
            return;
        };
        if s.connected.is_some_and(|c| c != from) {
            self.filtered += 1;
            return;
        }
        s.inbox
            .push_back((from, payload.to_vec(), self.clock, None));
        let token = session_token(s.id);
        self.mark(token);
    }

    /// The kernel reports port unreachable for a datagram the session socket on `port` sent
    /// to `replica` (its process is gone): queued, and the socket's error readiness raised.
    pub(crate) fn unreachable_at(&mut self, port: u16, replica: SocketAddr) {
        let Some(s) = self.sockets.iter_mut().find(|s| s.port == port && s.open) else {
            return;
        };
        s.errors.push(crate::udp::SendError {
            to: replica,
            errno: libc::ECONNREFUSED,
        });
        let token = error_token(s.id);
        self.mark(token);
    }

    /// The replica set changed: the discovery side woke the worker.
    pub(crate) fn wake(&mut self) {
        self.mark(WAKER);
    }

    /// Readiness since the last call (edge-triggered, as mio reports it).
    pub(crate) fn poll(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.ready)
    }

    /// Nothing became ready since the last [`poll`](Self::poll).
    pub(crate) fn poll_is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// Datagrams sent since the last call, in order.
    pub(crate) fn take_sent(&mut self) -> Vec<Sent> {
        std::mem::take(&mut self.sent)
    }

    /// Ports of the session sockets that are open.
    pub(crate) fn open_ports(&self) -> Vec<u16> {
        self.sockets
            .iter()
            .filter(|s| s.open)
            .map(|s| s.port)
            .collect()
    }

    /// Client datagrams still queued on front `listener`.
    pub(crate) fn queued(&self, listener: usize) -> usize {
        self.fronts[listener].len()
    }

    fn mark(&mut self, token: Token) {
        if !self.ready.contains(&token) {
            self.ready.push(token);
        }
    }

    /// Takes one datagram into the send buffer, if it has room.
    fn take_room(&mut self) -> bool {
        match &mut self.send_room {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }

    fn emit<'a>(
        &mut self,
        from: Origin,
        items: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
    ) -> SendOutcome {
        let mut out = SendOutcome::default();
        let mut any = false;
        for (payload, to) in items {
            any = true;
            if self.take_room() {
                out.sent += 1;
                out.bytes += payload.len() as u64;
                self.sent.push(Sent {
                    from,
                    to,
                    payload: payload.to_vec(),
                });
            } else {
                out.failed += 1;
            }
        }
        if any {
            self.send_calls += 1;
        }
        out
    }
}

fn fill(
    batch: &mut RecvBatch,
    start: usize,
    queue: &mut VecDeque<Queued>,
    stamped: bool,
) -> io::Result<usize> {
    if queue.is_empty() {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let mut n = 0;
    while start + n < batch.capacity() {
        let Some((from, payload, at, tos)) = queue.pop_front() else {
            break;
        };
        batch.fill(start + n, from, &payload, stamped.then_some(at), tos);
        n += 1;
    }
    Ok(n)
}

impl Net for SimNet {
    type Upstream = usize;

    fn listeners(&self) -> usize {
        self.fronts.len()
    }

    fn clock(&self) -> Duration {
        self.clock
    }

    /// Listener `i` is 127.0.0.1:(7777 + i).
    fn listen_addr(&self, listener: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7777 + listener as u16))
    }

    fn recv_front(
        &mut self,
        listener: usize,
        batch: &mut RecvBatch,
        start: usize,
    ) -> io::Result<usize> {
        fill(batch, start, &mut self.fronts[listener], !self.unstamped)
    }

    fn send_front<'a>(
        &mut self,
        listener: usize,
        items: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
    ) -> SendOutcome {
        self.emit(Origin::Front(listener), items)
    }

    fn open(&mut self, id: SessionId, _v6: bool) -> io::Result<usize> {
        if std::mem::take(&mut self.fail_open) {
            return Err(io::Error::from_raw_os_error(24)); // EMFILE
        }
        let port = 40_000 + u16::try_from(self.sockets.len()).unwrap_or(u16::MAX - 40_000);
        self.sockets.push(SimSocket {
            id,
            port,
            open: true,
            connected: None,
            inbox: VecDeque::new(),
            errors: Vec::new(),
        });
        Ok(self.sockets.len() - 1)
    }

    fn close(&mut self, socket: usize) {
        let s = &mut self.sockets[socket];
        s.open = false;
        s.inbox.clear();
    }

    fn errors(
        &mut self,
        socket: &usize,
        out: &mut Vec<crate::udp::SendError>,
    ) -> io::Result<usize> {
        let queued = std::mem::take(&mut self.sockets[*socket].errors);
        out.extend_from_slice(&queued);
        Ok(queued.len())
    }

    fn recv(&mut self, socket: &usize, batch: &mut RecvBatch, start: usize) -> io::Result<usize> {
        fill(
            batch,
            start,
            &mut self.sockets[*socket].inbox,
            !self.unstamped,
        )
    }

    fn connect(&mut self, socket: &usize, to: SocketAddr) -> io::Result<()> {
        self.connects += 1;
        let s = &mut self.sockets[*socket];
        // What was queued before stays queued, as in Linux.
        s.connected = Some(to);
        Ok(())
    }

    fn disconnect(&mut self, socket: &usize) -> io::Result<()> {
        self.disconnects += 1;
        self.sockets[*socket].connected = None;
        Ok(())
    }

    fn send(&mut self, socket: &usize, payload: &[u8]) -> io::Result<usize> {
        let s = &self.sockets[*socket];
        let (port, to) = (s.port, s.connected);
        let Some(to) = to else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let out = self.emit(Origin::Port(port), [(payload, to)]);
        if out.sent == 1 {
            Ok(payload.len())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn fan_out(&mut self, socket: &usize, payload: &[u8], targets: &[SocketAddr]) -> SendOutcome {
        // Linux sends to an explicit destination even from a connected socket; what the
        // association changes is what the socket hears (see `answer_at`).
        let port = self.sockets[*socket].port;
        self.emit(Origin::Port(port), targets.iter().map(|t| (payload, *t)))
    }
}
