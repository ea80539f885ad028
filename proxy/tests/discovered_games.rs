//! Games discovered at run time through the Kubernetes API: the proxy binary with
//! `--kubernetes-games` (labelled Services and their EndpointSlices) or `--agones-games`
//! (labelled GameServers), the real `kube` client, the fake API server, real replica processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use spotable_fixtures::process::{ProxyProcess, ReplicaProcess, http_get};

const SERVICES: &str = "/api/v1/namespaces/games/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/games/endpointslices";
const GAME_SERVERS: &str = "/apis/agones.dev/v1/namespaces/games/gameservers";
const MS: Duration = Duration::from_millis(1);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Two replica processes of one game, on 127.0.0.`first` and the next address, one port, each
/// answering with `tag` appended.
fn pods(first: u8, tag: &str) -> (Vec<ReplicaProcess>, u16) {
    let a = replica(&["--listen", &format!("{}:0", ip(first)), "--tag", tag]);
    let port = a.addr.port();
    let b = replica(&[
        "--listen",
        &format!("{}:{port}", ip(first + 1)),
        "--tag",
        tag,
    ]);
    (vec![a, b], port)
}

/// A Service labelled with its game, its tokens annotated.
fn service(name: &str, game: &str, tokens: &str, extra: &[(&str, &str)]) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert("spotable.io/tokens".into(), tokens.into());
    for (k, v) in extra {
        annotations.insert((*k).into(), (*v).into());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "games",
            "labels": {"spotable.io/game": game},
            "annotations": annotations,
        },
        "spec": {"ports": [{"name": "game", "port": 7000, "protocol": "UDP"}]},
    })
}

/// The Service's one EndpointSlice, every endpoint ready.
fn slice(service: &str, port: u16, ips: &[IpAddr]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-1"),
            "namespace": "games",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": ips.iter().map(|ip| json!({
            "addresses": [ip.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
        })).collect::<Vec<_>>(),
        "ports": [{"name": "game", "port": port, "protocol": "UDP"}],
    })
}

/// An Agones GameServer of `game` in `state`, at `addr`.
fn game_server(name: &str, game: &str, tokens: &str, state: &str, addr: (IpAddr, u16)) -> Value {
    json!({
        "apiVersion": "agones.dev/v1",
        "kind": "GameServer",
        "metadata": {
            "name": name,
            "namespace": "games",
            "labels": {"spotable.io/game": game},
            "annotations": {"spotable.io/tokens": tokens},
        },
        "spec": {"ports": [{"name": "default", "containerPort": 7654, "protocol": "UDP"}]},
        "status": {
            "state": state,
            "address": addr.0.to_string(),
            "ports": [{"name": "default", "port": addr.1}],
        },
    })
}

/// The proxy routing by 8-byte tokens, its games from `source` (`--kubernetes-games` or
/// `--agones-games`) in the fake cluster.
fn games_proxy(cluster: &Cluster, source: &str) -> ProxyProcess {
    cluster.proxy(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--token-bytes",
        "8",
        source,
    ])
}

fn games(proxy: &ProxyProcess) -> Value {
    let (status, body) = http_get(proxy.admin.unwrap(), "/games").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn game<'a>(view: &'a Value, name: &str) -> Option<&'a Value> {
    view["games"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
}

/// Polls `GET /games` until `ok` holds; returns that view.
fn wait_games(proxy: &ProxyProcess, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let held = eventually(Duration::from_secs(10), || {
        last = games(proxy);
        ok(&last)
    });
    assert!(held, "games never got there; last view: {last}");
    last
}

/// Streams `count` datagrams with `token` and returns the answers.
fn play(c: &UdpSocket, count: u64, token: &[u8]) -> Vec<Vec<u8>> {
    let rx = Collector::start(c);
    stream_with_suffix(c, count, MS, token, |_| {});
    rx.finish(count as usize)
}

fn unknown_tokens(proxy: &ProxyProcess) -> f64 {
    metric(
        proxy,
        "spotable_drops_total",
        &[("reason", "unknown_token")],
    )
}

