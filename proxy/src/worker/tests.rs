//! The worker's logic over the in-memory network, in simulated time: every instant is an
//! epoch plus a duration the test chooses, and nothing waits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sim::{Origin, Sent, SimNet};
use super::{ANSWER_ARENA, BATCHES_PER_TURN, FRONT_BATCH, TICK, Worker};
use crate::replicas::Replica;
use crate::server::Shared;
use crate::session::{Admission, DropReason, SessionTable, Settings};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

const CLIENT: u16 = 5000;
const A: u16 = 7001;
const B: u16 = 7002;
const C: u16 = 7003;

/// A worker with one listener over a [`SimNet`], and the clock the test moves.
struct Rig {
    w: Worker<SimNet>,
    shared: Arc<Shared>,
    now: Instant,
}

impl Rig {
    fn new(replicas: &[u16]) -> Self {
        Self::with(replicas, |_| {})
    }

    fn with(replicas: &[u16], change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = crate::server::settings_for_tests();
        change(&mut settings);
        let shared = Shared::for_tests();
        shared
            .replicas
            .publish(replicas.iter().map(|&p| Replica::ready(addr(p))).collect());
        let table = SessionTable::new(
            Arc::new(settings.clone()),
            Admission::new(1000),
            shared.replicas.snapshot(),
            7,
        );
        let now = Instant::now();
        let w = Worker::new(
            SimNet::new(1),
            table,
            settings.max_datagram,
            shared.clone(),
            Arc::default(),
            None,
            now,
        );
        Self { w, shared, now }
    }

    fn net(&mut self) -> &mut SimNet {
        &mut self.w.net
    }

    /// One pass over what became ready since the last one, at the current simulated time.
    fn turn(&mut self) {
        let ready = self.w.net.poll();
        self.w.turn(&ready, self.now);
    }

    /// Passes until nothing is ready and nothing is pending (bounded, so a loop fails).
    fn settle(&mut self) {
        for _ in 0..100 {
            self.turn();
            if self.w.pending.is_empty() && self.w.net.poll_is_empty() {
                return;
            }
        }
        panic!("the worker never settled");
    }

    /// The discovery side publishes a new replica set and wakes the worker.
    fn publish(&mut self, replicas: &[u16]) {
        self.shared
            .replicas
            .publish(replicas.iter().map(|&p| Replica::ready(addr(p))).collect());
        self.net().wake();
    }

    fn client_sends(&mut self, payload: &[u8]) {
        self.net().client_datagram(0, addr(CLIENT), payload);
    }

    /// What went to replicas since the last call: (from port, to port, payload).
    fn upstream(sent: &[Sent]) -> Vec<(u16, u16, Vec<u8>)> {
        sent.iter()
            .filter_map(|s| match s.from {
                Origin::Port(p) => Some((p, s.to.port(), s.payload.clone())),
                Origin::Front(_) => None,
            })
            .collect()
    }

    /// What went to clients: (client port, payload).
    fn delivered(sent: &[Sent]) -> Vec<(u16, Vec<u8>)> {
        sent.iter()
            .filter_map(|s| match s.from {
                Origin::Front(_) => Some((s.to.port(), s.payload.clone())),
                Origin::Port(_) => None,
            })
            .collect()
    }

    /// The one session's port, as the replicas see it.
    fn session_port(&self) -> u16 {
        let ports = self.w.net.open_ports();
        assert_eq!(ports.len(), 1, "one session socket open: {ports:?}");
        ports[0]
    }
}

fn numbered(i: u32) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

