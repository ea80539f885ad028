//! The agent end to end: fake IMDS, the SQS emulator, the fake Kubernetes API with the real
//! `kube` client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use spotable_agent::agent::{Agent, AgentConfig, Published};
use spotable_agent::drain::{Drainer, PodOutcome, TAINT_KEY};
use spotable_agent::respond::Policy;
use spotable_fixtures::aws::{Moto, create_queue, moto_with_queue, receive_all};
use spotable_fixtures::imds::FakeImds;
use spotable_fixtures::kube::{FakeApi, running_pod as pod};
use spotable_fleet::imds::{Imds, ImdsConfig};
use spotable_fleet::inventory::{Message, Publisher, Status};
use spotable_fleet::notice::Action;

const NODE: &str = "ip-10-0-1-23";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/namespaces/games/pods";
const SYSTEM_PODS: &str = "/api/v1/namespaces/kube-system/pods";
const SPOT: &str = "meta-data/spot/instance-action";

fn node() -> Value {
    let n = Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            labels: Some([("lifecycle".to_string(), "spot".to_string())].into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                key: "dedicated".into(),
                value: Some("games".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }]),
            ..Default::default()
        }),
        status: None,
    };
    serde_json::to_value(n).unwrap()
}

struct World {
    imds: FakeImds,
    api: FakeApi,
    moto: Moto,
    queue: String,
    sqs: aws_sdk_sqs::Client,
}

async fn world() -> World {
    let imds = FakeImds::start().await.unwrap();
    imds.set_identity("i-0abc", "eu-west-1", "ec2-1-2-3-4.example", "1.2.3.4");
    let api = tokio::task::spawn_blocking(FakeApi::start)
        .await
        .unwrap()
        .unwrap();
    api.apply(NODES, node());
    api.apply(PODS, pod("games", "mc-0", NODE, 3, Some("ReplicaSet")));
    api.apply(
        PODS,
        pod("games", "mc-elsewhere", "other-node", 3, Some("ReplicaSet")),
    );
    api.apply(
        SYSTEM_PODS,
        pod("kube-system", "agent-x", NODE, 3, Some("DaemonSet")),
    );
    let (moto, sqs, queue) = moto_with_queue("inventory.fifo").await;
    World {
        imds,
        api,
        moto,
        queue,
        sqs,
    }
}

fn agent(w: &World, dry_run: bool, rebalance: Action) -> Agent {
    let imds = Imds::new(ImdsConfig {
        endpoint: w.imds.endpoint(),
        timeout: Duration::from_millis(500),
        ..ImdsConfig::default()
    })
    .unwrap();
    let client =
        spotable_agent::drain::client(kube::Config::new(w.api.url().parse().unwrap())).unwrap();
    Agent::new(
        AgentConfig {
            node: NODE.into(),
            policy: Policy {
                rebalance,
                drain_timeout: Duration::from_secs(110),
                dry_run,
                publish_timeout: Duration::from_secs(2),
            },
            maintenance_lead: Duration::from_secs(600),
        },
        imds,
        Some(Publisher::with_client(w.sqs.clone(), w.queue.clone())),
        Drainer::new(client, NODE, dry_run),
    )
}

fn in_secs(s: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(s)).to_string()
}

