//! Kubernetes discovery end to end: the proxy binary with `--kubernetes-service`, the real
//! `kube` client, a fake API server speaking list/watch, real replica processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use spotable_fixtures::kube::FakeApi;
use spotable_fixtures::process::{ProxyProcess, ReplicaProcess, http_get};

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/games/endpointslices";
const MS: Duration = Duration::from_millis(1);

#[derive(Clone, Copy)]
enum Cond {
    Ready,
    Draining,
}

/// One EndpointSlice of service `game` holding `endpoints`, all on `port`.
fn slice(name: &str, port: u16, endpoints: &[(IpAddr, Cond)]) -> serde_json::Value {
    let s = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("games".into()),
            labels: Some([("kubernetes.io/service-name".to_string(), "game".to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(ip, c)| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(match c {
                    Cond::Ready => EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    },
                    Cond::Draining => EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    },
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("game".into()),
            port: Some(i32::from(port)),
            protocol: Some("UDP".into()),
            ..Default::default()
        }]),
    };
    serde_json::to_value(s).unwrap()
}

/// Replica processes on distinct loopback addresses sharing one port, like pods.
fn pods(n: usize, first_octet: u8, extra: &[&[&str]]) -> (Vec<ReplicaProcess>, u16) {
    let mut out: Vec<ReplicaProcess> = Vec::new();
    let mut port = 0;
    for i in 0..n {
        let listen = format!("127.0.0.{}:{port}", usize::from(first_octet) + i);
        let mut args = vec!["--listen", listen.as_str()];
        args.extend_from_slice(extra.get(i).copied().unwrap_or(&[]));
        let r = replica(&args);
        port = r.addr.port();
        out.push(r);
    }
    (out, port)
}

/// The proxy following Service `game` (port `game`) in the fake cluster, with `extra` flags.
fn service_proxy(cluster: &Cluster, extra: &[&str]) -> ProxyProcess {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--kubernetes-service",
        "game",
        "--port-name",
        "game",
    ];
    args.extend_from_slice(extra);
    cluster.proxy(&args)
}