#[test]
fn a_burst_longer_than_one_turn_is_read_over_the_next_turns_without_new_readiness() {
    let mut r = Rig::new(&[A]);
    let per_turn = FRONT_BATCH * BATCHES_PER_TURN;
    let total = per_turn + 44;
    for i in 0..total {
        r.client_sends(&numbered(i as u32));
    }
    r.turn();
    let first = Rig::upstream(&r.net().take_sent());
    assert_eq!(first.len(), per_turn, "one turn reads at most its share");
    assert_eq!(r.net().queued(0), 44);
    assert_eq!(r.w.wake_at(), None, "data left: poll again at once");

    // Edge-triggered readiness: nothing new arrives, so only the pending list brings the
    // socket back.
    r.turn();
    let second = Rig::upstream(&r.net().take_sent());
    assert_eq!(second.len(), 44);
    assert_eq!(r.net().queued(0), 0);
    assert!(r.w.wake_at().is_some(), "drained: sleep until the tick");

    let order: Vec<Vec<u8>> = first.iter().chain(&second).map(|s| s.2.clone()).collect();
    let want: Vec<Vec<u8>> = (0..total as u32).map(numbered).collect();
    assert_eq!(order, want, "in arrival order");
    assert!(first.iter().chain(&second).all(|s| s.1 == A));
}

#[test]
fn one_replica_is_served_on_a_connected_socket_with_one_send_per_datagram() {
    let mut r = Rig::new(&[A]);
    for i in 0..5 {
        r.client_sends(&numbered(i));
    }
    r.settle();
    let sent = Rig::upstream(&r.net().take_sent());
    assert_eq!(sent.len(), 5);
    assert_eq!(r.net().connects, 1, "connected once, not per datagram");
    assert_eq!(r.net().disconnects, 0);
    assert_eq!(r.net().send_calls, 5);
}

#[test]
fn fan_out_is_one_batch_from_one_port_and_the_answers_reach_the_client_once() {
    let mut r = Rig::new(&[A, B, C]);
    r.client_sends(b"move");
    r.settle();
    let sent = Rig::upstream(&r.net().take_sent());
    let port = r.session_port();
    let mut to: Vec<u16> = sent.iter().map(|s| s.1).collect();
    to.sort_unstable();
    assert_eq!(to, [A, B, C]);
    assert!(
        sent.iter().all(|s| s.0 == port),
        "one source port: the player's identity"
    );
    assert_eq!(r.net().send_calls, 1, "one sendmmsg for three replicas");
    assert_eq!(r.net().connects, 0);

    for rep in [A, B, C] {
        r.net().answer_at(port, addr(rep), b"state 1");
    }
    r.settle();
    let got = Rig::delivered(&r.net().take_sent());
    assert_eq!(got, vec![(CLIENT, b"state 1".to_vec())]);
    assert_eq!(r.w.local.duplicates, 2);
}

#[test]
fn connect_switching_follows_the_replica_set_and_keeps_the_port() {
    let mut r = Rig::new(&[A]);
    r.client_sends(b"1");
    r.settle();
    let port = r.session_port();
    assert_eq!(r.net().connects, 1);
    r.net().take_sent();

    // B joins: the socket must hear both, so it is disconnected and fans out.
    r.publish(&[A, B]);
    r.client_sends(b"2");
    r.settle();
    let sent = Rig::upstream(&r.net().take_sent());
    assert_eq!(r.net().disconnects, 1);
    let mut to: Vec<u16> = sent.iter().map(|s| s.1).collect();
    to.sort_unstable();
    assert_eq!(to, [A, B]);
    r.net().answer_at(port, addr(B), b"from b");
    r.net().answer_at(port, addr(A), b"from a");
    r.settle();
    assert_eq!(
        r.net().filtered,
        0,
        "a disconnected socket hears every replica"
    );
    let got = Rig::delivered(&r.net().take_sent());
    assert_eq!(got.len(), 2, "distinct answers both delivered: {got:?}");

    // A leaves: back to one replica, connected to B; the port never changes.
    r.publish(&[B]);
    r.client_sends(b"3");
    r.settle();
    let sent = Rig::upstream(&r.net().take_sent());
    assert_eq!(sent, vec![(port, B, b"3".to_vec())]);
    assert_eq!(r.net().connects, 2);
    assert_eq!(r.session_port(), port);
    r.net().answer_at(port, addr(A), b"late from a");
    assert_eq!(
        r.net().filtered,
        1,
        "the connected socket no longer hears A"
    );
}

