//! Answering one notice, wherever it came from (instance metadata or the interruption queue):
//! tell the inventory, cordon and taint the node, drain it, each step pursued until it is done
//! or the deadline has passed; record Kubernetes Events on the node and its pods, and post a
//! summary to the webhook. Events and the webhook never hold up the drain.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use metrics::{counter, histogram};
use serde::Serialize;

use crate::drain::{Drainer, PodOutcome};
use crate::metrics::names;
use spotable_fleet::imds::Identity;
use spotable_fleet::inventory::{Message, Publisher, Status};
use spotable_fleet::notice::{self, Action, Notice};

/// Where a notice came from; labels `spotable_agent_notices_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Polled from the node's instance metadata.
    Imds,
    /// Read from the EventBridge interruption queue.
    Queue,
}

impl Source {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Imds => "imds",
            Source::Queue => "queue",
        }
    }
}

/// How notices are answered.
#[derive(Debug, Clone)]
pub struct Policy {
    /// What a rebalance recommendation leads to.
    pub rebalance: Action,
    /// Longest a drain may take when the notice has no deadline of its own.
    pub drain_timeout: Duration,
    /// Log what would be done; change nothing, send nothing.
    pub dry_run: bool,
    /// How long the first send to the inventory may hold up the drain.
    pub publish_timeout: Duration,
}

/// How the inventory heard of a notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Published {
    /// Sent before the drain started.
    Sent,
    /// Still being retried in the background (the drain did not wait).
    Retrying,
    /// No queue configured.
    NoQueue,
    /// Dry run.
    DryRun,
}

/// What handling one notice did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The notice.
    pub notice: Notice,
    /// The node it concerned.
    pub node: String,
    /// Inventory message.
    pub published: Published,
    /// What the policy said.
    pub action: Action,
    /// Cordon result (`None` when not asked).
    pub cordoned: Option<Result<(), String>>,
    /// Pods and what became of them.
    pub drained: Vec<(String, PodOutcome)>,
}

/// Posts a JSON summary of every handled notice (Slack, PagerDuty, a ticket system).
#[derive(Debug, Clone)]
pub struct Webhook {
    url: String,
    http: reqwest::Client,
}

impl Webhook {
    /// A webhook at `url`; each post gives up after `timeout`.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        spotable_fleet::ensure_crypto_provider();
        Ok(Self {
            url: url.into(),
            http: reqwest::Client::builder().timeout(timeout).build()?,
        })
    }

    async fn post(&self, body: String) {
        let sent = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        count("webhook", sent.is_ok());
        if let Err(e) = sent {
            tracing::warn!(error = %e, "webhook post failed");
        }
    }
}

#[derive(Serialize)]
struct Summary<'a> {
    event_id: &'a str,
    kind: &'a str,
    source: &'a str,
    node: &'a str,
    reason: &'a str,
    deadline: Option<String>,
    action: &'a str,
    published: &'a Published,
    cordoned: Option<&'a Result<(), String>>,
    pods: Vec<PodSummary<'a>>,
    seconds: f64,
}

#[derive(Serialize)]
struct PodSummary<'a> {
    pod: &'a str,
    outcome: &'a str,
}

/// Answers notices.
#[derive(Clone)]
pub struct Responder {
    policy: Policy,
    publisher: Option<Publisher>,
    recorder: Option<Recorder>,
    webhook: Option<Webhook>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("policy", &self.policy)
            .field("publisher", &self.publisher)
            .field("events", &self.recorder.is_some())
            .field("webhook", &self.webhook)
            .finish()
    }
}

impl Responder {
    /// A responder; `publisher` is `None` when no inventory queue is configured.
    pub fn new(policy: Policy, publisher: Option<Publisher>) -> Self {
        Self {
            policy,
            publisher,
            recorder: None,
            webhook: None,
        }
    }

