//! Run-time replica changes through the one interface discovery uses (`ReplicaSet::publish`),
//! against the real data plane: the library's `Proxy`, real sockets, the test playing replicas.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use spotable_proxy::dedupe::{Agreement, MAX_SLOTS, Mode};
use spotable_proxy::session::Settings;
use spotable_proxy::{Proxy, ProxyConfig, Replica, ReplicaSet, ReplicaState};

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

fn start(replicas: &ReplicaSet, late_join: bool, listen: &[&str]) -> Proxy {
    let config = ProxyConfig {
        listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
        workers: 2,
        max_sessions: 100,
        socket_buffer: 1 << 20,
        kernel_timestamps: true,
        settings: Settings {
            mode: Mode::Copies {
                window: Duration::from_secs(2),
                max_entries: 1024,
            },
            // The test plays every replica alike; what it checks is membership.
            agreement: Agreement::Off,
            session_timeout: Duration::from_secs(60),
            rate: None,
            max_datagram: 1500,
            fanout: MAX_SLOTS,
            late_join,
            token: None,
            replica_header: None,
            max_sessions: None,
            max_pps: None,
        },
    };
    Proxy::start(config, replicas.clone()).unwrap()
}

/// What `replica` receives within the read timeout: (payload, upstream source).
fn received(replica: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 256];
    replica
        .recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// Publishes `replicas`; with a running `proxy`, returns once every worker applied them.
fn publish(set: &ReplicaSet, replicas: &[(&UdpSocket, ReplicaState)], proxy: Option<&Proxy>) {
    set.publish(
        replicas
            .iter()
            .map(|(s, state)| Replica {
                addr: s.local_addr().unwrap(),
                state: *state,
            })
            .collect(),
    );
    let Some(proxy) = proxy else { return };
    let version = set.snapshot().version;
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.replicas_applied() < version {
        assert!(
            Instant::now() < deadline,
            "workers never applied version {version}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn removed_replica_leaves_running_sessions_and_new_one_joins_new_sessions() {
    let (r1, r2, r3) = (socket(), socket(), socket());
    let set = ReplicaSet::new();
    publish(
        &set,
        &[(&r1, ReplicaState::Ready), (&r2, ReplicaState::Ready)],
        None,
    );
    let proxy = start(&set, false, &["127.0.0.1:0"]);
    let player = socket();
    player.connect(proxy.local_addrs()[0]).unwrap();

    player.send(b"one").unwrap();
    let (_, upstream) = received(&r1).expect("r1 gets fan-out");
    assert!(received(&r2).is_some(), "r2 gets fan-out");

    // r1 goes away, r3 appears.
    publish(
        &set,
        &[(&r2, ReplicaState::Ready), (&r3, ReplicaState::Ready)],
        Some(&proxy),
    );
    player.send(b"two").unwrap();
    assert_eq!(received(&r2).map(|r| r.0), Some(b"two".to_vec()));
    assert!(
        received(&r1).is_none(),
        "removed replica still fanned out to"
    );
    assert!(
        received(&r3).is_none(),
        "new replica joined a running session"
    );
    // The removed replica's answers are no longer accepted.
    r1.send_to(b"from r1", upstream).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        player.recv(&mut buf).is_err(),
        "answer from a removed replica delivered"
    );

    // A new player's session uses the new set.
    let newcomer = socket();
    newcomer.send_to(b"three", proxy.local_addrs()[0]).unwrap();
    assert_eq!(received(&r2).map(|r| r.0), Some(b"three".to_vec()));
    assert_eq!(received(&r3).map(|r| r.0), Some(b"three".to_vec()));
    proxy.shutdown().unwrap();
}

#[test]
fn late_join_adds_new_replicas_to_running_sessions() {
    let (r1, r2) = (socket(), socket());
    let set = ReplicaSet::new();
    publish(&set, &[(&r1, ReplicaState::Ready)], None);
    let proxy = start(&set, true, &["127.0.0.1:0"]);
    let player = socket();
    player.connect(proxy.local_addrs()[0]).unwrap();
    player.send(b"one").unwrap();
    let (_, first_port) = received(&r1).unwrap();
    publish(
        &set,
        &[(&r1, ReplicaState::Ready), (&r2, ReplicaState::Ready)],
        Some(&proxy),
    );
    player.send(b"two").unwrap();
    let (payload, upstream) = received(&r2).unwrap();
    assert_eq!(payload, b"two");
    // To r1 the player is still the same address: the session kept its port.
    assert_eq!(received(&r1).map(|r| r.1), Some(first_port));
    assert_eq!(upstream, first_port);
    // The session's socket, connected while r1 was its only replica, takes r2's answers now.
    r2.send_to(b"two from r2", upstream).unwrap();
    let mut buf = [0u8; 64];
    let n = player.recv(&mut buf).expect("the late joiner's answer");
    assert_eq!(&buf[..n], b"two from r2");
    // Its answers count for the session: r1 dies, r2 alone carries the stream.
    publish(&set, &[(&r2, ReplicaState::Ready)], Some(&proxy));
    player.send(b"three").unwrap();
    let (payload, upstream) = received(&r2).unwrap();
    r2.send_to(&payload, upstream).unwrap();
    let n = player.recv(&mut buf).expect("answer via the late joiner");
    assert_eq!(&buf[..n], b"three");
    proxy.shutdown().unwrap();
}

#[test]
fn draining_replica_keeps_receiving_fan_out() {
    let (r1, r2) = (socket(), socket());
    let set = ReplicaSet::new();
    publish(
        &set,
        &[(&r1, ReplicaState::Ready), (&r2, ReplicaState::Ready)],
        None,
    );
    let proxy = start(&set, false, &["127.0.0.1:0"]);
    let player = socket();
    player.connect(proxy.local_addrs()[0]).unwrap();
    player.send(b"one").unwrap();
    assert!(received(&r1).is_some() && received(&r2).is_some());
    publish(
        &set,
        &[(&r1, ReplicaState::Draining), (&r2, ReplicaState::Ready)],
        Some(&proxy),
    );
    player.send(b"two").unwrap();
    let (_, upstream) = received(&r1).expect("draining replica still gets fan-out");
    assert!(received(&r2).is_some());
    r1.send_to(b"answer while draining", upstream).unwrap();
    let mut buf = [0u8; 64];
    let n = player
        .recv(&mut buf)
        .expect("draining replica's answer accepted");
    assert_eq!(&buf[..n], b"answer while draining");
    // A new session does not start on a draining replica.
    let newcomer = socket();
    newcomer.send_to(b"new", proxy.local_addrs()[0]).unwrap();
    assert!(received(&r2).is_some());
    assert!(
        received(&r1).is_none(),
        "new session placed on a draining replica"
    );
    proxy.shutdown().unwrap();
}

#[test]
fn several_listeners_are_separate_sessions() {
    let r1 = socket();
    let set = ReplicaSet::new();
    publish(&set, &[(&r1, ReplicaState::Ready)], None);
    let proxy = start(&set, false, &["127.0.0.1:0", "127.0.0.1:0"]);
    let [a, b] = [proxy.local_addrs()[0], proxy.local_addrs()[1]];
    assert_ne!(a, b);
    let player = socket();
    for (listener, payload) in [(a, b"via a"), (b, b"via b")] {
        player.send_to(payload, listener).unwrap();
        let (got, upstream) = received(&r1).unwrap();
        r1.send_to(&got, upstream).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = player.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], payload);
        assert_eq!(
            from, listener,
            "answer comes back from the address the player used"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.sessions() != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.sessions(), 2);
    proxy.shutdown().unwrap();
}