#[test]
fn games_follow_labelled_services_as_they_come_and_go() {
    let cluster = Cluster::new();
    let (mut a, port_a) = pods(31, "/A");
    let (mut b, port_b) = pods(41, "/B");
    cluster
        .api
        .apply(SERVICES, service("arena-1", "arena-1", "arena-01", &[]));
    cluster
        .api
        .apply(SLICES, slice("arena-1", port_a, &[ip(31), ip(32)]));
    cluster.api.apply(
        SERVICES,
        service("arena-2", "arena-2", "arena-02,base64:AAECAwQFBgc=", &[]),
    );
    cluster
        .api
        .apply(SLICES, slice("arena-2", port_b, &[ip(41), ip(42)]));
    // An unlabelled Service and a slice of no game are not games.
    let mut plain = service("other", "x", "zzzzzzzz", &[]);
    plain["metadata"]["labels"] = json!({});
    cluster.api.apply(SERVICES, plain);
    let proxy = games_proxy(&cluster, "--kubernetes-games");
    let view = wait_games(&proxy, |v| {
        v["games"].as_array().is_some_and(|g| g.len() == 2)
    });
    let arena2 = game(&view, "arena-2").expect("arena-2 listed");
    assert_eq!(arena2["dedupe"], "copies");
    assert_eq!(arena2["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(arena2["replicas"].as_array().unwrap().len(), 2);
    assert!(
        !view.to_string().contains("arena-01"),
        "tokens are redacted: {view}"
    );
    assert_eq!(http_get(proxy.admin.unwrap(), "/readyz").unwrap().0, 200);

    // Both games stream at once; half-way one copy of each is SIGKILLed (its endpoint still
    // listed, as in the seconds before Kubernetes notices): nothing lost, nothing doubled.
    let (ca, cb) = (client(&proxy), client(&proxy));
    let (rxa, rxb) = (Collector::start(&ca), Collector::start(&cb));
    let mut kill_a = a.remove(0);
    let mut kill_b = b.remove(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            stream_with_suffix(&ca, 300, 2 * MS, b"arena-01", |seq| {
                if seq == 150 {
                    kill_a.process.kill().unwrap();
                }
            })
        });
        s.spawn(|| {
            stream_with_suffix(&cb, 300, 2 * MS, &[0, 1, 2, 3, 4, 5, 6, 7], |seq| {
                if seq == 150 {
                    kill_b.process.kill().unwrap();
                }
            })
        });
    });
    let (got_a, got_b) = (rxa.finish(300), rxb.finish(300));
    assert_each(&got_a, 300, 1);
    assert_each(&got_b, 300, 1);
    assert!(got_a.iter().all(|x| x.ends_with(b"/A")));
    assert!(got_b.iter().all(|x| x.ends_with(b"/B")));
    let view = wait_games(&proxy, |v| {
        game(v, "arena-1").is_some_and(|g| g["delivered"] == 300 && g["sessions"] == 1)
    });
    let arena1 = game(&view, "arena-1").unwrap();
    assert_eq!(
        (&arena1["packets"], &arena1["drops"]),
        (&json!(300), &json!(0))
    );

    // arena-2's Service is deleted: its token routes nowhere, counted, never fanned out.
    assert!(cluster.api.delete(SERVICES, "arena-2"));
    wait_games(&proxy, |v| game(v, "arena-2").is_none());
    let before = unknown_tokens(&proxy);
    let c = client(&proxy);
    for _ in 0..5 {
        c.send(b"hello|arena-02").unwrap();
    }
    let dropped = wait_metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "unknown_token")],
        |v| v >= before + 5.0,
    );
    assert_eq!(dropped - before, 5.0);
    let mut buf = [0u8; 64];
    assert!(c.recv(&mut buf).is_err(), "no answer for a gone game");

    // A new game appears on the surviving replica of B, with a token and settings of its own.
    let settings = [
        ("spotable.io/dedupe", "primary"),
        ("spotable.io/fanout", "1"),
    ];
    cluster.api.apply(
        SERVICES,
        service("arena-3", "arena-3", "arena-03", &settings),
    );
    cluster
        .api
        .apply(SLICES, slice("arena-3", port_b, &[ip(42)]));
    let view = wait_games(&proxy, |v| {
        game(v, "arena-3").is_some_and(|g| g["replicas"].as_array().unwrap().len() == 1)
    });
    let arena3 = game(&view, "arena-3").unwrap();
    assert_eq!(
        (&arena3["dedupe"], &arena3["fanout"]),
        (&json!("primary"), &json!(1))
    );
    let c = client(&proxy);
    let got = play(&c, 50, b"arena-03");
    assert_each(&got, 50, 1);
    assert!(got.iter().all(|x| x.ends_with(b"/B")));

    // A Service claiming a token another game owns is left out, logged, and counted.
    cluster
        .api
        .apply(SERVICES, service("zz-thief", "zz-thief", "arena-01", &[]));
    wait_metric(&proxy, "spotable_game_problems", &[], |v| v == 1.0);
    assert!(eventually(Duration::from_secs(5), || log_count(
        &proxy,
        "game zz-thief left out: token ar"
    ) == 1));
    let got = play(&client(&proxy), 20, b"arena-01");
    assert_each(&got, 20, 1);
    assert!(got.iter().all(|x| x.ends_with(b"/A")), "arena-1 keeps it");
}

