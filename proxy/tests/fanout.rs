//! Fan-out and dedupe end to end: real replica processes, the real proxy binary, UDP on
//! loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use spotable_fixtures::process::http_get;

const MS: Duration = Duration::from_millis(1);

#[test]
fn two_replicas_every_answer_exactly_once() {
    let s = setup(&[&[], &[]], &[]);
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    stream(&c, 300, MS, |_| {});
    assert_each(&rx.finish(300), 300, 1);
    let suppressed = wait_metric(&s.proxy, "spotable_duplicates_suppressed_total", &[], |v| {
        v >= 300.0
    });
    assert_eq!(suppressed, 300.0, "one copy per datagram suppressed");
    assert_eq!(
        metric(&s.proxy, "spotable_upstream_packets_total", &[]),
        600.0
    );
}

#[test]
fn each_replica_has_its_series_and_a_silent_one_shows_its_silence_growing() {
    let live = replica(&[]);
    // Bound, but never answers: a game server hung on a reclaimed node's last seconds.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let proxy = start_proxy(&[live.addr, silent_addr], &[]);
    let c = client(&proxy);
    let rx = Collector::start(&c);
    stream(&c, 100, MS, |_| {});
    assert_each(&rx.finish(100), 100, 1);
    let (l, s) = (live.addr.to_string(), silent_addr.to_string());
    let answers = wait_metric(
        &proxy,
        "spotable_replica_answers_total",
        &[("replica", &l)],
        |v| v >= 100.0,
    );
    assert_eq!(answers, 100.0);
    assert_eq!(
        metric(
            &proxy,
            "spotable_replica_first_answers_total",
            &[("replica", &l)]
        ),
        100.0
    );
    assert_eq!(
        metric(&proxy, "spotable_replica_answers_total", &[("replica", &s)]),
        0.0
    );
    let quiet = |p: &spotable_fixtures::process::ProxyProcess| {
        metric(p, "spotable_replica_silence_seconds", &[("replica", &s)])
    };
    let first = quiet(&proxy);
    let grew = wait_metric(
        &proxy,
        "spotable_replica_silence_seconds",
        &[("replica", &s)],
        |v| v >= first + 0.5,
    );
    assert!(grew >= first + 0.5, "silence {first} then {grew}");
    assert!(
        metric(
            &proxy,
            "spotable_replica_silence_seconds",
            &[("replica", &l)]
        ) < grew,
        "the live replica is less silent"
    );
    assert!(
        spotable_fixtures::metrics_text::without_help(&metrics(&proxy)).is_empty(),
        "every series has HELP"
    );
}

#[test]
fn a_slow_replica_shows_its_lag_and_the_proxy_its_own_time_both_ways() {
    let fast = replica(&[]);
    // On a slower node: every answer 5 ms late.
    let slow = replica(&["--delay", "5ms"]);
    let proxy = start_proxy(&[fast.addr, slow.addr], &[]);
    let c = client(&proxy);
    let rx = Collector::start(&c);
    stream(&c, 100, MS, |_| {});
    assert_each(&rx.finish(100), 100, 1);
    let (f, s) = (fast.addr.to_string(), slow.addr.to_string());
    let lag_count = "spotable_replica_lag_seconds_count";
    let lagged = wait_metric(&proxy, lag_count, &[("replica", &s)], |v| v >= 100.0);
    assert_eq!(
        lagged, 100.0,
        "every copy of the slow one was suppressed behind the fast one"
    );
    assert_eq!(
        metric(&proxy, lag_count, &[("replica", &f)]),
        0.0,
        "the fast one always won"
    );
    let mean = metric(
        &proxy,
        "spotable_replica_lag_seconds_sum",
        &[("replica", &s)],
    ) / lagged;
    assert!((0.004..0.5).contains(&mean), "mean lag {mean} s");
    let under = metric(
        &proxy,
        "spotable_replica_lag_seconds_bucket",
        &[("replica", &s), ("le", "0.0025")],
    );
    assert!(
        under <= 10.0,
        "{under} of 100 copies less than 2.5 ms behind"
    );
    // Time in the proxy, both ways: every datagram forwarded and every answer delivered,
    // timed from the worker's turn (the default) or from the kernel's receive timestamps.
    let stamped = start_proxy(&[fast.addr, slow.addr], &["--kernel-timestamps"]);
    let c = client(&stamped);
    let rx = Collector::start(&c);
    stream(&c, 100, MS, |_| {});
    assert_each(&rx.finish(100), 100, 1);
    for p in [&proxy, &stamped] {
        for direction in ["to_replicas", "to_clients"] {
            let n = wait_metric(
                p,
                "spotable_transit_seconds_count",
                &[("direction", direction)],
                |v| v >= 100.0,
            );
            assert_eq!(n, 100.0, "{direction}");
            let inf = metric(
                p,
                "spotable_transit_seconds_bucket",
                &[("direction", direction), ("le", "1")],
            );
            assert_eq!(inf, 100.0, "{direction}: all within a second");
        }
    }
}

