//! The agent: poll instance metadata, and for each new notice tell the inventory, cordon the
//! node and drain it, in that order, before the deadline.
//!
//! Handling a notice is a goal pursued until its deadline, not one attempt: an API server that
//! is unreachable for a few seconds when the notice arrives delays the cordon and the drain,
//! it does not cancel them.

use std::collections::HashSet;
use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use metrics::{counter, describe_counter};

use crate::drain::{Drainer, PodOutcome};
use crate::imds::{Identity, Imds, ImdsError};
use crate::inventory::{Message, Publisher, Status};
use crate::notice::{self, Action, Kind, Malformed, Notice};

/// Metric names.
pub mod names {
    /// Notices seen, by `kind`.
    pub const NOTICES: &str = "spotable_agent_notices_total";
    /// Actions taken, by `action` and `result`.
    pub const ACTIONS: &str = "spotable_agent_actions_total";
    /// Failed metadata polls.
    pub const IMDS_ERRORS: &str = "spotable_agent_imds_errors_total";
    /// Notice bodies that could not be acted on, by `kind`, once per distinct body.
    pub const MALFORMED: &str = "spotable_agent_malformed_notices_total";
    /// Failed attempts at a step that was then tried again, by `action`.
    pub const RETRIES: &str = "spotable_agent_retries_total";
}

/// Every label value the agent's series take, so all of them show (at zero) from the start.
const ACTION_LABELS: [&str; 3] = ["publish", "cordon", "drain"];
const POD_OUTCOMES: [&str; 5] = ["evicted", "deleted", "gone", "failed", "dry_run"];

/// Registers help texts and every series at zero, so `/metrics` shows them before the first
/// notice (dashboards and alerts see 0, not "no data").
pub fn describe_metrics() {
    use names::*;
    describe_counter!(NOTICES, "Interruption notices handled, by kind");
    describe_counter!(ACTIONS, "Actions taken on notices, by action and result");
    describe_counter!(IMDS_ERRORS, "Instance-metadata polls that failed");
    describe_counter!(
        MALFORMED,
        "Notice bodies that could not be acted on, once per distinct body, by kind"
    );
    describe_counter!(
        RETRIES,
        "Failed attempts at a step that was tried again before the deadline, by action"
    );
    for kind in [Kind::Spot, Kind::Rebalance, Kind::Maintenance] {
        counter!(NOTICES, "kind" => kind.as_str()).absolute(0);
        counter!(MALFORMED, "kind" => kind.as_str()).absolute(0);
    }
    for action in ACTION_LABELS {
        for result in ["ok", "error"] {
            counter!(ACTIONS, "action" => action, "result" => result).absolute(0);
        }
        counter!(RETRIES, "action" => action).absolute(0);
    }
    for outcome in POD_OUTCOMES {
        counter!(ACTIONS, "action" => "evict", "result" => outcome).absolute(0);
    }
    counter!(IMDS_ERRORS).absolute(0);
}

/// Distinct malformed bodies remembered, so each is logged once; past this the memory is
/// cleared (a body that keeps changing is logged again, never without bound).
const MALFORMED_MEMORY: usize = 256;

/// Agent behaviour.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's Kubernetes name.
    pub node: String,
    /// What a rebalance recommendation leads to.
    pub rebalance: Action,
    /// Longest a drain may take when the notice has no deadline of its own.
    pub drain_timeout: Duration,
    /// Log what would be done; change nothing, send nothing.
    pub dry_run: bool,
    /// How long the first send to the inventory may hold up the drain.
    pub publish_timeout: Duration,
    /// How close scheduled maintenance must be before it is acted on.
    pub maintenance_lead: Duration,
}

/// How the inventory heard of a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Inventory message.
    pub published: Published,
    /// What the policy said.
    pub action: Action,
    /// Cordon result (`None` when not asked).
    pub cordoned: Option<Result<(), String>>,
    /// Pods and what became of them.
    pub drained: Vec<(String, PodOutcome)>,
}

/// The agent's state.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    imds: Imds,
    publisher: Option<Publisher>,
    drainer: Drainer,
    handled: HashSet<String>,
    malformed: HashSet<String>,
    identity: Option<Identity>,
}

impl Agent {
    /// An agent; `publisher` is `None` when no queue is configured.
    pub fn new(
        config: AgentConfig,
        imds: Imds,
        publisher: Option<Publisher>,
        drainer: Drainer,
    ) -> Self {
        Self {
            config,
            imds,
            publisher,
            drainer,
            handled: HashSet::new(),
            malformed: HashSet::new(),
            identity: None,
        }
    }

    /// Notices not handled yet (and due). An unreachable metadata service is an error the
    /// caller logs and counts; the next poll tries again.
    pub async fn poll(&mut self) -> Result<Vec<Notice>, ImdsError> {
        let mut found = Vec::new();
        if let Some(body) = self.imds.get(notice::SPOT_PATH).await? {
            self.take(Kind::Spot, &body, Notice::parse_spot(&body), &mut found);
        }
        if let Some(body) = self.imds.get(notice::REBALANCE_PATH).await? {
            self.take(
                Kind::Rebalance,
                &body,
                Notice::parse_rebalance(&body),
                &mut found,
            );
        }
        if let Some(body) = self.imds.get(notice::MAINTENANCE_PATH).await? {
            match Notice::parse_maintenance(&body) {
                Ok(events) => {
                    for e in events {
                        self.take(Kind::Maintenance, &body, e, &mut found);
                    }
                }
                Err(e) => self.take(Kind::Maintenance, &body, Err(e), &mut found),
            }
        }
        let now = SystemTime::now();
        Ok(found
            .into_iter()
            .filter(|n| !self.handled.contains(&n.id))
            .filter(|n| notice::due(n, now, self.config.maintenance_lead))
            .collect())
    }