fn wait_replicas(proxy: &ProxyProcess, ready: f64, draining: f64) {
    let r = wait_metric(proxy, "spotable_replicas", &[("state", "ready")], |v| {
        v == ready
    });
    let d = wait_metric(proxy, "spotable_replicas", &[("state", "draining")], |v| {
        v == draining
    });
    assert_eq!((r, d), (ready, draining), "replica set (ready, draining)");
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn discovery_drives_dedupe_draining_removal_and_new_endpoints() {
    let cluster = Cluster::new();
    let (mut pods, port) = pods(2, 10, &[&["--tag", "A"], &["--tag", "B"]]);
    cluster.api.apply(
        SLICES,
        slice(
            "game-1",
            port,
            &[(ip(10), Cond::Ready), (ip(11), Cond::Ready)],
        ),
    );
    let proxy = service_proxy(
        &cluster,
        &["--dedupe", "primary", "--failover-after", "30ms"],
    );
    wait_replicas(&proxy, 2.0, 0.0);
    assert_eq!(http_get(proxy.admin.unwrap(), "/readyz").unwrap().0, 200);

    let c = client(&proxy);
    let tag = |i: usize| if i == 0 { b'A' } else { b'B' };

    // Two ready endpoints: every answer exactly once, from the primary (the first to answer).
    let rx = Collector::start(&c);
    stream(&c, 100, 2 * MS, |_| {});
    let phase1 = rx.finish(100);
    assert_each(&phase1, 100, 1);
    let (primary, other) = if phase1[0].last() == Some(&b'A') {
        (0, 1)
    } else {
        (1, 0)
    };
    assert!(phase1.iter().all(|a| a.last() == Some(&tag(primary))));
    // The standby's 100 answers were suppressed; the last of them may be counted after the
    // primary's last answer arrived, so wait for all 100 before taking the baseline.
    let suppressed_phase1 = wait_metric(&proxy, "spotable_duplicates_suppressed_total", &[], |v| {
        v >= 100.0
    });
    assert_eq!(
        suppressed_phase1, 100.0,
        "the standby answered each datagram once"
    );

    // The primary turns terminating: it stops being primary but keeps answering.
    let draining = [
        (ip(10 + primary as u8), Cond::Draining),
        (ip(10 + other as u8), Cond::Ready),
    ];
    cluster.api.apply(SLICES, slice("game-1", port, &draining));
    wait_replicas(&proxy, 1.0, 1.0);
    let suppressed_before = metric(&proxy, "spotable_duplicates_suppressed_total", &[]);
    let rx = Collector::start(&c);
    stream(&c, 100, 2 * MS, |_| {});
    let phase2 = rx.finish(100);
    assert_each(&phase2, 100, 1);
    assert!(
        phase2.iter().all(|a| a.last() == Some(&tag(other))),
        "draining replica still primary"
    );
    let suppressed = wait_metric(&proxy, "spotable_duplicates_suppressed_total", &[], |v| {
        v >= suppressed_before + 100.0
    });
    assert_eq!(
        suppressed - suppressed_before,
        100.0,
        "the draining replica kept answering"
    );

    // It is deleted and its process SIGKILLed mid-stream: nothing lost, nothing doubled.
    let rx = Collector::start(&c);
    let mut victim = Some(pods.remove(primary));
    stream(&c, 200, 2 * MS, |seq| {
        if seq == 60 {
            cluster.api.apply(
                SLICES,
                slice("game-1", port, &[(ip(10 + other as u8), Cond::Ready)]),
            );
        }
        if seq == 100 {
            victim.take().unwrap().process.kill().unwrap();
        }
    });
    assert_each(&rx.finish(200), 200, 1);
    wait_replicas(&proxy, 1.0, 0.0);
    // The removed replica's series left /metrics with it; the survivor's stay.
    let gone = format!("replica=\"{}:{port}\"", ip(10 + primary as u8));
    let kept = format!("replica=\"{}:{port}\"", ip(10 + other as u8));
    let text = metrics(&proxy);
    assert!(!text.contains(&gone), "{gone} still reported");
    assert!(text.contains(&kept), "{kept} not reported");

    // A new endpoint is added: new sessions use it, the running one does not.
    let newcomer = UdpSocket::bind((ip(12), port)).unwrap();
    newcomer.set_read_timeout(Some(300 * MS)).unwrap();
    cluster
        .api
        .apply(SLICES, slice("game-2", port, &[(ip(12), Cond::Ready)]));
    wait_replicas(&proxy, 2.0, 0.0);
    c.send(b"old session").unwrap();
    let mut buf = [0u8; 64];
    assert!(
        newcomer.recv_from(&mut buf).is_err(),
        "the new endpoint joined a running session"
    );
    let fresh = client(&proxy);
    fresh.send(b"new session").unwrap();
    let (n, _) = newcomer
        .recv_from(&mut buf)
        .expect("new session fans out to the new endpoint");
    assert_eq!(&buf[..n], b"new session");
}

#[test]
fn a_rolling_replacement_never_leaves_a_streaming_player_deaf() {
    // A, B, C, D are replica processes sharing one port on 127.0.0.70..73, like pods.
    let cluster = Cluster::new();
    let (pods, port) = pods(4, 70, &[]);
    let mut pods: Vec<Option<ReplicaProcess>> = pods.into_iter().map(Some).collect();
    let step = |members: &[(u8, Cond)]| {
        let eps: Vec<_> = members.iter().map(|&(i, c)| (ip(70 + i), c)).collect();
        slice("game-1", port, &eps)
    };
    let (a, b, c, d) = (0, 1, 2, 3);
    cluster
        .api
        .apply(SLICES, step(&[(a, Cond::Ready), (b, Cond::Ready)]));
    let proxy = service_proxy(&cluster, &[]);
    wait_replicas(&proxy, 2.0, 0.0);

    // A player streams at 400 datagrams/s while the Deployment rolls (no --late-join):
    // A,B -> A,B,C -> A terminating -> B,C -> B,C,D -> B terminating -> C,D. Each removed
    // endpoint's process is SIGKILLed as it leaves.
    let player = client(&proxy);
    let rx = Collector::start(&player);
    let interval = Duration::from_micros(2500);
    let mut last_original_left = None;
    stream(&player, 2000, interval, |seq| {
        let (members, kill): (&[(u8, Cond)], Option<u8>) = match seq {
            200 => (
                &[(a, Cond::Ready), (b, Cond::Ready), (c, Cond::Ready)],
                None,
            ),
            400 => (
                &[(a, Cond::Draining), (b, Cond::Ready), (c, Cond::Ready)],
                None,
            ),
            600 => (&[(b, Cond::Ready), (c, Cond::Ready)], Some(a)),
            800 => (
                &[(b, Cond::Ready), (c, Cond::Ready), (d, Cond::Ready)],
                None,
            ),
            1000 => (
                &[(b, Cond::Draining), (c, Cond::Ready), (d, Cond::Ready)],
                None,
            ),
            1200 => (&[(c, Cond::Ready), (d, Cond::Ready)], Some(b)),
            _ => return,
        };
        cluster.api.apply(SLICES, step(members));
        if let Some(gone) = kill {
            pods[usize::from(gone)]
                .take()
                .unwrap()
                .process
                .kill()
                .unwrap();
        }
        if seq == 1200 {
            last_original_left = Some(Instant::now());
        }
    });
    let answers = rx.finish_at_seq(1999);
    let left = last_original_left.unwrap();

    let unique = distinct_seqs(&answers);
    // Until the last original replica left, nothing was lost.
    for n in 0..1190 {
        assert!(
            unique.binary_search(&n).is_ok(),
            "answer {n} lost before B left"
        );
    }
    // Answers resume within 1 s of B leaving, on a fresh session on C and D ...
    let resumed = answers
        .iter()
        .find(|(at, a)| *at > left && spotable_fixtures::wire::seq_of(a).unwrap() >= 1200)
        .map(|(at, _)| *at - left)
        .expect("answers never resumed");
    assert!(
        resumed <= Duration::from_secs(1),
        "resumed after {resumed:?}"
    );
    // ... and after that second every datagram is answered.
    let settled = 1200 + (Duration::from_secs(1).as_micros() / interval.as_micros()) as u64;
    let lost: Vec<_> = (settled..2000)
        .filter(|n| unique.binary_search(n).is_err())
        .collect();
    assert!(lost.is_empty(), "lost after the reconnect: {lost:?}");
    let closed = wait_metric(
        &proxy,
        "spotable_sessions_closed_total",
        &[("reason", "no_replicas")],
        |v| v >= 1.0,
    );
    assert_eq!(closed, 1.0);
    assert_eq!(
        log_count(&proxy, "session closed: its last replica left"),
        1,
        "logged once"
    );
}

/// The last original replica's process dies (a crash, an OOM kill) after the new replicas
/// are up but before discovery removes it: the kernel's port unreachable closes the player's
/// session at once, and the next datagram opens one on the new replicas. Before, the player
/// waited for discovery (~350 ms measured, 140 of 3 800 answers lost at 400/s).
#[test]
fn the_last_original_replica_dying_before_discovery_knows_costs_a_few_datagrams() {
    let cluster = Cluster::new();
    let (pods, port) = pods(3, 80, &[]);
    let mut pods: Vec<Option<ReplicaProcess>> = pods.into_iter().map(Some).collect();
    let members = |ids: &[u8]| {
        let eps: Vec<_> = ids.iter().map(|&i| (ip(80 + i), Cond::Ready)).collect();
        slice("game-1", port, &eps)
    };
    cluster.api.apply(SLICES, members(&[0]));
    let proxy = service_proxy(&cluster, &[]);
    wait_replicas(&proxy, 1.0, 0.0);
    let player = client(&proxy);
    let rx = Collector::start(&player);
    let interval = Duration::from_micros(2500);
    let mut killed_at = None;
    stream(&player, 1200, interval, |seq| match seq {
        // The new replicas are up (no --late-join: the session stays on the original).
        200 => {
            cluster.api.apply(SLICES, members(&[0, 1, 2]));
        }
        400 => {
            pods[0].take().unwrap().process.kill().unwrap();
            killed_at = Some(Instant::now());
        }
        _ => {}
    });
    let answers = rx.finish_at_seq(1199);
    let killed_at = killed_at.unwrap();
    let unique = distinct_seqs(&answers);
    for n in 0..395 {
        assert!(
            unique.binary_search(&n).is_ok(),
            "answer {n} lost before the kill"
        );
    }
    let seq = |a: &[u8]| spotable_fixtures::wire::seq_of(a).unwrap();
    let (gap, around) = answers
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, (seq(&w[0].1), seq(&w[1].1))))
        .max()
        .unwrap();
    assert!(
        gap <= 50 * MS,
        "longest gap {gap:?}, between answers {around:?}"
    );
    let first_after = answers
        .iter()
        .find(|(at, _)| *at > killed_at)
        .map(|(_, a)| spotable_fixtures::wire::seq_of(a).unwrap())
        .unwrap();
    let lost = (400..1200)
        .filter(|n| unique.binary_search(n).is_err())
        .count();
    assert!(
        lost <= 5,
        "{lost} lost after the kill (first answer after it: {first_after})"
    );
    let closed = metric(
        &proxy,
        "spotable_sessions_closed_total",
        &[("reason", "unreachable")],
    );
    assert_eq!(closed, 1.0);
    wait_metric(
        &proxy,
        "spotable_upstream_errors_total",
        &[("reason", "refused")],
        |v| v >= 1.0,
    );
}