/// Another controller (Karpenter, NTH) taints the node between the agent's read of its taints
/// and the agent's patch: the patch is refused as stale (409), the agent reads again, and the
/// node ends with both taints, the other controller's and ours, beside the one it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taint_added_between_the_cordons_read_and_patch_is_kept() {
    let w = world().await;
    let mut agent = agent(&w, false, Action::Cordon);
    let theirs = serde_json::json!({"key": "karpenter.sh/disrupted", "effect": "NoSchedule"});
    let node_before = w.api.get(NODES, NODE).unwrap();
    let mut taints = node_before["spec"]["taints"].as_array().unwrap().clone();
    taints.push(theirs.clone());
    w.api
        .write_after_next_get(NODES, NODE, serde_json::json!({"spec": {"taints": taints}}));
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{}"}}"#, in_secs(120)),
    );
    let reports = agent.tick().await;
    assert_eq!(reports.len(), 1);
    assert!(reports[0].cordoned.as_ref().is_some_and(|r| r.is_ok()));

    let verbs: Vec<_> = w
        .api
        .actions()
        .into_iter()
        .filter(|a| a.path.starts_with(NODES))
        .map(|a| a.verb)
        .collect();
    assert_eq!(
        verbs,
        ["PATCH-409", "PATCH"],
        "the stale patch refused, then retried"
    );
    let node = w.api.get(NODES, NODE).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
    let keys: Vec<&str> = node["spec"]["taints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    for key in ["dedicated", "karpenter.sh/disrupted", TAINT_KEY] {
        assert!(keys.contains(&key), "{key} lost: {keys:?}");
    }
    assert_eq!(keys.len(), 3, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_publishes_then_cordons_then_evicts() {
    let w = world().await;
    let mut agent = agent(&w, false, Action::Cordon);
    assert!(agent.tick().await.is_empty(), "no notice yet");
    let time = in_secs(120);
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{time}"}}"#),
    );
    let reports = agent.tick().await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].published, Published::Sent);
    assert_eq!(
        reports[0].drained,
        vec![("games/mc-0".to_string(), PodOutcome::Evicted)]
    );

    // One message with the documented keys, read back from the emulator.
    let got = receive_all(&w.sqs, &w.queue, Duration::from_millis(800)).await;
    assert_eq!(got.len(), 1);
    let raw: Value = spotable_fixtures::schema::inventory_message(&got[0].body).unwrap();
    for key in spotable_fleet::inventory::KEYS {
        assert!(raw.get(key).is_some(), "{key} missing");
    }
    let m: Message = serde_json::from_value(raw).unwrap();
    assert_eq!(m.status, Status::Interrupted);
    assert_eq!(m.event_id, format!("spot:terminate:{time}"));
    assert_eq!(m.node.as_deref(), Some(NODE));
    assert_eq!(m.instance_id.as_deref(), Some("i-0abc"));
    assert_eq!(m.deadline.as_deref(), Some(time.as_str()));
    assert_eq!(got[0].dedup_id.as_deref(), Some(m.event_id.as_str()));

    // Then the cordon and taint, then the eviction, and nothing else.
    let actions = w.api.actions();
    let verbs: Vec<_> = actions
        .iter()
        .map(|a| (a.verb.as_str(), a.path.as_str()))
        .collect();
    assert_eq!(
        verbs,
        vec![
            ("PATCH", "/api/v1/nodes/ip-10-0-1-23"),
            ("EVICT", "/api/v1/namespaces/games/pods/mc-0"),
        ]
    );
    let sent = got[0].sent_at.unwrap();
    assert!(sent <= actions[0].at, "inventory told before the cordon");
    let node = w.api.get(NODES, NODE).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
    let taints = node["spec"]["taints"].as_array().unwrap();
    assert!(
        taints
            .iter()
            .any(|t| t["key"] == TAINT_KEY && t["effect"] == "NoSchedule")
    );
    assert!(
        taints.iter().any(|t| t["key"] == "dedicated"),
        "other taints kept"
    );
    assert!(w.api.get(PODS, "mc-elsewhere").is_some());
    assert!(
        w.api.get(SYSTEM_PODS, "agent-x").is_some(),
        "DaemonSet pods stay"
    );

    // The same notice, polled again, is not handled again.
    assert!(agent.tick().await.is_empty());
    assert_eq!(w.api.actions().len(), 2);
    assert!(
        receive_all(&w.sqs, &w.queue, Duration::from_millis(500))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_at_the_notice_delays_the_drain_but_does_not_cancel_it() {
    let w = world().await;
    let mut agent = agent(&w, false, Action::Cordon);
    // The API server is unreachable when the notice arrives and comes back 8 s later.
    w.api.stop();
    let time = in_secs(120);
    let deadline = humantime::parse_rfc3339(&time).unwrap();
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{time}"}}"#),
    );
    let (reports, ()) = tokio::join!(agent.tick(), async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        tokio::task::block_in_place(|| w.api.restart().unwrap());
    });
    assert_eq!(reports.len(), 1);
    assert_eq!(
        reports[0].cordoned,
        Some(Ok(())),
        "cordoned once the API was back"
    );
    assert_eq!(
        reports[0].drained,
        vec![("games/mc-0".to_string(), PodOutcome::Evicted)]
    );
    // In order, before the deadline, and the inventory told exactly once.
    let actions = w.api.actions();
    let verbs: Vec<_> = actions.iter().map(|a| a.verb.as_str()).collect();
    assert_eq!(verbs, ["PATCH", "EVICT"]);
    assert!(actions.iter().all(|a| a.at < deadline));
    assert_eq!(
        w.api.get(NODES, NODE).unwrap()["spec"]["unschedulable"],
        true
    );
    let got = receive_all(&w.sqs, &w.queue, Duration::from_millis(800)).await;
    for m in &got {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(got.len(), 1, "one inventory message");
    assert!(got[0].sent_at.unwrap() <= actions[0].at);
    // Handled: the next poll does nothing more.
    assert!(agent.tick().await.is_empty());
    assert_eq!(w.api.actions().len(), 2);
}

