//! Queue mode: one agent for the whole cluster reads the EventBridge interruption queue (the
//! queue aws-node-termination-handler's queue processor and Karpenter read), finds the node of
//! each event's instance by `spec.providerID`, and answers it as the IMDS mode does: inventory,
//! cordon, drain. A message is deleted only once it has been acted on, or when it concerns no
//! node of this cluster. An Auto Scaling lifecycle hook holds its instance until the drain is
//! done: heartbeats while draining, then `CompleteLifecycleAction` with `CONTINUE`.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::types::Message as SqsMessage;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use metrics::counter;

use crate::drain::Drainer;
use crate::metrics::names;
use crate::respond::{self, Report, Responder, Source, until_deadline};
use spotable_fleet::eventbridge::{self, Event, Parsed, SPOT_WARNING};
use spotable_fleet::imds::Identity;
use spotable_fleet::notice::{Kind, Notice};

/// Event ids remembered after they were handled, so a redelivered message is not acted on
/// twice (a delete that failed, a visibility timeout that ran out).
const REMEMBERED: usize = 1024;

/// Queue-mode settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The interruption queue.
    pub queue_url: String,
    /// Long-poll wait per receive (at most 20 s).
    pub wait: Duration,
    /// How long a received message stays invisible: longer than any drain.
    pub visibility: Duration,
    /// Lifecycle-hook heartbeat period while draining.
    pub heartbeat_every: Duration,
}

impl QueueConfig {
    /// Defaults for `queue_url`.
    pub fn new(queue_url: impl Into<String>) -> Self {
        Self {
            queue_url: queue_url.into(),
            wait: Duration::from_secs(20),
            visibility: Duration::from_secs(300),
            heartbeat_every: Duration::from_secs(30),
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acted on for these nodes; deleted.
    Acted(Vec<Report>),
    /// Its instances are no nodes of this cluster; deleted.
    NotOurs,
    /// Not an interruption (another event type, a test notification); deleted.
    Other(String),
    /// Not a readable event; deleted.
    Malformed(String),
    /// Already handled or being handled; deleted (or left to the handler under way).
    Duplicate,
    /// Could not be acted on (the API stayed unreachable): left in the queue, to be
    /// redelivered after its visibility timeout.
    Failed(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Acted(_) => "acted",
            Outcome::NotOurs => "not_ours",
            Outcome::Other(_) => "other",
            Outcome::Malformed(_) => "malformed",
            Outcome::Duplicate => "duplicate",
            Outcome::Failed(_) => "failed",
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    in_flight: HashSet<String>,
    done: VecDeque<String>,
}

/// The queue processor.
#[derive(Clone)]
pub struct QueueAgent {
    config: QueueConfig,
    sqs: aws_sdk_sqs::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    kube: kube::Client,
    responder: Responder,
    seen: Arc<Mutex<Seen>>,
}

impl std::fmt::Debug for QueueAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueAgent")
            .field("config", &self.config)
            .field("responder", &self.responder)
            .finish()
    }
}

impl QueueAgent {
    /// A processor of `config.queue_url`.
    pub fn new(
        config: QueueConfig,
        sqs: aws_sdk_sqs::Client,
        autoscaling: aws_sdk_autoscaling::Client,
        kube: kube::Client,
        responder: Responder,
    ) -> Self {
        Self {
            config,
            sqs,
            autoscaling,
            kube,
            responder,
            seen: Arc::default(),
        }
    }

    /// One long-poll receive and the handling of what it brought, messages in parallel.
    pub async fn tick(&self) -> Result<Vec<Outcome>, String> {
        let received = self
            .sqs
            .receive_message()
            .queue_url(&self.config.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(i32::try_from(self.config.wait.as_secs().min(20)).unwrap_or(20))
            .visibility_timeout(i32::try_from(self.config.visibility.as_secs()).unwrap_or(300))
            .send()
            .await
            .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string());
        respond::count("queue_receive", received.is_ok());
        let messages = received?.messages.unwrap_or_default();
        let jobs = messages.into_iter().map(|m| self.process(m));
        Ok(futures::future::join_all(jobs).await)
    }