#[test]
fn a_moved_game_that_speaks_first_is_heard_before_the_player_sends_again() {
    let mut r = Rig::new(&[A]);
    r.client_sends(b"1");
    r.settle();
    let port = r.session_port();
    r.net().take_sent();
    // The game moved from A to B (a pad published it); the player has not sent since.
    r.shared.replicas.publish_with_moves(
        vec![Replica::ready(addr(B))],
        vec![crate::replicas::Move {
            from: addr(A),
            to: addr(B),
        }],
    );
    r.net().wake();
    r.settle();
    assert_eq!(
        r.net().connects,
        2,
        "reconnected at the move, not at the next send"
    );
    r.net().answer_at(port, addr(B), b"tick 2");
    r.settle();
    assert_eq!(
        r.net().filtered,
        0,
        "the kernel's filter let the new address through"
    );
    assert_eq!(
        Rig::delivered(&r.net().take_sent()),
        vec![(CLIENT, b"tick 2".to_vec())]
    );
    r.net().answer_at(port, addr(A), b"late from a");
    assert_eq!(r.net().filtered, 1, "and the old address is heard no more");
}

#[test]
fn more_answers_than_the_arena_holds_are_delivered_in_arrival_order() {
    let mut r = Rig::new(&[A]);
    r.client_sends(b"go");
    r.net().client_datagram(0, addr(CLIENT + 1), b"go");
    r.settle();
    r.net().take_sent();
    let ports = r.net().open_ports();
    assert_eq!(ports.len(), 2);
    // Interleave two sessions' answers: 2 × 100 is three arenas' worth.
    for i in 0..100u32 {
        r.net().answer_at(ports[0], addr(A), &numbered(i));
        r.net().answer_at(ports[1], addr(A), &numbered(1000 + i));
    }
    let calls_before = r.net().send_calls;
    // One pass: a full arena is delivered and reused mid-read, not left for later passes.
    r.turn();
    let got = Rig::delivered(&r.net().take_sent());
    assert_eq!(got.len(), 200, "all read and delivered in one pass");
    assert!(r.w.pending.is_empty());
    let mut by_client: [Vec<Vec<u8>>; 2] = [vec![], vec![]];
    for (client, payload) in got {
        by_client[usize::from(client - CLIENT)].push(payload);
    }
    assert_eq!(by_client[0], (0..100).map(numbered).collect::<Vec<_>>());
    assert_eq!(by_client[1], (1000..1100).map(numbered).collect::<Vec<_>>());
    let batches = r.net().send_calls - calls_before;
    assert!(
        batches >= 200usize.div_ceil(ANSWER_ARENA),
        "delivered in arena-sized batches ({batches})"
    );
}

#[test]
fn a_full_send_buffer_fails_only_what_did_not_fit_and_the_worker_carries_on() {
    let mut r = Rig::new(&[A, B, C]);
    r.net().send_room = Some(2);
    r.client_sends(b"tick");
    r.settle();
    assert_eq!(Rig::upstream(&r.net().take_sent()).len(), 2);
    assert_eq!(r.w.local.drops(DropReason::SendFailed), 1);

    r.net().send_room = None;
    r.client_sends(b"tock");
    r.settle();
    assert_eq!(
        Rig::upstream(&r.net().take_sent()).len(),
        3,
        "room again: all three"
    );

    // Answers when the front socket's buffer is full: dropped and counted, later ones pass.
    let port = r.session_port();
    r.net().send_room = Some(0);
    r.net().answer_at(port, addr(A), b"lost to a full buffer");
    r.settle();
    assert!(Rig::delivered(&r.net().take_sent()).is_empty());
    assert_eq!(r.w.local.drops(DropReason::SendFailed), 2);
    r.net().send_room = None;
    r.net().answer_at(port, addr(B), b"next");
    r.settle();
    assert_eq!(
        Rig::delivered(&r.net().take_sent()),
        vec![(CLIENT, b"next".to_vec())]
    );
}