    /// Keeps a parsed notice; counts and logs a malformed body once, and never acts on it.
    fn take(
        &mut self,
        kind: Kind,
        body: &str,
        parsed: Result<Notice, Malformed>,
        found: &mut Vec<Notice>,
    ) {
        match parsed {
            Ok(n) => found.push(n),
            Err(why) => {
                if self.malformed.len() >= MALFORMED_MEMORY {
                    self.malformed.clear();
                }
                if self.malformed.insert(format!("{}:{body}", kind.as_str())) {
                    counter!(names::MALFORMED, "kind" => kind.as_str()).increment(1);
                    tracing::warn!(
                        kind = kind.as_str(),
                        body = %body.chars().take(256).collect::<String>(),
                        error = %why,
                        "malformed interruption notice ignored"
                    );
                }
            }
        }
    }

    /// One poll and the handling of whatever it found.
    pub async fn tick(&mut self) -> Vec<Report> {
        match self.poll().await {
            Ok(notices) => {
                let mut reports = Vec::new();
                for n in notices {
                    reports.push(self.handle(n).await);
                }
                reports
            }
            Err(e) => {
                counter!(names::IMDS_ERRORS).increment(1);
                tracing::warn!(error = %e, "cannot read instance metadata");
                Vec::new()
            }
        }
    }

    /// Handles one notice: inventory first, then cordon, then drain, each pursued until it is
    /// done or the deadline has passed. Marked handled first, so a notice still served on the
    /// next poll is not acted on twice.
    pub async fn handle(&mut self, notice: Notice) -> Report {
        self.handled.insert(notice.id.clone());
        counter!(names::NOTICES, "kind" => notice.kind.as_str()).increment(1);
        tracing::warn!(
            id = notice.id,
            reason = notice.reason,
            "interruption notice"
        );
        let deadline = notice
            .deadline
            .unwrap_or_else(|| SystemTime::now() + self.config.drain_timeout)
            .min(SystemTime::now() + self.config.drain_timeout);
        let action = notice::action_for(notice.kind, self.config.rebalance);
        let published = self.publish(&notice, deadline).await;

        let cordoned = if action >= Action::Cordon {
            let drainer = &self.drainer;
            let reason = &notice.reason;
            let r = until_deadline("cordon", deadline, || drainer.cordon(reason)).await;
            count("cordon", r.is_ok());
            if let Err(e) = &r {
                tracing::error!(error = e, "cordon not done by the deadline");
            }
            Some(r)
        } else {
            None
        };
        let drained = if action == Action::Drain {
            let drainer = &self.drainer;
            match until_deadline("drain", deadline, || drainer.drain(deadline)).await {
                Ok(pods) => {
                    count("drain", true);
                    for (_, outcome) in &pods {
                        counter!(names::ACTIONS, "action" => "evict", "result" => outcome.as_str())
                            .increment(1);
                    }
                    pods
                }
                Err(e) => {
                    count("drain", false);
                    tracing::error!(error = %e, "the node's pods could not be listed by the deadline");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let report = Report {
            notice,
            published,
            action,
            cordoned,
            drained,
        };
        tracing::info!(
            id = report.notice.id,
            published = ?report.published,
            action = ?report.action,
            cordoned = ?report.cordoned,
            pods = report.drained.len(),
            "notice handled"
        );
        report
    }

    async fn publish(&mut self, notice: &Notice, deadline: SystemTime) -> Published {
        if self.config.dry_run {
            tracing::info!(id = notice.id, "dry run: would publish interrupted");
            return Published::DryRun;
        }
        let Some(publisher) = self.publisher.clone() else {
            return Published::NoQueue;
        };
        if self.identity.is_none() {
            match self.imds.identity().await {
                Ok(id) => self.identity = Some(id),
                Err(e) => tracing::warn!(error = %e, "instance identity unavailable"),
            }
        }
        let mut message = Message::new(notice.id.clone(), Status::Interrupted);
        message.reason = Some(notice.reason.clone());
        message.node = Some(self.config.node.clone());
        message.deadline = notice
            .deadline
            .map(|d| humantime::format_rfc3339_seconds(d).to_string());
        if let Some(id) = &self.identity {
            message.instance_id = id.instance_id.clone();
            message.region = id.region.clone();
            message.public_hostname = id.public_hostname.clone();
            message.public_ipv4 = id.public_ipv4.clone();
        }
        match publisher
            .send_with_retry(&message, self.config.publish_timeout)
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

    /// How many notices have been handled.
    pub fn handled(&self) -> usize {
        self.handled.len()
    }

    /// Polls forever.
    pub async fn run(mut self, every: Duration) {
        loop {
            self.tick().await;
            tokio::time::sleep(every).await;
        }
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
    let mut pauses = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
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

fn count(action: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(names::ACTIONS, "action" => action, "result" => result).increment(1);
}