#[test]
fn games_follow_agones_game_servers_through_their_states() {
    let cluster = Cluster::new();
    let (a, port_a) = pods(51, "/A");
    let (_b, port_b) = pods(61, "/B");
    let gs = |name: &str, game: &str, token: &str, state: &str, addr: (IpAddr, u16)| {
        cluster
            .api
            .apply(GAME_SERVERS, game_server(name, game, token, state, addr));
    };
    gs("a-1", "arena-1", "arena-01", "Ready", (ip(51), port_a));
    gs("a-2", "arena-1", "arena-01", "Allocated", (ip(52), port_a));
    gs("b-1", "arena-2", "arena-02", "Reserved", (ip(61), port_b));
    // Not serving yet: not a member.
    gs("b-2", "arena-2", "arena-02", "Scheduled", (ip(62), port_b));
    let proxy = games_proxy(&cluster, "--agones-games");
    let view = wait_games(&proxy, |v| {
        v["games"].as_array().is_some_and(|g| g.len() == 2)
    });
    let members = |v: &Value, name: &str| {
        game(v, name).map_or(0, |g| g["replicas"].as_array().unwrap().len())
    };
    assert_eq!(
        (members(&view, "arena-1"), members(&view, "arena-2")),
        (2, 1)
    );

    let c = client(&proxy);
    let got = play(&c, 50, b"arena-01");
    assert_each(&got, 50, 1);
    assert!(got.iter().all(|x| x.ends_with(b"/A")));
    let got = play(&client(&proxy), 50, b"arena-02");
    assert_each(&got, 50, 1);
    assert!(got.iter().all(|x| x.ends_with(b"/B")));

    // b-2 becomes Ready: a member. a-1 shuts down: draining, its session keeps it.
    gs("b-2", "arena-2", "arena-02", "Ready", (ip(62), port_b));
    gs("a-1", "arena-1", "arena-01", "Shutdown", (ip(51), port_a));
    let view = wait_games(&proxy, |v| {
        members(v, "arena-2") == 2
            && game(v, "arena-1").is_some_and(|g| {
                g["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["state"] == "draining")
            })
    });
    assert_eq!(members(&view, "arena-1"), 2, "{view}");
    let got = play(&c, 50, b"arena-01");
    assert_each(&got, 50, 1);

    // Both of arena-1's GameServers are deleted: the game is gone, its token unknown.
    drop(a);
    assert!(cluster.api.delete(GAME_SERVERS, "a-1"));
    assert!(cluster.api.delete(GAME_SERVERS, "a-2"));
    wait_games(&proxy, |v| game(v, "arena-1").is_none());
    let before = unknown_tokens(&proxy);
    c.send(b"x|arena-01").unwrap();
    wait_metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "unknown_token")],
        |v| v == before + 1.0,
    );
    // The other game is untouched.
    let got = play(&client(&proxy), 50, b"arena-02");
    assert_each(&got, 50, 1);
}