#[test]
fn a_session_whose_replicas_all_left_is_closed_and_the_next_datagram_opens_another() {
    let mut r = Rig::new(&[A]);
    r.client_sends(b"1");
    r.settle();
    let first = r.session_port();
    r.publish(&[]);
    r.settle();
    assert!(
        r.net().open_ports().is_empty(),
        "socket closed with its session"
    );
    r.net().answer_at(first, addr(A), b"ghost");
    r.settle();
    assert!(Rig::delivered(&r.net().take_sent()).is_empty());

    r.publish(&[B]);
    r.client_sends(b"2");
    r.settle();
    let second = r.session_port();
    assert_ne!(second, first, "a new session, a new port");
    let sent = Rig::upstream(&r.net().take_sent());
    assert_eq!(sent.last(), Some(&(second, B, b"2".to_vec())));
}

#[test]
fn an_idle_session_expires_on_the_tick_in_simulated_time() {
    let mut r = Rig::with(&[A], |s| s.session_timeout = Duration::from_secs(30));
    r.client_sends(b"hello");
    r.settle();
    let port = r.session_port();
    // Answers do not keep a session alive; only its client does.
    r.now += Duration::from_secs(29);
    r.net().answer_at(port, addr(A), b"still here");
    r.settle();
    assert_eq!(r.net().open_ports(), vec![port]);
    r.now += Duration::from_secs(1) + TICK;
    r.settle();
    assert!(
        r.net().open_ports().is_empty(),
        "expired after 30 s of client silence"
    );
}

#[test]
fn a_socket_that_cannot_be_opened_drops_one_datagram_and_the_next_one_retries() {
    let mut r = Rig::new(&[A]);
    r.net().fail_open = true;
    r.client_sends(b"1");
    r.settle();
    assert!(r.net().open_ports().is_empty());
    assert_eq!(r.w.local.drops(DropReason::SocketError), 1);
    r.client_sends(b"2");
    r.settle();
    let port = r.session_port();
    assert_eq!(
        Rig::upstream(&r.net().take_sent()),
        vec![(port, A, b"2".to_vec())]
    );
}

#[test]
fn answers_from_strangers_and_truncated_answers_never_reach_the_client() {
    let mut r = Rig::with(&[A], |s| s.max_datagram = 100);
    r.client_sends(b"q");
    r.settle();
    r.publish(&[A, B]);
    r.client_sends(b"q2");
    r.settle();
    r.net().take_sent();
    let port = r.session_port();
    r.net().answer_at(port, addr(9999), b"spoofed");
    r.net()
        .answer_at(port, addr(A), &vec![7u8; crate::udp::MAX_UDP_PAYLOAD + 10]);
    r.settle();
    assert!(Rig::delivered(&r.net().take_sent()).is_empty());
    assert_eq!(r.w.local.drops(DropReason::NotReplica), 1);
    assert_eq!(r.w.local.drops(DropReason::Oversized), 1);
}

#[test]
fn a_datagram_carrying_the_loop_marker_opens_nothing_and_goes_nowhere() {
    let mut r = Rig::new(&[A, B]);
    // Another proxy's copy for its replica, which is really this proxy: whatever its ECN bits.
    for ecn in [0, 1] {
        let tos = crate::marker::TOS | ecn;
        r.net()
            .client_datagram_with_tos(0, addr(CLIENT + 1), b"looped", tos);
    }
    r.settle();
    assert!(r.net().take_sent().is_empty());
    assert!(r.net().open_ports().is_empty(), "no session opened");
    assert_eq!(r.w.local.drops(DropReason::Loop), 2);
    // A player's datagram with its own class (EF) is served as any other.
    r.net()
        .client_datagram_with_tos(0, addr(CLIENT), b"q", 46 << 2);
    r.settle();
    assert_eq!(Rig::upstream(&r.net().take_sent()).len(), 2);
}