#[test]
fn not_ready_until_the_first_complete_list() {
    let cluster = Cluster::new();
    cluster.api.stop();
    let proxy = service_proxy(&cluster, &[]);
    let admin = proxy.admin.unwrap();
    // Once the proxy has tried the API and failed, it must still say not ready.
    let tried = wait_metric(&proxy, "spotable_discovery_watch_errors_total", &[], |v| {
        v >= 1.0
    });
    assert!(tried >= 1.0, "the proxy never tried the API");
    assert_eq!(
        http_get(admin, "/readyz").unwrap().0,
        503,
        "ready without a list"
    );
    cluster.api.restart().unwrap();
    cluster
        .api
        .apply(SLICES, slice("game-1", 7777, &[(ip(10), Cond::Ready)]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(admin, "/readyz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        std::thread::sleep(50 * MS);
    }
    assert!(metric(&proxy, "spotable_discovery_watch_errors_total", &[]) >= 1.0);
}

#[test]
fn missing_kubeconfig_is_a_clear_error() {
    let out = std::process::Command::new(proxy_exe())
        .args(["--listen", "127.0.0.1:0", "--kubernetes-service", "game"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot find Kubernetes settings"),
        "{stderr}"
    );
}

/// Six endpoints played by the test: sockets on 127.0.0.{first..first+6} sharing a port.
fn endpoint_sockets(first: u8, n: u8) -> (Vec<UdpSocket>, u16) {
    let s0 = UdpSocket::bind((ip(first), 0)).unwrap();
    let port = s0.local_addr().unwrap().port();
    let mut v = vec![s0];
    for i in 1..n {
        v.push(UdpSocket::bind((ip(first + i), port)).unwrap());
    }
    for s in &v {
        s.set_nonblocking(true).unwrap();
    }
    (v, port)
}

/// Which endpoint sockets received each payload: drains them until `expected` datagrams
/// arrived (or 10 s passed), then once more for any extra that came with them.
fn receivers(eps: &[UdpSocket], expected: usize) -> std::collections::HashMap<Vec<u8>, Vec<usize>> {
    let mut m: std::collections::HashMap<Vec<u8>, Vec<usize>> = Default::default();
    let mut buf = [0u8; 64];
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = count;
        for (i, s) in eps.iter().enumerate() {
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                m.entry(buf[..n].to_vec()).or_default().push(i);
                count += 1;
            }
        }
        if (count >= expected && count == before) || Instant::now() >= deadline {
            return m;
        }
        if count == before {
            std::thread::sleep(10 * MS);
        }
    }
}

fn ready_slice(port: u16, first: u8, members: impl Iterator<Item = u8>) -> serde_json::Value {
    let eps: Vec<_> = members.map(|i| (ip(first + i), Cond::Ready)).collect();
    slice("game-1", port, &eps)
}

#[test]
fn fanout_picks_the_same_replicas_on_every_proxy_and_removal_moves_only_its_sessions() {
    let cluster = Cluster::new();
    let (eps, port) = endpoint_sockets(20, 6);
    cluster.api.apply(SLICES, ready_slice(port, 20, 0..6));
    let p1 = service_proxy(&cluster, &["--fanout", "2"]);
    let p2 = service_proxy(&cluster, &["--fanout", "2"]);
    wait_replicas(&p1, 6.0, 0.0);
    wait_replicas(&p2, 6.0, 0.0);

    // Each player talks through both proxies from one address (as behind a load balancer
    // that moved it): both proxies must pick the same two replicas.
    let players: Vec<UdpSocket> = (0..24)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, p) in players.iter().enumerate() {
        p.send_to(format!("{i}/p1").as_bytes(), p1.addr).unwrap();
        p.send_to(format!("{i}/p2").as_bytes(), p2.addr).unwrap();
    }
    // Each datagram to two replicas, through each proxy.
    let got = receivers(&eps, players.len() * 2 * 2);
    let mut pairs = Vec::new();
    let mut used = [0usize; 6];
    for i in 0..players.len() {
        let mut a = got
            .get(format!("{i}/p1").as_bytes())
            .cloned()
            .unwrap_or_default();
        let mut b = got
            .get(format!("{i}/p2").as_bytes())
            .cloned()
            .unwrap_or_default();
        a.sort();
        b.sort();
        assert_eq!(a.len(), 2, "player {i} fanned out to {a:?}");
        assert_eq!(a, b, "player {i}: proxies disagree");
        for &e in &a {
            used[e] += 1;
        }
        pairs.push(a);
    }
    assert!(
        used.iter().filter(|&&n| n > 0).count() >= 4,
        "load spread over replicas: {used:?}"
    );

    // Remove the busiest endpoint: only the sessions that used it change.
    let gone = (0..6).max_by_key(|&e| used[e]).unwrap();
    cluster.api.apply(
        SLICES,
        ready_slice(port, 20, (0..6).filter(|&e| e != gone as u8)),
    );
    wait_replicas(&p1, 5.0, 0.0);
    for (i, p) in players.iter().enumerate() {
        p.send_to(format!("{i}/after").as_bytes(), p1.addr).unwrap();
    }
    let expected = pairs
        .iter()
        .map(|p| if p.contains(&gone) { 1 } else { 2 })
        .sum();
    let got = receivers(&eps, expected);
    let mut moved = 0;
    for (i, before) in pairs.iter().enumerate() {
        let mut now = got
            .get(format!("{i}/after").as_bytes())
            .cloned()
            .unwrap_or_default();
        now.sort();
        if before.contains(&gone) {
            moved += 1;
            let survivor: Vec<_> = before.iter().copied().filter(|&e| e != gone).collect();
            assert_eq!(
                now, survivor,
                "player {i} should keep only its surviving replica"
            );
        } else {
            assert_eq!(
                &now, before,
                "player {i} moved although its replicas stayed"
            );
        }
    }
    assert!(moved > 0);
    let degraded = wait_metric(&p1, "spotable_sessions_degraded_total", &[], |v| {
        v >= moved as f64
    });
    assert_eq!(degraded, moved as f64);
}