/// SIGKILLs a process when dropped (a test that panics must not leave it running).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// Log lines written on this thread, for tests on a current-thread runtime.
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn containing(&self, needle: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        text.lines().filter(|l| l.contains(needle)).count()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_malformed_notice_is_logged_once_and_never_acted_on() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let w = world().await;
    let mut agent = agent(&w, false, Action::Cordon);
    w.imds
        .set(SPOT, r#"{"action": "terminate", "time": "soon"}"#);
    for _ in 0..3 {
        assert!(agent.tick().await.is_empty(), "a malformed notice acted on");
    }
    assert_eq!(lines.containing("malformed interruption notice ignored"), 1);
    assert!(w.api.actions().is_empty());
    // The real notice that follows is handled, once.
    let time = in_secs(120);
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{time}"}}"#),
    );
    assert_eq!(agent.tick().await.len(), 1);
    assert!(agent.tick().await.is_empty());
    let verbs: Vec<_> = w.api.actions().into_iter().map(|a| a.verb).collect();
    assert_eq!(verbs, ["PATCH", "EVICT"]);
    let got = receive_all(&w.sqs, &w.queue, Duration::from_millis(800)).await;
    for m in &got {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(got.len(), 1, "one interrupted message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disruption_budget_near_the_deadline_falls_back_to_delete_with_grace() {
    let w = world().await;
    w.api.protect(PODS, "mc-0", true);
    let mut agent = agent(&w, false, Action::Cordon);
    // 11 s left, 3 s grace: evictions are retried until 8 s remain, then a delete.
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{}"}}"#, in_secs(11)),
    );
    let reports = agent.tick().await;
    assert!(
        matches!(
            reports[0].drained[0].1,
            PodOutcome::Deleted { grace_seconds: 3 }
        ),
        "{:?}",
        reports[0].drained
    );
    let verbs: Vec<_> = w.api.actions().into_iter().map(|a| a.verb).collect();
    assert!(
        verbs.iter().filter(|v| *v == "EVICT-429").count() >= 2,
        "{verbs:?}"
    );
    assert_eq!(verbs.last().map(String::as_str), Some("DELETE"));
    let delete = w.api.actions().pop().unwrap();
    assert_eq!(delete.body["gracePeriodSeconds"], 3);
    assert!(w.api.get(PODS, "mc-0").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_down_does_not_block_the_drain_and_the_message_follows() {
    let mut w = world().await;
    let port = w.moto.port();
    w.moto.stop();
    let mut agent = agent(&w, false, Action::Cordon);
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{}"}}"#, in_secs(120)),
    );
    let reports = agent.tick().await;
    assert_eq!(reports[0].published, Published::Retrying);
    assert_eq!(
        reports[0].drained[0].1,
        PodOutcome::Evicted,
        "drained despite SQS"
    );
    // SQS comes back (empty, as moto keeps no state): the retried message arrives.
    let _moto = tokio::task::spawn_blocking(move || Moto::start(Some(port)))
        .await
        .unwrap()
        .unwrap();
    create_queue(&w.sqs, "inventory.fifo").await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.extend(receive_all(&w.sqs, &w.queue, Duration::from_millis(500)).await);
        if !got.is_empty() {
            break;
        }
    }
    for m in &got {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_changes_nothing() {
    let w = world().await;
    let mut agent = agent(&w, true, Action::Drain);
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{}"}}"#, in_secs(120)),
    );
    let reports = agent.tick().await;
    assert_eq!(reports[0].published, Published::DryRun);
    assert_eq!(
        reports[0].drained,
        vec![("games/mc-0".to_string(), PodOutcome::WouldEvict)]
    );
    assert!(w.api.actions().is_empty(), "{:?}", w.api.actions());
    assert_eq!(
        w.api.get(NODES, NODE).unwrap()["spec"]["unschedulable"],
        Value::Null
    );
    assert!(
        receive_all(&w.sqs, &w.queue, Duration::from_millis(500))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_follows_the_policy_and_imds_outages_are_survived() {
    let w = world().await;
    let mut cordon_only = agent(&w, false, Action::Cordon);
    w.imds.set(
        "meta-data/events/recommendations/rebalance",
        r#"{"noticeTime": "2026-11-24T08:20:00Z"}"#,
    );
    let reports = cordon_only.tick().await;
    assert_eq!(reports[0].action, Action::Cordon);
    assert!(reports[0].drained.is_empty());
    let verbs: Vec<_> = w.api.actions().into_iter().map(|a| a.verb).collect();
    assert_eq!(verbs, vec!["PATCH"]);

    // Metadata errors: no crash, no notice, and the agent recovers.
    w.imds.fail_next(20);
    assert!(cordon_only.tick().await.is_empty());
    w.imds.fail_next(0);
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "stop", "time": "{}"}}"#, in_secs(120)),
    );
    let reports = cordon_only.tick().await;
    assert_eq!(reports.len(), 1, "the spot notice after the outage");
}

fn agent_exe() -> &'static str {
    env!("CARGO_BIN_EXE_spotable-agent")
}