#[test]
fn with_proxy_v2_every_copy_names_the_player_and_answers_come_back_bare() {
    use crate::proxy_header::{self, Header, ReplicaHeader};
    let mut r = Rig::with(&[A, B], |s| s.replica_header = Some(ReplicaHeader::ProxyV2));
    r.client_sends(b"move left");
    r.settle();
    let sent = Rig::upstream(&r.net().take_sent());
    assert_eq!(sent.len(), 2, "one copy per replica");
    for (_, _, payload) in &sent {
        let (header, at) = proxy_header::decode(payload).expect("a header");
        assert_eq!(
            header,
            Header::Proxy {
                source: addr(CLIENT),
                destination: "127.0.0.1:7777".parse().unwrap(),
            }
        );
        assert_eq!(&payload[at..], b"move left");
    }
    // The answer reaches the player as the replica sent it.
    let port = r.session_port();
    r.net().answer_at(port, addr(A), b"state");
    r.settle();
    assert_eq!(
        Rig::delivered(&r.net().take_sent()),
        vec![(CLIENT, b"state".to_vec())]
    );
}

#[test]
fn a_slow_copy_shows_its_lag_and_time_in_the_proxy_is_measured_both_ways() {
    let mut r = Rig::new(&[A, B, C]);
    let us = Duration::from_micros;
    let epoch = Duration::from_secs(1_700_000_000);
    r.net().clock = epoch;
    for i in 0..10u32 {
        // The client's datagram waits 40 µs in the socket before the worker's turn.
        r.client_sends(&numbered(i));
        r.net().clock += us(40);
        r.settle();
        let port = r.session_port();
        // A answers at once, B 3 ms later, C 20 ms later; each answer waits 70 µs.
        for (rep, delay) in [(A, 0), (B, 3_000), (C, 20_000)] {
            r.now += us(delay);
            r.net().answer_at(port, addr(rep), &numbered(i));
            r.net().clock += us(70);
            r.settle();
            r.now -= us(delay);
        }
        r.now += Duration::from_millis(25);
    }
    let got = Rig::delivered(&r.net().take_sent());
    assert_eq!(got.len(), 10, "each answer once");
    r.now += TICK;
    r.turn(); // the tick adds this worker's counts to the shared ones
    let text = r.shared.replica_stats.render(
        &r.shared.replicas.snapshot(),
        r.now,
        crate::replica_stats::LagHistogram::Replica,
    );
    let text = text + &r.shared.transit.render();
    let v = |name: &str, labels: &[(&str, &str)]| {
        spotable_fixtures::metrics_text::value(&text, name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    let lag = crate::replica_stats::names::LAG;
    let (bucket, count) = (format!("{lag}_bucket"), format!("{lag}_count"));
    let replica = |p: u16| addr(p).to_string();
    let b = replica(B);
    let c = replica(C);
    let a = replica(A);
    assert_eq!(v(&count, &[("replica", &a)]), 0.0, "A always wins: no lag");
    assert_eq!(v(&count, &[("replica", &b)]), 10.0);
    assert_eq!(v(&bucket, &[("replica", &b), ("le", "0.0025")]), 0.0);
    assert_eq!(v(&bucket, &[("replica", &b), ("le", "0.005")]), 10.0);
    assert_eq!(v(&bucket, &[("replica", &c), ("le", "0.01")]), 0.0);
    assert_eq!(v(&bucket, &[("replica", &c), ("le", "0.025")]), 10.0);
    assert_eq!(
        v(crate::replica_stats::names::FIRSTS, &[("replica", &a)]),
        10.0
    );
    let transit = crate::transit::names::TRANSIT;
    let (bucket, count) = (format!("{transit}_bucket"), format!("{transit}_count"));
    let to_replicas = ("direction", "to_replicas");
    let to_clients = ("direction", "to_clients");
    assert_eq!(v(&count, &[to_replicas]), 10.0);
    assert_eq!(v(&bucket, &[to_replicas, ("le", "0.000025")]), 0.0);
    assert_eq!(v(&bucket, &[to_replicas, ("le", "0.00005")]), 10.0);
    assert_eq!(v(&count, &[to_clients]), 10.0, "delivered answers only");
    assert_eq!(v(&bucket, &[to_clients, ("le", "0.00005")]), 0.0);
    assert_eq!(v(&bucket, &[to_clients, ("le", "0.0001")]), 10.0);
}

#[test]
fn without_kernel_timestamps_transit_counts_from_the_turn() {
    let mut r = Rig::new(&[A]);
    r.net().unstamped = true;
    r.net().clock = Duration::from_secs(1_700_000_000);
    r.client_sends(b"move");
    // Queued 300 µs before the turn: unseen without the kernel's stamp.
    r.net().clock += Duration::from_micros(300);
    r.settle();
    let port = r.session_port();
    r.net().answer_at(port, addr(A), b"state");
    r.net().clock += Duration::from_micros(300);
    r.settle();
    r.now += TICK;
    r.turn();
    let text = r.shared.transit.render();
    let bucket = format!("{}_bucket", crate::transit::names::TRANSIT);
    for direction in ["to_replicas", "to_clients"] {
        let fast = spotable_fixtures::metrics_text::value(
            &text,
            &bucket,
            &[("direction", direction), ("le", "0.00001")],
        );
        assert_eq!(
            fast,
            Some(1.0),
            "{direction}: from the turn, not the arrival\n{text}"
        );
    }
}

#[test]
fn an_icmp_report_from_the_primary_fails_it_over_before_its_peers_answers_are_judged() {
    let mut r = Rig::with(&[A, B], |s| {
        s.mode = crate::dedupe::Mode::Primary {
            failover_after: Duration::from_millis(50),
        };
        s.late_join = false;
    });
    r.client_sends(&numbered(1));
    r.settle();
    let port = r.session_port();
    r.net().take_sent();
    r.net().answer_at(port, addr(A), &numbered(1));
    r.net().answer_at(port, addr(B), &numbered(1));
    r.settle();
    assert_eq!(
        Rig::delivered(&r.net().take_sent()),
        [(CLIENT, numbered(1))]
    );
    // A's process dies. The next datagram provokes port unreachable, which the kernel queues
    // before B's answer is read: B speaks at once, with no 50 ms of silence first.
    r.now += Duration::from_millis(2);
    r.client_sends(&numbered(2));
    r.settle();
    r.net().unreachable_at(port, addr(A));
    r.net().answer_at(port, addr(B), &numbered(2));
    r.settle();
    assert_eq!(
        Rig::delivered(&r.net().take_sent()),
        [(CLIENT, numbered(2))]
    );
    assert_eq!(r.w.local.failovers, 1);
    // Nothing more goes to A.
    r.client_sends(&numbered(3));
    r.settle();
    let to: Vec<u16> = Rig::upstream(&r.net().take_sent())
        .iter()
        .map(|u| u.1)
        .collect();
    assert_eq!(to, [B]);
}

#[test]
fn a_session_whose_last_replica_is_unreachable_closes_and_the_next_datagram_reopens() {
    let mut r = Rig::with(&[A], |s| s.late_join = false);
    r.client_sends(b"q");
    r.settle();
    let port = r.session_port();
    // A rolling replacement: B is up, A still listed, and A's process dies.
    r.publish(&[A, B]);
    r.settle();
    r.net().take_sent();
    r.net().unreachable_at(port, addr(A));
    r.settle();
    assert!(
        r.net().open_ports().is_empty(),
        "the session closed at once"
    );
    r.client_sends(b"q2");
    r.settle();
    let to: Vec<u16> = Rig::upstream(&r.net().take_sent())
        .iter()
        .map(|u| u.1)
        .collect();
    assert_eq!(to, [B], "the fresh session passes the dead replica over");
}