#[test]
fn three_replicas_every_answer_exactly_once() {
    let s = setup(&[&[], &[], &[]], &[]);
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    stream(&c, 300, MS, |_| {});
    assert_each(&rx.finish(300), 300, 1);
    let suppressed = wait_metric(&s.proxy, "spotable_duplicates_suppressed_total", &[], |v| {
        v >= 600.0
    });
    assert_eq!(suppressed, 600.0);
}

#[test]
fn legitimate_repeats_arrive_as_often_as_one_replica_sent_them() {
    // Each replica answers every datagram twice (a keepalive, a reliable-UDP resend): the
    // client must get two copies, never one and never six.
    let s = setup(
        &[&["--copies", "2"], &["--copies", "2"], &["--copies", "2"]],
        &[],
    );
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    stream(&c, 200, MS, |_| {});
    assert_each(&rx.finish(200 * 2), 200, 2);
}

#[test]
fn sigkill_of_a_replica_under_load_loses_nothing_and_duplicates_nothing() {
    let mut s = setup(&[&[], &[], &[]], &["--rate-limit", "0"]);
    // Several players at once, 2000 datagrams/s in all, one replica killed mid-stream.
    let clients: Vec<UdpSocket> = (0..4).map(|_| client(&s.proxy)).collect();
    let collectors: Vec<_> = clients.iter().map(Collector::start).collect();
    let mut victim = Some(s.replicas.remove(1));
    let count = 2000;
    std::thread::scope(|scope| {
        for (i, c) in clients.iter().enumerate() {
            let victim = if i == 0 { victim.take() } else { None };
            scope.spawn(move || {
                let mut victim = victim;
                stream(c, count, 2 * MS, |seq| {
                    if seq == count / 2
                        && let Some(mut v) = victim.take()
                    {
                        v.process.kill().unwrap();
                    }
                });
            });
        }
    });
    for rx in collectors {
        assert_each(&rx.finish(count as usize), count, 1);
    }
}

#[test]
fn answers_from_a_non_replica_address_are_dropped_and_counted() {
    // The test plays the replicas itself, to learn the session's upstream address. Two of
    // them: with one, the session's socket is connected and the kernel itself discards a
    // stranger's datagrams before the proxy could count them.
    let replica = UdpSocket::bind("127.0.0.1:0").unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    for r in [&replica, &other] {
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let proxy = start_proxy(
        &[replica.local_addr().unwrap(), other.local_addr().unwrap()],
        &[],
    );
    let c = client(&proxy);
    c.send(b"hello").unwrap();
    let mut buf = [0u8; 64];
    let (n, upstream) = replica.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(other.recv_from(&mut buf).unwrap().1, upstream);
    assert_ne!(upstream, proxy.addr, "sessions use their own upstream port");

    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(b"spoofed", upstream).unwrap();
    replica.send_to(b"genuine", upstream).unwrap();
    let rx = Collector::start(&c);
    let got = rx.finish(1);
    assert_eq!(got, vec![b"genuine".to_vec()]);
    let drops = wait_metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "not_replica")],
        |v| v >= 1.0,
    );
    assert_eq!(drops, 1.0);
}

#[test]
fn sequence_mode_dedupes_replicas_whose_payloads_differ() {
    // Tags make each replica's answer bytes unique; only the sequence number is shared.
    let s = setup(
        &[&["--tag", "A"], &["--tag", "BB"]],
        &[
            "--dedupe",
            "sequence",
            "--sequence-offset",
            "0",
            "--sequence-width",
            "8",
        ],
    );
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    stream(&c, 300, MS, |_| {});
    assert_each(&rx.finish(300), 300, 1);
}

#[test]
fn copies_mode_with_differing_payloads_delivers_one_replica_and_says_so() {
    // Replicas whose answers differ never agree: the player hears one of them, once each,
    // and the proxy counts the divergence and marks the game.
    let s = setup(&[&["--tag", "A"], &["--tag", "BB"]], &[]);
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    stream(&c, 50, MS, |_| {});
    let got = rx.finish(50);
    assert_each(&got, 50, 1);
    let mut tails: Vec<&[u8]> = got.iter().map(|a| &a[48..]).collect();
    tails.dedup();
    assert_eq!(tails.len(), 1, "one replica's answers only");
    wait_metric(&s.proxy, "spotable_sessions_demoted_total", &[], |v| {
        v >= 1.0
    });
    assert_eq!(metric(&s.proxy, "spotable_game_divergent", &[]), 1.0);
    // With agreement off, both answers arrive: the mode's assumption taken on trust.
    let s = setup(
        &[&["--tag", "A"], &["--tag", "BB"]],
        &["--agreement", "off"],
    );
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    stream(&c, 50, MS, |_| {});
    assert_each(&rx.finish(50 * 2), 50, 2);
}