fn list_requests(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.contains("endpointslices") && !r.contains("watch=true"))
        .count()
}

#[test]
fn an_abruptly_closed_watch_resumes() {
    let cluster = Cluster::new();
    let (_eps, port) = endpoint_sockets(40, 2);
    cluster.api.apply(SLICES, ready_slice(port, 40, 0..2));
    let proxy = service_proxy(&cluster, &[]);
    wait_replicas(&proxy, 2.0, 0.0);
    cluster.api.drop_watches();
    cluster.api.apply(SLICES, ready_slice(port, 40, 0..1));
    wait_replicas(&proxy, 1.0, 0.0);
    // kube treats the cut as the end of that watch and resumes from its last version.
    let watches = cluster
        .api
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true"))
        .count();
    assert!(watches >= 2, "{watches} watch requests");
    assert_eq!(
        list_requests(&cluster.api),
        1,
        "a resumed watch needs no relist"
    );
}

#[test]
fn an_expired_resource_version_leads_to_a_relist() {
    let cluster = Cluster::new();
    let (_eps, port) = endpoint_sockets(50, 3);
    cluster.api.apply(SLICES, ready_slice(port, 50, 0..1));
    let proxy = service_proxy(&cluster, &[]);
    wait_replicas(&proxy, 1.0, 0.0);
    // While the watch is down, the change it would resume from is compacted away.
    cluster.api.drop_watches();
    cluster.api.apply(SLICES, ready_slice(port, 50, 0..3));
    cluster.api.compact();
    wait_replicas(&proxy, 3.0, 0.0);
    assert!(
        cluster
            .api
            .requests()
            .iter()
            .any(|r| r.contains("watch=true")),
        "watched at all"
    );
    assert_eq!(
        list_requests(&cluster.api),
        2,
        "410 Gone must lead to exactly one relist"
    );
}

