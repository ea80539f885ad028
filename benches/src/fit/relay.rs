//! A recording UDP relay: `fit` puts one in front of each replica (to see what every replica
//! sends every session, whichever answer the proxy delivers) and one in front of the proxy
//! for the studio's own clients (to see what they got). Each peer gets an upstream socket of
//! its own, so the target still sees every peer as a distinct address.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use super::evidence::Seen;

/// What crossed the relay for one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerLog {
    /// Datagrams from the peer to the target.
    pub sent: Vec<Seen>,
    /// Datagrams from the target back to the peer.
    pub answers: Vec<Seen>,
}

type Logs = Arc<Mutex<HashMap<SocketAddr, PeerLog>>>;

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    /// Where peers send.
    pub addr: SocketAddr,
    logs: Logs,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const FRONT: Token = Token(0);

impl Relay {
    /// A relay on loopback to `target`; times are taken from `origin`.
    pub fn start(target: SocketAddr, origin: Instant) -> std::io::Result<Self> {
        let local: SocketAddr = if target.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        }
        .parse()
        .map_err(std::io::Error::other)?;
        let mut front = UdpSocket::bind(local)?;
        let addr = front.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut front, FRONT, Interest::READABLE)?;
        let logs: Logs = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (logs.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fit-relay".into())
            .spawn(move || run(poll, front, target, local, origin, &l, &s))?;
        Ok(Self {
            addr,
            logs,
            stop,
            thread: Some(thread),
        })
    }

    /// What crossed so far, by peer.
    pub fn logs(&self) -> HashMap<SocketAddr, PeerLog> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut poll: Poll,
    front: UdpSocket,
    target: SocketAddr,
    local: SocketAddr,
    origin: Instant,
    logs: &Logs,
    stop: &AtomicBool,
) {
    let mut events = Events::with_capacity(256);
    let mut upstreams: Vec<(SocketAddr, UdpSocket)> = Vec::new();
    let mut by_peer: HashMap<SocketAddr, usize> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    let record = |peer: SocketAddr, bytes: &[u8], answer: bool| {
        let seen = Seen {
            at: origin.elapsed(),
            bytes: bytes.to_vec(),
        };
        let mut logs = logs.lock().unwrap_or_else(PoisonError::into_inner);
        let log = logs.entry(peer).or_default();
        if answer {
            log.answers.push(seen);
        } else {
            log.sent.push(seen);
        }
    };
    while !stop.load(Ordering::Acquire) {
        if poll
            .poll(&mut events, Some(Duration::from_millis(50)))
            .is_err()
        {
            continue;
        }
        for event in events.iter() {
            if event.token() == FRONT {
                loop {
                    let (n, peer) = match front.recv_from(&mut buf) {
                        Ok(got) => got,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    record(peer, &buf[..n], false);
                    let i = match by_peer.get(&peer) {
                        Some(&i) => i,
                        None => {
                            let Ok(mut up) = UdpSocket::bind(local) else {
                                continue;
                            };
                            let token = Token(upstreams.len() + 1);
                            if up.connect(target).is_err()
                                || poll
                                    .registry()
                                    .register(&mut up, token, Interest::READABLE)
                                    .is_err()
                            {
                                continue;
                            }
                            upstreams.push((peer, up));
                            by_peer.insert(peer, upstreams.len() - 1);
                            upstreams.len() - 1
                        }
                    };
                    let _ = upstreams[i].1.send(&buf[..n]);
                }
            } else {
                let Some((peer, up)) = upstreams.get(event.token().0 - 1) else {
                    continue;
                };
                loop {
                    let n = match up.recv(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // ICMP reports of a target gone (a killed replica): read on.
                        Err(_) => continue,
                    };
                    record(*peer, &buf[..n], true);
                    let _ = front.send_to(&buf[..n], *peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_is_relayed_from_its_own_port_and_both_ways_are_recorded() {
        let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        target
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let relay = Relay::start(target.local_addr().unwrap(), Instant::now()).unwrap();
        let (p1, p2) = (
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        p1.send_to(b"one", relay.addr).unwrap();
        p2.send_to(b"two", relay.addr).unwrap();
        let mut buf = [0u8; 16];
        let mut from = Vec::new();
        for _ in 0..2 {
            let (n, f) = target.recv_from(&mut buf).unwrap();
            target.send_to(&[b"re-", &buf[..n]].concat(), f).unwrap();
            from.push(f);
        }
        assert_ne!(from[0], from[1], "a port of its own per peer");
        p1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = p1.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"re-one");
        let logs = relay.logs();
        let l1 = &logs[&p1.local_addr().unwrap()];
        assert_eq!(l1.sent[0].bytes, b"one");
        assert_eq!(l1.answers[0].bytes, b"re-one");
    }
}
