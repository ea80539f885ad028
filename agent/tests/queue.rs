//! Queue mode end to end: EventBridge events in a real SQS queue (the emulator), the fake
//! Kubernetes API with the real `kube` client, and a stand-in for the lifecycle-hook calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use spotable_agent::drain::{PodOutcome, TAINT_KEY};
use spotable_agent::queue::{Outcome, QueueAgent, QueueConfig};
use spotable_agent::respond::{Policy, Responder};
use spotable_fixtures::aws::{
    FakeAutoscaling, Moto, create_queue, moto_with_queue, receive_all, sqs_client_for,
};
use spotable_fixtures::kube::{Action as ApiAction, FakeApi, running_pod};
use spotable_fleet::inventory::Publisher;
use spotable_fleet::notice::Action;

const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/namespaces/games/pods";

fn node(name: &str, provider: &str) -> Value {
    let n = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(provider.into()),
            taints: Some(vec![Taint {
                key: "karpenter.sh/disrupted".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    serde_json::to_value(n).unwrap()
}

fn pod(name: &str, node: &str) -> Value {
    running_pod("games", name, node, 3, Some("ReplicaSet"))
}

struct World {
    api: FakeApi,
    moto: Moto,
    sqs: aws_sdk_sqs::Client,
    inventory: String,
    interruptions: String,
    asg: FakeAutoscaling,
}

async fn world() -> World {
    let api = tokio::task::spawn_blocking(FakeApi::start)
        .await
        .unwrap()
        .unwrap();
    api.apply(NODES, node("n1", "aws:///us-west-2a/i-0abc"));
    api.apply(NODES, node("n2", "aws:///us-west-2b/i-0def"));
    api.apply(PODS, pod("g-1", "n1"));
    api.apply(PODS, pod("g-2", "n2"));
    let (moto, sqs, inventory) = moto_with_queue("inventory.fifo").await;
    let interruptions = create_queue(&sqs, "interruptions").await;
    let asg = FakeAutoscaling::start().await.unwrap();
    World {
        api,
        moto,
        sqs,
        inventory,
        interruptions,
        asg,
    }
}

fn processor(w: &World, rebalance: Action) -> QueueAgent {
    let client =
        spotable_agent::drain::client(kube::Config::new(w.api.url().parse().unwrap())).unwrap();
    let policy = Policy {
        rebalance,
        drain_timeout: Duration::from_secs(60),
        dry_run: false,
        publish_timeout: Duration::from_secs(2),
    };
    let publisher = Publisher::with_client(w.sqs.clone(), w.inventory.clone());
    let responder = Responder::new(policy, Some(publisher)).with_events(client.clone(), "agent-0");
    let mut config = QueueConfig::new(w.interruptions.clone());
    config.wait = Duration::from_secs(1);
    config.heartbeat_every = Duration::from_millis(300);
    QueueAgent::new(config, w.sqs.clone(), w.asg.client(), client, responder)
}

fn envelope(id: &str, detail_type: &str, source: &str, detail: Value) -> String {
    serde_json::json!({
        "version": "0",
        "id": id,
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "region": "us-west-2",
        "resources": [],
        "detail": detail,
    })
    .to_string()
}

fn spot(id: &str, instance: &str) -> String {
    envelope(
        id,
        "EC2 Spot Instance Interruption Warning",
        "aws.ec2",
        serde_json::json!({"instance-id": instance, "instance-action": "terminate"}),
    )
}

async fn send(w: &World, body: &str) {
    w.sqs
        .send_message()
        .queue_url(&w.interruptions)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

/// Changes to nodes and pods, in order (Events are recorded separately).
fn changes(api: &FakeApi) -> Vec<(String, String)> {
    api.actions()
        .into_iter()
        .filter(|a| a.verb != "CREATE")
        .map(|a| (a.verb, a.path))
        .collect()
}

fn events(api: &FakeApi) -> Vec<ApiAction> {
    api.actions()
        .into_iter()
        .filter(|a| a.verb == "CREATE" && a.path.contains("/events/"))
        .collect()
}

/// Polls `ok` until it holds or `within` has passed.
async fn wait_within(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok()
}

async fn wait_for(ok: impl FnMut() -> bool) -> bool {
    wait_within(Duration::from_secs(5), ok).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_warning_drains_the_instances_node_only() {
    let w = world().await;
    let agent = processor(&w, Action::Cordon);
    send(&w, &spot("e-spot", "i-0abc")).await;
    let outcomes = agent.tick().await.unwrap();
    let [Outcome::Acted(reports)] = &outcomes[..] else {
        panic!("{outcomes:?}");
    };
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].node, "n1");
    assert_eq!(
        reports[0].drained,
        vec![("games/g-1".to_string(), PodOutcome::Evicted)]
    );
    assert_eq!(
        changes(&w.api),
        [
            ("PATCH".to_string(), "/api/v1/nodes/n1".to_string()),
            (
                "EVICT".to_string(),
                "/api/v1/namespaces/games/pods/g-1".to_string()
            ),
        ]
    );
    assert!(w.api.get(PODS, "g-2").is_some(), "n2 untouched");
    let n1 = w.api.get(NODES, "n1").unwrap();
    let taints = n1["spec"]["taints"].as_array().unwrap();
    assert!(taints.iter().any(|t| t["key"] == TAINT_KEY));
    assert!(
        taints.iter().any(|t| t["key"] == "karpenter.sh/disrupted"),
        "another controller's taint is kept"
    );
    // The inventory heard once; the event is gone from the interruption queue.
    let told = receive_all(&w.sqs, &w.inventory, Duration::from_millis(800)).await;
    for m in &told {
        spotable_fixtures::schema::inventory_message(&m.body).unwrap();
    }
    assert_eq!(told.len(), 1);
    assert!(told[0].body.contains("\"node\":\"n1\""), "{}", told[0].body);
    assert!(
        receive_all(&w.sqs, &w.interruptions, Duration::from_millis(500))
            .await
            .is_empty(),
        "the handled message was not deleted"
    );
    // Kubernetes Events, as `kubectl describe node n1` shows them, and one on the pod.
    assert!(
        wait_for(|| events(&w.api).len() >= 3).await,
        "{:?}",
        events(&w.api)
    );
    let reasons: Vec<(String, String)> = events(&w.api)
        .iter()
        .map(|e| {
            (
                e.body["regarding"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e.body["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for want in [
        ("n1", "InterruptionNotice"),
        ("n1", "Cordoned"),
        ("g-1", "Evicted"),
    ] {
        assert!(
            reasons.iter().any(|(o, r)| o == want.0 && r == want.1),
            "{want:?} not in {reasons:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_follows_the_policy() {
    let w = world().await;
    let agent = processor(&w, Action::Cordon);
    let body = envelope(
        "e-rebalance",
        "EC2 Instance Rebalance Recommendation",
        "aws.ec2",
        serde_json::json!({"instance-id": "i-0def"}),
    );
    send(&w, &body).await;
    let outcomes = agent.tick().await.unwrap();
    assert!(matches!(&outcomes[..], [Outcome::Acted(_)]), "{outcomes:?}");
    assert_eq!(
        changes(&w.api),
        [("PATCH".to_string(), "/api/v1/nodes/n2".to_string())],
        "cordoned, not drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifecycle_hook_is_held_while_draining_then_completed() {
    let w = world().await;
    let agent = processor(&w, Action::Cordon);
    let body = envelope(
        "e-asg",
        "EC2 Instance-terminate Lifecycle Action",
        "aws.autoscaling",
        serde_json::json!({
            "LifecycleActionToken": "tok-1",
            "AutoScalingGroupName": "games-spot",
            "LifecycleHookName": "drain",
            "EC2InstanceId": "i-0abc",
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        }),
    );
    send(&w, &body).await;
    let outcomes = agent.tick().await.unwrap();
    assert!(matches!(&outcomes[..], [Outcome::Acted(_)]), "{outcomes:?}");
    let calls = w.asg.calls();
    let actions: Vec<&str> = calls.iter().map(|(_, c)| c["Action"].as_str()).collect();
    assert_eq!(actions.first(), Some(&"RecordLifecycleActionHeartbeat"));
    assert_eq!(actions.last(), Some(&"CompleteLifecycleAction"));
    let (completed_at, complete) = calls.last().unwrap();
    assert_eq!(complete["LifecycleActionResult"], "CONTINUE");
    assert_eq!(complete["LifecycleActionToken"], "tok-1");
    assert_eq!(complete["AutoScalingGroupName"], "games-spot");
    assert_eq!(complete["InstanceId"], "i-0abc");
    let evicted = w
        .api
        .actions()
        .into_iter()
        .find(|a| a.verb == "EVICT")
        .expect("drained");
    assert!(evicted.at <= *completed_at, "completed before the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instances_other_events_and_garbage_are_deleted_without_action() {
    let w = world().await;
    let agent = processor(&w, Action::Drain);
    send(&w, &spot("e-elsewhere", "i-0999")).await;
    send(
        &w,
        &envelope("e-s3", "Object Created", "aws.s3", serde_json::json!({})),
    )
    .await;
    send(&w, "this is not json").await;
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.extend(agent.tick().await.unwrap());
        if outcomes.len() >= 3 {
            break;
        }
    }
    let labels: std::collections::BTreeSet<&str> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::NotOurs => "not_ours",
            Outcome::Other(_) => "other",
            Outcome::Malformed(_) => "malformed",
            _ => "unexpected",
        })
        .collect();
    assert_eq!(
        labels,
        ["malformed", "not_ours", "other"].into_iter().collect()
    );
    assert!(w.api.actions().is_empty(), "{:?}", w.api.actions());
    assert!(
        receive_all(&w.sqs, &w.inventory, Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert!(
        receive_all(&w.sqs, &w.interruptions, Duration::from_millis(500))
            .await
            .is_empty(),
        "all three deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_queue_is_retried_and_work_resumes_when_it_is_back() {
    let mut w = world().await;
    let port = w.moto.port();
    w.moto.stop();
    let agent = processor(&w, Action::Drain);
    assert!(
        agent.tick().await.is_err(),
        "a dead queue is an error, not a crash"
    );
    let running = tokio::spawn(agent.clone().run());
    // The emulator comes back (empty: the queues are created again, with the same URLs).
    let moto = tokio::task::spawn_blocking(move || Moto::start(Some(port)))
        .await
        .unwrap()
        .unwrap();
    let sqs = sqs_client_for(&moto.endpoint());
    assert_eq!(create_queue(&sqs, "inventory.fifo").await, w.inventory);
    assert_eq!(create_queue(&sqs, "interruptions").await, w.interruptions);
    w.moto = moto;
    w.sqs = sqs;
    send(&w, &spot("e-after", "i-0abc")).await;
    // The processor's backoff is capped at 30 s.
    let drained = wait_within(Duration::from_secs(45), || w.api.get(PODS, "g-1").is_none()).await;
    assert!(drained, "the event after the outage was not acted on");
    assert!(!running.is_finished(), "the processor stopped");
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handled_notice_is_posted_to_the_webhook() {
    let w = world().await;
    let posted: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let sink = posted.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).unwrap());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client =
        spotable_agent::drain::client(kube::Config::new(w.api.url().parse().unwrap())).unwrap();
    let policy = Policy {
        rebalance: Action::Cordon,
        drain_timeout: Duration::from_secs(60),
        dry_run: false,
        publish_timeout: Duration::from_secs(2),
    };
    let webhook = spotable_agent::respond::Webhook::new(url, Duration::from_secs(2)).unwrap();
    let responder = Responder::new(policy, None).with_webhook(webhook);
    let mut config = QueueConfig::new(w.interruptions.clone());
    config.wait = Duration::from_secs(1);
    let agent = QueueAgent::new(config, w.sqs.clone(), w.asg.client(), client, responder);
    send(&w, &spot("e-hook", "i-0abc")).await;
    agent.tick().await.unwrap();
    assert!(
        wait_for(|| !posted.lock().unwrap().is_empty()).await,
        "nothing posted"
    );
    let summary = posted.lock().unwrap()[0].clone();
    assert_eq!(summary["node"], "n1");
    assert_eq!(summary["kind"], "spot");
    assert_eq!(summary["source"], "queue");
    assert_eq!(summary["event_id"], "spot:i-0abc:e-hook");
    assert_eq!(
        summary["pods"],
        serde_json::json!([{"pod": "games/g-1", "outcome": "evicted"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_api_outage_kept_from_acting_on_stays_in_the_queue() {
    let w = world().await;
    let client =
        spotable_agent::drain::client(kube::Config::new(w.api.url().parse().unwrap())).unwrap();
    let policy = Policy {
        rebalance: Action::Cordon,
        drain_timeout: Duration::from_secs(1),
        dry_run: false,
        publish_timeout: Duration::from_secs(1),
    };
    let mut config = QueueConfig::new(w.interruptions.clone());
    config.wait = Duration::from_secs(1);
    config.visibility = Duration::from_secs(1);
    let agent = QueueAgent::new(
        config,
        w.sqs.clone(),
        w.asg.client(),
        client,
        Responder::new(policy, None),
    );
    // The nodes cannot be listed before the step's deadline: not acted on, not deleted.
    w.api.stop();
    send(&w, &spot("e-later", "i-0abc")).await;
    let outcomes = agent.tick().await.unwrap();
    assert!(
        matches!(&outcomes[..], [Outcome::Failed(_)]),
        "{outcomes:?}"
    );
    // Redelivered once the API is back, and then acted on (not taken for a duplicate).
    tokio::task::block_in_place(|| w.api.restart().unwrap());
    let mut acted = false;
    for _ in 0..10 {
        let outcomes = agent.tick().await.unwrap();
        assert!(!outcomes.iter().any(|o| matches!(o, Outcome::Duplicate)));
        if outcomes.iter().any(|o| matches!(o, Outcome::Acted(_))) {
            acted = true;
            break;
        }
    }
    assert!(acted, "the redelivered event was not acted on");
    assert!(w.api.get(PODS, "g-1").is_none());
}