    /// Records Kubernetes Events through `client`, as `reporter` (the agent's pod name).
    pub fn with_events(mut self, client: kube::Client, reporter: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "spotable-agent".into(),
            instance: Some(reporter.into()),
        };
        self.recorder = Some(Recorder::new(client, reporter));
        self
    }

    /// Posts a summary of each handled notice to `webhook`.
    pub fn with_webhook(mut self, webhook: Webhook) -> Self {
        self.webhook = Some(webhook);
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Handles one notice for `drainer`'s node: inventory first, then cordon, then drain.
    pub async fn respond(
        &self,
        notice: Notice,
        source: Source,
        drainer: &Drainer,
        identity: Option<&Identity>,
    ) -> Report {
        let started = Instant::now();
        let node = drainer.node().to_string();
        counter!(names::NOTICES, "kind" => notice.kind.as_str(), "source" => source.as_str())
            .increment(1);
        tracing::warn!(
            id = notice.id,
            node,
            source = source.as_str(),
            reason = notice.reason,
            "interruption notice"
        );
        let now = SystemTime::now();
        let deadline = notice
            .deadline
            .unwrap_or(now + self.policy.drain_timeout)
            .min(now + self.policy.drain_timeout);
        let action = notice::action_for(notice.kind, self.policy.rebalance);
        let until = humantime::format_rfc3339_seconds(deadline);
        self.record(
            node_ref(&node),
            EventType::Warning,
            "InterruptionNotice",
            format!(
                "{} ({}); acting until {until}",
                notice.reason,
                action.as_str()
            ),
        );
        let published = self.publish(&notice, &node, identity, deadline).await;

        let cordoned = if action >= Action::Cordon {
            let reason = &notice.reason;
            let r = until_deadline("cordon", deadline, || drainer.cordon(reason)).await;
            count("cordon", r.is_ok());
            match &r {
                Ok(()) => self.record(
                    node_ref(&node),
                    EventType::Normal,
                    "Cordoned",
                    format!("unschedulable and tainted {}", crate::drain::TAINT_KEY),
                ),
                Err(e) => {
                    tracing::error!(error = e, "cordon not done by the deadline");
                    self.record(
                        node_ref(&node),
                        EventType::Warning,
                        "DeadlineReached",
                        format!("cordon not done: {e}"),
                    );
                }
            }
            Some(r)
        } else {
            None
        };
        let drained = if action == Action::Drain {
            match until_deadline("drain", deadline, || drainer.drain(deadline)).await {
                Ok(pods) => {
                    count("drain", true);
                    for (pod, outcome) in &pods {
                        counter!(names::ACTIONS, "action" => "evict", "result" => outcome.as_str())
                            .increment(1);
                        self.record_pod(pod, outcome);
                    }
                    histogram!(names::DRAIN_SECONDS).record(started.elapsed().as_secs_f64());
                    pods
                }
                Err(e) => {
                    count("drain", false);
                    tracing::error!(error = %e, "the node's pods could not be listed by the deadline");
                    self.record(
                        node_ref(&node),
                        EventType::Warning,
                        "DeadlineReached",
                        format!("drain not done: {e}"),
                    );
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let report = Report {
            notice,
            node,
            published,
            action,
            cordoned,
            drained,
        };
        tracing::info!(
            id = report.notice.id,
            node = report.node,
            published = ?report.published,
            action = ?report.action,
            cordoned = ?report.cordoned,
            pods = report.drained.len(),
            "notice handled"
        );
        self.post_summary(&report, source, deadline, started.elapsed());
        report
    }

    async fn publish(
        &self,
        notice: &Notice,
        node: &str,
        identity: Option<&Identity>,
        deadline: SystemTime,
    ) -> Published {
        if self.policy.dry_run {
            tracing::info!(id = notice.id, "dry run: would publish interrupted");
            return Published::DryRun;
        }
        let Some(publisher) = self.publisher.clone() else {
            return Published::NoQueue;
        };
        let mut message = Message::new(notice.id.clone(), Status::Interrupted);
        message.reason = Some(notice.reason.clone());
        message.node = Some(node.to_string());
        message.deadline = notice
            .deadline
            .map(|d| humantime::format_rfc3339_seconds(d).to_string());
        if let Some(id) = identity {
            message.instance_id = id.instance_id.clone();
            message.region = id.region.clone();
            message.public_hostname = id.public_hostname.clone();
            message.public_ipv4 = id.public_ipv4.clone();
        }
        match publisher
            .send_with_retry(&message, self.policy.publish_timeout)
            .await
        {
            Ok(_) => {
                count("publish", true);
                Published::Sent
            }
            Err(e) => {
                // Never hold up the drain: keep trying in the background until the deadline.
                tracing::warn!(error = %e, "inventory unreachable; draining anyway, retrying in background");
                let left = deadline
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::spawn(async move {
                    let ok = publisher.send_with_retry(&message, left).await.is_ok();
                    count("publish", ok);
                });
                Published::Retrying
            }
        }
    }

    fn record_pod(&self, pod: &str, outcome: &PodOutcome) {
        let (kind, reason, note) = match outcome {
            PodOutcome::Evicted => (
                EventType::Normal,
                "Evicted",
                "evicted: the node is being reclaimed".to_string(),
            ),
            PodOutcome::Deleted { grace_seconds } => (
                EventType::Warning,
                "DeletedWithGrace",
                format!("eviction refused until the deadline; deleted with {grace_seconds}s grace"),
            ),
            PodOutcome::Failed(e) => (
                EventType::Warning,
                "DeadlineReached",
                format!("not moved: {e}"),
            ),
            PodOutcome::Gone | PodOutcome::WouldEvict => return,
        };
        if let Some((ns, name)) = pod.split_once('/') {
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..ObjectReference::default()
            };
            self.record(reference, kind, reason, note);
        }
    }

    /// Records an Event in the background (never in dry run).
    fn record(&self, on: ObjectReference, kind: EventType, reason: &str, note: String) {
        let Some(recorder) = self.recorder.clone().filter(|_| !self.policy.dry_run) else {
            return;
        };
        let event = KubeEvent {
            type_: kind,
            reason: reason.into(),
            note: Some(note),
            action: "Drain".into(),
            secondary: None,
        };
        tokio::spawn(async move {
            let ok = recorder.publish(&event, &on).await;
            count("event", ok.is_ok());
            if let Err(e) = ok {
                tracing::debug!(error = %e, "cannot record a Kubernetes Event");
            }
        });
    }

    fn post_summary(&self, r: &Report, source: Source, deadline: SystemTime, took: Duration) {
        let Some(webhook) = self.webhook.clone() else {
            return;
        };
        let summary = Summary {
            event_id: &r.notice.id,
            kind: r.notice.kind.as_str(),
            source: source.as_str(),
            node: &r.node,
            reason: &r.notice.reason,
            deadline: Some(humantime::format_rfc3339_seconds(deadline).to_string()),
            action: r.action.as_str(),
            published: &r.published,
            cordoned: r.cordoned.as_ref(),
            pods: r
                .drained
                .iter()
                .map(|(pod, o)| PodSummary {
                    pod,
                    outcome: o.as_str(),
                })
                .collect(),
            seconds: took.as_secs_f64(),
        };
        match serde_json::to_string(&summary) {
            Ok(body) => {
                tokio::spawn(async move { webhook.post(body).await });
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the webhook summary"),
        }
    }
}

fn node_ref(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.into()),
        ..ObjectReference::default()
    }
}

/// Runs `step` until it succeeds or `deadline` passes, pausing between attempts on a jittered,
/// capped exponential backoff (never past the deadline). The last error when time ran out.
pub async fn until_deadline<T, E, F, Fut>(
    action: &'static str,
    deadline: SystemTime,
    mut step: F,
) -> Result<T, String>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pauses =
        spotable_fleet::backoff::pauses(Duration::from_millis(200), Duration::from_secs(5));
    let mut attempt = 0u32;
    loop {
        let e = match step().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        attempt += 1;
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if left.is_zero() {
            return Err(e.to_string());
        }
        counter!(names::RETRIES, "action" => action).increment(1);
        let pause = pauses.next().unwrap_or(Duration::from_secs(5)).min(left);
        tracing::warn!(action, attempt, error = %e, retry_in = ?pause, "failed; retrying until the deadline");
        tokio::time::sleep(pause).await;
    }
}

/// Counts one action's result.
pub fn count(action: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(names::ACTIONS, "action" => action, "result" => result).increment(1);
}