#[test]
fn primary_mode_forwards_one_replica_and_fails_over_when_it_dies() {
    let mut s = setup(
        &[&["--tag", "A"], &["--tag", "B"]],
        &["--dedupe", "primary", "--failover-after", "30ms"],
    );
    // The replica whose answer reaches the player first is its primary.
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    let hello = rx.first(|| {
        c.send(b"hello").unwrap();
    });
    let (primary, first, standby) = if hello.ends_with(b"A") {
        (0, b'A', b'B')
    } else {
        (1, b'B', b'A')
    };
    stream(&c, 200, 2 * MS, |seq| {
        if seq == 100 {
            s.replicas[primary].process.kill().unwrap();
        }
    });
    let got: Vec<Vec<u8>> = rx
        .finish_at_seq(199)
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| !a.starts_with(b"hello"))
        .collect();
    let tags: Vec<u8> = got.iter().map(|a| *a.last().unwrap()).collect();
    let switch = tags
        .iter()
        .position(|&t| t == standby)
        .expect("failover to the standby");
    assert!(
        switch >= 90,
        "the primary answered until it died (switch at {switch})"
    );
    assert!(
        tags[..switch].iter().all(|&t| t == first),
        "only the primary before the kill"
    );
    assert!(
        tags[switch..].iter().all(|&t| t == standby),
        "only the new primary after"
    );
    // Primary mode trades the failover window for cheapness: a few answers may go missing,
    // but never more than the window holds and never a duplicate.
    let c = counts(&got);
    assert!(c.values().all(|&n| n == 1));
    assert!(c.len() >= 200 - 30, "{} answers", c.len());
    let failovers = wait_metric(&s.proxy, "spotable_failovers_total", &[], |v| v >= 1.0);
    assert_eq!(failovers, 1.0);
}

#[test]
fn admin_endpoints_and_graceful_sigterm() {
    let mut s = setup(&[&[]], &[]);
    let admin = s.proxy.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(admin, "/readyz").unwrap().0, 200);
    let c = client(&s.proxy);
    c.send(b"x").unwrap();
    let mut buf = [0u8; 8];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.recv(&mut buf).unwrap(), 1);
    let text = metrics(&s.proxy);
    for name in [
        "spotable_client_packets_total",
        "spotable_delivered_packets_total",
        "spotable_duplicates_suppressed_total",
        "spotable_drops_total",
        "spotable_sessions",
        "spotable_replicas",
        "spotable_failovers_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let undocumented = spotable_fixtures::metrics_text::without_help(&text);
    assert!(
        undocumented.is_empty(),
        "series without HELP: {undocumented:?}"
    );
    assert!(
        text.contains(&format!(
            "spotable_build_info{{program=\"spotable-proxy\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "build info missing:\n{text}"
    );
    assert_eq!(
        spotable_fixtures::metrics_text::value(&text, "spotable_replicas", &[("state", "ready")]),
        Some(1.0)
    );
    s.proxy.process.signal(libc::SIGTERM).unwrap();
    let status = s
        .proxy
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn drain_delay_keeps_forwarding_while_not_ready() {
    let mut s = setup(&[&[]], &["--drain-delay", "5s"]);
    let admin = s.proxy.admin.unwrap();
    s.proxy.process.signal(libc::SIGTERM).unwrap();
    // Readiness drops at once…
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // (A connection the server resets while it begins to drain is asked again.)
    while http_get(admin, "/readyz").map_or(true, |(status, _)| status != 503) {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz still ready after SIGTERM"
        );
        std::thread::sleep(20 * MS);
    }
    // …while players are still served.
    let c = client(&s.proxy);
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.send(b"during drain").unwrap();
    let mut buf = [0u8; 32];
    let n = c.recv(&mut buf).expect("answer during the drain");
    assert_eq!(&buf[..n], b"during drain");
    // A second signal cuts the drain short.
    s.proxy.process.signal(libc::SIGTERM).unwrap();
    let status = s
        .proxy
        .process
        .wait_timeout(Duration::from_secs(3))
        .unwrap();
    assert!(status.success(), "{status:?}");
}