#[test]
fn binary_flags_and_usage_errors() {
    let out = std::process::Command::new(agent_exe())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--node-name",
        "--imds-endpoint",
        "--queue-url",
        "--poll-interval",
        "--rebalance",
        "--drain-timeout",
        "--dry-run",
        "--admin",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    for (args, expected) in [
        (vec![], "--node-name"),
        (
            vec!["--node-name", "n", "--rebalance", "nuke"],
            "--rebalance",
        ),
        (
            vec!["--node-name", "n", "--poll-interval", "0s"],
            "--poll-interval",
        ),
        (
            vec!["--node-name", "n", "--imds-endpoint", "169.254.169.254"],
            "--imds-endpoint",
        ),
    ] {
        let out = std::process::Command::new(agent_exe())
            .args(&args)
            .env_remove("NODE_NAME")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_handles_a_spot_notice_end_to_end() {
    let w = world().await;
    let dir = std::env::temp_dir().join(format!("spotable-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = w.api.write_kubeconfig(&dir, "default").unwrap();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    spotable_fleet::ensure_crypto_provider();
    // Metadata is failing when the agent starts: it must survive, count and carry on.
    w.imds.fail_next(12);
    let mut child = std::process::Command::new(agent_exe())
        .args([
            "--imds-endpoint",
            &w.imds.endpoint(),
            "--queue-url",
            &w.queue,
            "--poll-interval",
            "200ms",
            "--admin",
            &format!("127.0.0.1:{admin_port}"),
            "--log-format",
            "json",
        ])
        .env("NODE_NAME", NODE)
        .env("KUBECONFIG", &kubeconfig)
        .envs(w.moto.env())
        .env_remove("RUST_LOG")
        .spawn()
        .unwrap();
    // Killed however the test ends: a stray agent would keep the test's output open.
    let guard = KillOnDrop(child.id());
    let mut early = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics")).await {
            early = r.text().await.unwrap_or_default();
            if early.contains("spotable_agent_imds_errors_total") {
                break;
            }
        }
    }
    assert!(
        early.contains("spotable_agent_imds_errors_total"),
        "{early}"
    );
    // Before any notice, every series is there (at zero) and has its HELP.
    for series in [
        "spotable_agent_notices_total{kind=\"spot\",source=\"imds\"} 0",
        "spotable_agent_queue_messages_total{outcome=\"acted\"} 0",
        "spotable_agent_actions_total{action=\"cordon\",result=\"ok\"} 0",
        "spotable_agent_malformed_notices_total{kind=\"spot\"} 0",
        "spotable_agent_retries_total{action=\"drain\"} 0",
    ] {
        assert!(early.contains(series), "{series} missing:\n{early}");
    }
    for name in [
        "spotable_agent_notices_total",
        "spotable_agent_actions_total",
        "spotable_agent_imds_errors_total",
        "spotable_agent_malformed_notices_total",
        "spotable_agent_retries_total",
        "spotable_agent_queue_messages_total",
        "spotable_agent_drain_seconds",
    ] {
        assert!(
            early.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    let undocumented = spotable_fixtures::metrics_text::without_help(&early);
    assert!(
        undocumented.is_empty(),
        "series without HELP: {undocumented:?}"
    );
    assert!(
        early.contains("spotable_build_info{program=\"spotable-agent\""),
        "{early}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent died on metadata errors"
    );
    w.imds.set(
        SPOT,
        &format!(r#"{{"action": "terminate", "time": "{}"}}"#, in_secs(120)),
    );
    // Changes to the node and pods, in order; Kubernetes Events are recorded beside them.
    let changes = |api: &FakeApi| -> Vec<String> {
        api.actions()
            .into_iter()
            .filter(|a| a.verb != "CREATE")
            .map(|a| a.verb)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while changes(&w.api).len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(changes(&w.api), vec!["PATCH", "EVICT"]);
    let events = |api: &FakeApi| -> Vec<String> {
        api.actions()
            .into_iter()
            .filter(|a| a.verb == "CREATE" && a.path.contains("/events/"))
            .map(|a| a.body["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    while events(&w.api).len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reasons = events(&w.api);
    for want in ["InterruptionNotice", "Cordoned", "Evicted"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "{want} not in {reasons:?}"
        );
    }
    let got = receive_all(&w.sqs, &w.queue, Duration::from_millis(800)).await;
    for m in &got {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(got.len(), 1);
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("spotable_agent_notices_total{kind=\"spot\",source=\"imds\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spotable_agent_drain_seconds_bucket{le=\"120\"} 1"),
        "time to drained is a histogram: {metrics}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{admin_port}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // SIGTERM: a clean exit.
    let pid = i32::try_from(child.id()).unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    std::mem::forget(guard);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