#[test]
fn traffic_keeps_flowing_on_the_last_known_set_while_the_api_is_down() {
    let cluster = Cluster::new();
    let (pods, port) = pods(2, 60, &[]);
    cluster.api.apply(SLICES, ready_slice(port, 60, 0..2));
    let proxy = service_proxy(&cluster, &[]);
    wait_replicas(&proxy, 2.0, 0.0);
    let admin = proxy.admin.unwrap();

    cluster.api.stop();
    let c = client(&proxy);
    let rx = Collector::start(&c);
    stream(&c, 1000, 3 * MS, |seq| {
        if seq % 250 == 0 {
            assert_eq!(
                http_get(admin, "/readyz").unwrap().0,
                200,
                "not ready while API down"
            );
        }
    });
    assert_each(&rx.finish(1000), 1000, 1);
    assert!(metric(&proxy, "spotable_discovery_watch_errors_total", &[]) >= 1.0);
    assert!(metric(&proxy, "spotable_discovery_last_sync_age_seconds", &[]) >= 2.0);

    // Back up: changes flow again.
    cluster.api.restart().unwrap();
    cluster.api.apply(SLICES, ready_slice(port, 60, 0..1));
    wait_replicas(&proxy, 1.0, 0.0);
    drop(pods);
}

#[test]
fn ipv6_endpoints_are_used() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let cluster = Cluster::new();
    let r = replica(&["--listen", "[::1]:0"]);
    let s = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("game-v6".into()),
            labels: Some([("kubernetes.io/service-name".to_string(), "game".to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv6".into(),
        endpoints: vec![Endpoint {
            addresses: vec!["::1".into()],
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("game".into()),
            port: Some(i32::from(r.addr.port())),
            protocol: Some("UDP".into()),
            ..Default::default()
        }]),
    };
    cluster.api.apply(SLICES, serde_json::to_value(s).unwrap());
    let proxy = service_proxy(&cluster, &[]);
    wait_replicas(&proxy, 1.0, 0.0);
    // An IPv4 player reaches an IPv6 replica through the proxy.
    let c = client(&proxy);
    let rx = Collector::start(&c);
    stream(&c, 20, MS, |_| {});
    assert_each(&rx.finish(20), 20, 1);
}
