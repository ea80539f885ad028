//! The wrapper as a real process with real children: ports, environment, signals, reaping,
//! exit codes, inventory messages through the SQS emulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spotable_fixtures::aws::{moto_with_queue, receive_all, receive_until};
use spotable_fleet::inventory::{Message, Status};

/// A queue message as a consumer reads it: held against the published schema, then typed.
fn parse(body: &str) -> Message {
    let value = spotable_fixtures::schema::inventory_message(body).unwrap();
    serde_json::from_value(value).unwrap()
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_spotable-wrapper")
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("spotable-wrapper-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A port range private to one test (by offset) so parallel tests do not meet.
fn range(offset: u16) -> (u16, u16) {
    let base = 20_000 + u16::try_from(std::process::id() % 200).unwrap() * 100 + offset;
    (base, base + 59)
}

fn wrapper(dir: &Path, offset: u16, extra: &[&str], command: &[&str]) -> Command {
    let mut args = vec!["--public-ip", "203.0.113.7"];
    args.extend_from_slice(extra);
    wrapper_without_address(dir, offset, &args, command)
}

/// [`wrapper`] without an address of its own: give `--public-ip` or `--front-address`.
fn wrapper_without_address(dir: &Path, offset: u16, extra: &[&str], command: &[&str]) -> Command {
    let (a, b) = range(offset);
    let mut c = Command::new(exe());
    c.args(["--no-imds", "--port", "game/udp"])
        .args(["--port-range", &format!("{a}-{b}")])
        .args(["--lock-dir", dir.join("locks").to_str().unwrap()])
        .args(extra)
        .arg("--")
        .args(command)
        .env("OUT", dir)
        .env_remove("QUEUE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

fn wait(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
}

fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn twenty_wrappers_at_once_get_distinct_ports_free_for_their_protocols() {
    let dir = tempdir("twenty");
    let (a, _) = range(0);
    // Ports already taken by other programs, for one protocol each.
    let udp_busy = std::net::UdpSocket::bind(("0.0.0.0", a)).unwrap();
    let tcp_busy = std::net::TcpListener::bind(("0.0.0.0", a + 1)).unwrap();
    let mut children: Vec<Child> = (0..20)
        .map(|i| {
            wrapper(
                &dir,
                0,
                &["--port", "rcon/tcp"],
                &[
                    "sh",
                    "-c",
                    // The env as the game sees it (printenv, which the wrapper leaves
                    // alone), then `$1`: an argument the wrapper expanded itself.
                    &format!(
                        "echo \"$(printenv SERVER_PORT) $(printenv RCON_PORT) \
                         $(printenv SPOTABLE_PORT_GAME) $(printenv SPOTABLE_PORT_RCON) $1\" \
                         > \"$OUT/{i}.out\"; sleep 2"
                    ),
                    "sh",
                    "${SPOTABLE_PORT_RCON}",
                ],
            )
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let line = wait_for_file(&dir.join(format!("{i}.out")));
        let v: Vec<u16> = line
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(v.len(), 5, "{line}");
        assert_eq!(v[0], v[2], "SERVER_PORT is the game port");
        assert_eq!(v[1], v[3], "RCON_PORT is the rcon port");
        assert_eq!(
            v[4], v[1],
            "${{SPOTABLE_PORT_RCON}} in an argument became the port"
        );
        assert_ne!(v[0], a, "game/udp got a port whose UDP side is taken");
        assert_ne!(v[1], a + 1, "rcon/tcp got a port whose TCP side is taken");
        assert!(
            seen.insert(v[0]) && seen.insert(v[1]),
            "port handed out twice: {v:?}"
        );
    }
    assert_eq!(seen.len(), 40);
    for c in &mut children {
        assert!(wait(c, Duration::from_secs(20)).success());
    }
    drop((udp_busy, tcp_busy));
}

#[test]
fn exit_codes_propagate_and_a_stubborn_child_is_killed_after_grace() {
    let dir = tempdir("exit");
    let mut c = wrapper(&dir, 60, &[], &["sh", "-c", "exit 7"])
        .spawn()
        .unwrap();
    assert_eq!(wait(&mut c, Duration::from_secs(10)).code(), Some(7));
    let mut c = wrapper(&dir, 60, &[], &["sh", "-c", "kill -USR1 $$"])
        .spawn()
        .unwrap();
    assert_eq!(wait(&mut c, Duration::from_secs(10)).code(), Some(128 + 10));
    // Ignores SIGTERM (and so does its sleep, which inherits the ignored disposition).
    let mut c = wrapper(
        &dir,
        60,
        &["--grace", "1s"],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo up > \"$OUT/stubborn\"; sleep 30",
        ],
    )
    .spawn()
    .unwrap();
    wait_for_file(&dir.join("stubborn"));
    let start = Instant::now();
    signal(&c, "-TERM");
    assert_eq!(
        wait(&mut c, Duration::from_secs(10)).code(),
        Some(128 + 9),
        "SIGKILL"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed before the grace: {took:?}"
    );
}

#[test]
fn an_orphaned_grandchild_is_reaped() {
    let dir = tempdir("orphan");
    // The subshell exits at once, orphaning its background sleep.
    let mut c = wrapper(
        &dir,
        120,
        &[],
        &[
            "sh",
            "-c",
            "(sleep 0.5 & echo $! > \"$OUT/orphan\"); sleep 2",
        ],
    )
    .spawn()
    .unwrap();
    let orphan: u32 = wait_for_file(&dir.join("orphan")).trim().parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
    let ppid: u32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert_eq!(ppid, c.id(), "the orphan was reparented to the wrapper");
    // The orphan exits after 0.5 s; the wrapper, as PID 1 would, must reap it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{orphan}")).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !Path::new(&format!("/proc/{orphan}")).exists(),
        "the orphan is a zombie: {}",
        std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default()
    );
    assert!(wait(&mut c, Duration::from_secs(10)).success());
}

#[test]
fn unreachable_metadata_is_a_clear_error_unless_overridden() {
    let dir = tempdir("imds");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (a, b) = range(180);
    let run = |extra: &[&str]| {
        Command::new(exe())
            .args(["--imds-endpoint", &format!("http://127.0.0.1:{closed}")])
            .args(["--port", "game/udp", "--port-range", &format!("{a}-{b}")])
            .args(["--lock-dir", dir.to_str().unwrap()])
            .args(extra)
            .args(["--", "true"])
            .env_remove("SPOTABLE_PUBLIC_IP")
            .output()
            .unwrap()
    };
    let start = Instant::now();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot find the public address"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(15), "no hang");
    let out = run(&["--public-ip", "198.51.100.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_errors() {
    for (args, expected) in [
        (vec!["--port", "game/udp"], "no game command"),
        (vec!["--", "true"], "--port"),
        (vec!["--port", "game/sctp", "--", "true"], "--port"),
        (
            vec!["--port", "game/udp", "--port-range", "9-1", "--", "true"],
            "--port-range",
        ),
        (
            vec![
                "--front-address",
                "play.example.com",
                "--port",
                "game/udp",
                "--",
                "true",
            ],
            "--front-address",
        ),
        (
            vec![
                "--front-address",
                "play.example.com:7777",
                "--public-ip",
                "203.0.113.7",
                "--port",
                "game/udp",
                "--",
                "true",
            ],
            "cannot be used with --public-ip",
        ),
        (
            vec!["--token", "base64:!!", "--port", "game/udp", "--", "true"],
            "not valid base64",
        ),
        (
            vec![
                "init",
                "--env-file",
                "/tmp/x",
                "--agones",
                "--port",
                "game/udp",
            ],
            "--agones",
        ),
    ] {
        let out = Command::new(exe()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// A game that binds its UDP port, notes that it is up, and on SIGTERM notes it and exits.
const GAME: &str = r#"
import os, signal, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(os.environ["SERVER_PORT"])))
def stop(sig, frame):
    open(os.environ["OUT"] + "/got-term", "w").write("TERM\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.environ["OUT"] + "/up", "w").write("up\n")
time.sleep(60)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reaches_the_game_and_the_inventory_hears_every_step_in_order() {
    let dir = tempdir("sigterm");
    let (moto, sqs, queue) = moto_with_queue("inventory.fifo").await;
    let mut cmd = wrapper(&dir, 240, &["--type", "testgame"], &["python3", "-c", GAME]);
    cmd.env("QUEUE_URL", &queue)
        .envs(moto.env())
        .env("POD_NAMESPACE", "games")
        .env("POD_NAME", "g-0");
    let mut child = cmd.spawn().unwrap();
    let up = dir.join("up");
    tokio::task::spawn_blocking(move || wait_for_file(&up))
        .await
        .unwrap();
    // The readiness check has seen the bound port once `ready` is on the queue.
    let mut got = receive_until(&sqs, &queue, "\"ready\"", Duration::from_secs(10)).await;
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || wait(&mut child, Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("got-term")).unwrap(),
        "TERM\n"
    );
    got.extend(receive_all(&sqs, &queue, Duration::from_millis(1000)).await);
    let messages: Vec<Message> = got.iter().map(|r| parse(&r.body)).collect();
    let statuses: Vec<Status> = messages.iter().map(|m| m.status).collect();
    assert_eq!(
        statuses,
        vec![
            Status::Init,
            Status::Ready,
            Status::Terminating,
            Status::Terminated
        ]
    );
    let last = messages.last().unwrap();
    assert_eq!(last.exit_code, Some(0));
    assert_eq!(last.kind.as_deref(), Some("testgame"));
    assert_eq!(last.public_ipv4.as_deref(), Some("203.0.113.7"));
    assert!(last.ports.contains_key("game"));
    assert_eq!(got[0].group_id.as_deref(), Some("games/g-0"));
    let ids: std::collections::HashSet<_> = messages.iter().map(|m| &m.event_id).collect();
    assert_eq!(ids.len(), 4, "one event id per step");
}

#[test]
fn an_unreachable_queue_does_not_stop_the_game() {
    let dir = tempdir("noqueue");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let mut c = wrapper(&dir, 300, &[], &["sh", "-c", "echo ran > \"$OUT/ran\""])
        .env(
            "QUEUE_URL",
            format!("http://127.0.0.1:{closed}/000000000000/q.fifo"),
        )
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"))
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait(&mut c, Duration::from_secs(30)).success());
    assert_eq!(std::fs::read_to_string(dir.join("ran")).unwrap(), "ran\n");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "held up by the queue: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_container_mode_writes_the_env_file_and_publishes_init() {
    let dir = tempdir("init");
    let (moto, sqs, queue) = moto_with_queue("inventory.fifo").await;
    let (a, b) = range(360);
    let env_file = dir.join("ports.env");
    let out = Command::new(exe())
        .args(["init", "--env-file", env_file.to_str().unwrap()])
        .args([
            "--no-imds",
            "--public-ip",
            "203.0.113.9",
            "--port",
            "game/udp",
            "--port",
            "rcon/tcp",
        ])
        .args([
            "--port-range",
            &format!("{a}-{b}"),
            "--lock-dir",
            dir.join("locks").to_str().unwrap(),
        ])
        .env("QUEUE_URL", &queue)
        .envs(moto.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read_to_string(&env_file).unwrap();
    for key in [
        "SERVER_PORT=",
        "RCON_PORT=",
        "SPOTABLE_PORT_GAME=",
        "SPOTABLE_PORT_RCON=",
    ] {
        assert!(env.contains(key), "{key} missing: {env}");
    }
    let got = receive_all(&sqs, &queue, Duration::from_millis(800)).await;
    assert_eq!(got.len(), 1);
    let m = parse(&got[0].body);
    assert_eq!(m.status, Status::Init);
    assert_eq!(m.public_ipv4.as_deref(), Some("203.0.113.9"));
    assert_eq!(m.ports.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_prints_the_live_fleet_and_remembers_it() {
    use spotable_fleet::inventory::{PodRef, Port, Proto, Publisher};
    let dir = tempdir("inventory");
    let (moto, sqs, queue) = moto_with_queue("inventory.fifo").await;
    let publisher = Publisher::with_client(sqs.clone(), queue.clone());
    let server = |name: &str, status: Status, port: u16| {
        let mut m = Message::new(format!("{name}:{status:?}"), status);
        m.pod = Some(PodRef {
            namespace: "games".into(),
            name: name.into(),
            uid: None,
        });
        m.node = Some(format!("node-{name}"));
        m.public_ipv4 = Some("203.0.113.7".into());
        m.ports.insert(
            "game".into(),
            Port {
                port,
                proto: Proto::Udp,
            },
        );
        m
    };
    publisher
        .send(&server("mc-0", Status::Init, 7001))
        .await
        .unwrap();
    publisher
        .send(&server("mc-0", Status::Ready, 7001))
        .await
        .unwrap();
    let mut proxied = server("mc-1", Status::Ready, 7002);
    proxied.public_ipv4 = None;
    proxied.game = Some("arena-1".into());
    proxied.tokens = vec!["arena-01".into()];
    proxied.front_address = Some("play.example.com:7777".into());
    publisher.send(&proxied).await.unwrap();
    let mut spot = Message::new("spot:terminate:t", Status::Interrupted);
    spot.node = Some("node-mc-1".into());
    publisher.send(&spot).await.unwrap();
    let state = dir.join("fleet.json");
    let inventory = |state: &Path, extra: &[&str]| {
        let out = Command::new(exe())
            .args(["inventory", "--queue-url", &queue, "--state"])
            .arg(state)
            .args(extra)
            .envs(moto.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // A peek shows the fleet and leaves every message for the queue's consumer.
    let peeked = tokio::task::block_in_place(|| inventory(&dir.join("peek.json"), &["--peek"]));
    assert!(
        peeked.contains("games/mc-0") && peeked.contains("play.example.com:7777"),
        "{peeked}"
    );
    let run = || inventory(&state, &[]);
    // The peeked messages return to the queue a second later; the consumer reads until it
    // has them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    let table = loop {
        let table = tokio::task::block_in_place(run);
        let done = table.contains("interrupted") && table.contains("ready");
        if done || Instant::now() > deadline {
            break table;
        }
    };
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("games/{name}")))
            .unwrap_or_else(|| panic!("{name} missing:\n{table}"))
            .to_string()
    };
    assert!(
        row("mc-0").contains("ready") && row("mc-0").contains("203.0.113.7:7001"),
        "{table}"
    );
    assert!(row("mc-1").contains("interrupted") && row("mc-1").contains("node-mc-1"));
    assert!(
        row("mc-1").contains("arena-1") && row("mc-1").contains("play.example.com:7777"),
        "behind the proxy, the row shows the game and the proxy's address"
    );
    // The queue was consumed; the fleet is remembered.
    assert!(
        receive_all(&sqs, &queue, Duration::from_millis(500))
            .await
            .is_empty()
    );
    let again = tokio::task::block_in_place(run);
    assert!(
        again.contains("games/mc-0") && again.contains("games/mc-1"),
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_comes_from_instance_metadata() {
    let dir = tempdir("imds-ok");
    let imds = spotable_fixtures::imds::FakeImds::start().await.unwrap();
    imds.set_identity(
        "i-0feed",
        "ap-south-1",
        "ec2-198-51-100-4.example",
        "198.51.100.4",
    );
    imds.set_v2_required(true);
    let (moto, sqs, queue) = moto_with_queue("inventory.fifo").await;
    let (a, b) = range(420);
    let env_file = dir.join("ports.env");
    let endpoint = imds.endpoint();
    let queue_url = queue.clone();
    let env = moto.env();
    let lock_dir = dir.join("locks");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(exe())
            .args([
                "init",
                "--env-file",
                env_file.to_str().unwrap(),
                "--port",
                "game/udp",
            ])
            .args([
                "--imds-endpoint",
                &endpoint,
                "--port-range",
                &format!("{a}-{b}"),
            ])
            .args(["--lock-dir", lock_dir.to_str().unwrap()])
            .env("QUEUE_URL", &queue_url)
            .env_remove("SPOTABLE_PUBLIC_IP")
            .env_remove("SPOTABLE_PUBLIC_HOSTNAME")
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = receive_all(&sqs, &queue, Duration::from_millis(800)).await;
    let m = parse(&got[0].body);
    assert_eq!(m.public_ipv4.as_deref(), Some("198.51.100.4"));
    assert_eq!(
        m.public_hostname.as_deref(),
        Some("ec2-198-51-100-4.example")
    );
    assert_eq!(m.instance_id.as_deref(), Some("i-0feed"));
    assert_eq!(m.region.as_deref(), Some("ap-south-1"));
    assert!(imds.token_requests() >= 1, "IMDSv2 was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_proxy_the_inventory_names_game_tokens_and_front_address_and_agones_hears_it_all()
 {
    use spotable_fixtures::agones::FakeAgonesSdk;
    let dir = tempdir("agones");
    let (moto, sqs, queue) = moto_with_queue("inventory.fifo").await;
    let sdk = FakeAgonesSdk::start().await.unwrap();
    // The sidecar starts after the game: ready must be retried until it answers.
    sdk.set_unavailable(true);
    let mut cmd = wrapper_without_address(
        &dir,
        300,
        &[
            "--game",
            "arena-1",
            "--front-address",
            "play.example.com:7777",
            "--agones",
            "--agones-health-interval",
            "100ms",
        ],
        &["python3", "-c", GAME],
    );
    cmd.env("QUEUE_URL", &queue)
        .envs(moto.env())
        .env("SPOTABLE_TOKENS", "arena-01,base64:AAECAwQFBgc=")
        .env("AGONES_SDK_HTTP_PORT", sdk.port().to_string());
    let mut child = cmd.spawn().unwrap();
    let mut got = receive_until(&sqs, &queue, "\"ready\"", Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(10), || sdk.refused() > 0).await,
        "the wrapper asked the sidecar while it was down"
    );
    sdk.set_unavailable(false);
    assert!(
        eventually(Duration::from_secs(10), || {
            let calls = sdk.calls();
            calls.contains(&"/ready".to_string())
                && calls.iter().filter(|c| *c == "/health").count() >= 3
        })
        .await,
        "ready and periodic health: {:?}",
        sdk.calls()
    );
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || wait(&mut child, Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // The wrapper has exited, so no call can follow: shutdown came last, after every
    // health report.
    assert_eq!(sdk.calls().last().map(String::as_str), Some("/shutdown"));

    got.extend(receive_all(&sqs, &queue, Duration::from_millis(1000)).await);
    let messages: Vec<Message> = got.iter().map(|r| parse(&r.body)).collect();
    assert_eq!(messages.len(), 4, "{messages:?}");
    for m in &messages {
        assert_eq!(m.game.as_deref(), Some("arena-1"));
        assert_eq!(m.tokens, ["arena-01", "base64:AAECAwQFBgc="]);
        assert_eq!(m.front_address.as_deref(), Some("play.example.com:7777"));
        assert_eq!(
            (m.public_ipv4.as_deref(), m.public_hostname.as_deref()),
            (None, None),
            "players cannot reach the pod: its address is not advertised"
        );
    }
}

/// Polls `ok` until it holds or `within` passes, without blocking the runtime that serves
/// the fakes.
async fn eventually(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ok()
}