    /// Receives and acts forever; an unreachable queue is retried with backoff, never fatal.
    pub async fn run(self) {
        let mut pauses = backoff();
        loop {
            match self.tick().await {
                Ok(_) => pauses = backoff(),
                Err(e) => {
                    let pause = pauses.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(error = e, retry_in = ?pause, "cannot read the interruption queue");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn process(&self, m: SqsMessage) -> Outcome {
        let body = m.body.as_deref().unwrap_or_default();
        let outcome = self.handle(body).await;
        counter!(names::QUEUE_MESSAGES, "outcome" => outcome.label()).increment(1);
        match &outcome {
            Outcome::Malformed(why) => {
                counter!(names::MALFORMED, "kind" => "eventbridge").increment(1);
                tracing::warn!(
                    error = why,
                    body = %body.chars().take(256).collect::<String>(),
                    "malformed queue message deleted"
                );
            }
            Outcome::Other(what) => tracing::debug!(what, "not an interruption; deleted"),
            Outcome::NotOurs => tracing::debug!("no node of this cluster; deleted"),
            Outcome::Failed(why) => {
                tracing::error!(error = why, "event not acted on; left for redelivery");
                return outcome;
            }
            Outcome::Acted(_) | Outcome::Duplicate => {}
        }
        if let Some(receipt) = &m.receipt_handle {
            let deleted = self
                .sqs
                .delete_message()
                .queue_url(&self.config.queue_url)
                .receipt_handle(receipt)
                .send()
                .await;
            if let Err(e) = deleted {
                tracing::warn!(
                    error = %aws_sdk_sqs::error::DisplayErrorContext(e),
                    "cannot delete a handled message; its redelivery will be recognised"
                );
            }
        }
        outcome
    }

    /// Acts on one message body.
    pub async fn handle(&self, body: &str) -> Outcome {
        let (id, time, event) = match eventbridge::parse(body) {
            Ok(Parsed::Event { id, time, event }) => (id, time, event),
            Ok(Parsed::Other(what)) => return Outcome::Other(what),
            Err(e) => return Outcome::Malformed(e.to_string()),
        };
        if !self.claim(&id) {
            return Outcome::Duplicate;
        }
        let outcome = self.act(&id, time, &event).await;
        self.finish(&id, !matches!(outcome, Outcome::Failed(_)));
        outcome
    }

    async fn act(&self, id: &str, time: SystemTime, event: &Event) -> Outcome {
        let deadline = SystemTime::now() + self.responder.policy().drain_timeout;
        let nodes = match until_deadline("list_nodes", deadline, || self.nodes()).await {
            Ok(n) => n,
            Err(e) => return Outcome::Failed(format!("cannot list nodes: {e}")),
        };
        let ours: Vec<(&str, &str)> = event
            .instances()
            .into_iter()
            .filter_map(|i| {
                nodes
                    .iter()
                    .find(|(instance, _)| instance == i)
                    .map(|(_, node)| (i, node.as_str()))
            })
            .collect();
        if ours.is_empty() {
            return Outcome::NotOurs;
        }
        let jobs = ours.into_iter().map(|(instance, node)| async move {
            let notice = notice_for(id, time, event, instance);
            let drainer = Drainer::new(self.kube.clone(), node, self.responder.policy().dry_run);
            let identity = Identity {
                instance_id: Some(instance.to_string()),
                ..Identity::default()
            };
            let respond = self
                .responder
                .respond(notice, Source::Queue, &drainer, Some(&identity));
            match event {
                Event::ScaleIn {
                    group, hook, token, ..
                } => self.hold_while(respond, group, hook, token, instance).await,
                _ => respond.await,
            }
        });
        Outcome::Acted(futures::future::join_all(jobs).await)
    }

    /// Runs `work` while heartbeating the lifecycle hook, then completes it with `CONTINUE`.
    async fn hold_while(
        &self,
        work: impl Future<Output = Report>,
        group: &str,
        hook: &str,
        token: &str,
        instance: &str,
    ) -> Report {
        let dry_run = self.responder.policy().dry_run;
        let heartbeats = async {
            loop {
                if !dry_run {
                    let beat = self
                        .autoscaling
                        .record_lifecycle_action_heartbeat()
                        .auto_scaling_group_name(group)
                        .lifecycle_hook_name(hook)
                        .lifecycle_action_token(token)
                        .instance_id(instance)
                        .send()
                        .await;
                    respond::count("heartbeat", beat.is_ok());
                    if let Err(e) = beat {
                        tracing::warn!(error = %aws_sdk_autoscaling::error::DisplayErrorContext(e), "lifecycle heartbeat failed");
                    }
                }
                tokio::time::sleep(self.config.heartbeat_every).await;
            }
        };
        let report = tokio::select! {
            report = work => report,
            () = heartbeats => unreachable!("the heartbeat loop never ends"),
        };
        if dry_run {
            tracing::info!(
                group,
                hook,
                instance,
                "dry run: would complete the lifecycle action"
            );
            return report;
        }
        let until = SystemTime::now() + Duration::from_secs(30);
        let completed = until_deadline("complete_lifecycle", until, || {
            self.autoscaling
                .complete_lifecycle_action()
                .auto_scaling_group_name(group)
                .lifecycle_hook_name(hook)
                .lifecycle_action_token(token)
                .instance_id(instance)
                .lifecycle_action_result("CONTINUE")
                .send()
        })
        .await;
        respond::count("complete_lifecycle", completed.is_ok());
        match completed {
            Ok(_) => tracing::info!(group, instance, "lifecycle action completed: CONTINUE"),
            Err(e) => tracing::error!(
                error = e,
                group,
                instance,
                "cannot complete the lifecycle action"
            ),
        }
        report
    }

    /// Every node's instance id, from `spec.providerID`.
    async fn nodes(&self) -> Result<Vec<(String, String)>, kube::Error> {
        let nodes: Api<Node> = Api::all(self.kube.clone());
        let list = nodes.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|n| {
                let name = n.metadata.name?;
                let provider = n.spec?.provider_id?;
                let instance = eventbridge::instance_of_provider_id(&provider)?.to_string();
                Some((instance, name))
            })
            .collect())
    }

    fn claim(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        !seen.done.iter().any(|d| d == id) && seen.in_flight.insert(id.to_string())
    }

    /// Ends the handling of `id`; a `done` one is remembered so its redelivery is not acted
    /// on again.
    fn finish(&self, id: &str, done: bool) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.in_flight.remove(id);
        if !done {
            return;
        }
        if seen.done.len() >= REMEMBERED {
            seen.done.pop_front();
        }
        seen.done.push_back(id.to_string());
    }
}

/// Pauses between failed receives: 0.5 s doubling to 30 s.
fn backoff() -> impl Iterator<Item = Duration> {
    spotable_fleet::backoff::pauses(Duration::from_millis(500), Duration::from_secs(30))
}

/// The notice an event is, for one of its instances.
pub fn notice_for(id: &str, time: SystemTime, event: &Event, instance: &str) -> Notice {
    let (kind, reason, deadline) = match event {
        Event::Spot { action, .. } => (
            Kind::Spot,
            format!("spot-{action}"),
            Some(time + SPOT_WARNING),
        ),
        Event::Rebalance { .. } => (Kind::Rebalance, "rebalance".to_string(), None),
        Event::StateChange { state, .. } => (Kind::StateChange, format!("instance-{state}"), None),
        Event::Scheduled { start, .. } => (
            Kind::Maintenance,
            "maintenance-scheduled".to_string(),
            *start,
        ),
        Event::ScaleIn { .. } => (Kind::ScaleIn, "asg-scale-in".to_string(), None),
    };
    Notice {
        kind,
        id: format!("{}:{instance}:{id}", kind.as_str()),
        reason,
        deadline,
    }
}

/// An Auto Scaling client from the standard AWS configuration chain (region, credentials,
/// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_AUTO_SCALING`), on the workspace's HTTPS client.
pub async fn autoscaling_client() -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::new(&spotable_fleet::inventory::aws_config().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_notices_with_their_deadlines() {
        let t = humantime::parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let spot = Event::Spot {
            instance: "i-1".into(),
            action: "terminate".into(),
        };
        let n = notice_for("e-1", t, &spot, "i-1");
        assert_eq!(n.kind, Kind::Spot);
        assert_eq!(n.id, "spot:i-1:e-1");
        assert_eq!(n.deadline, Some(t + Duration::from_secs(120)));
        let scale = Event::ScaleIn {
            instance: "i-1".into(),
            group: "g".into(),
            hook: "h".into(),
            token: "t".into(),
        };
        assert_eq!(notice_for("e-2", t, &scale, "i-1").deadline, None);
    }
}
