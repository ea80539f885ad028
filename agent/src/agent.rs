//! The agent: poll instance metadata, and for each new notice tell the inventory, cordon the
//! node and drain it, in that order, before the deadline.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use metrics::counter;

use crate::drain::{Drainer, PodOutcome};
use crate::imds::{Identity, Imds, ImdsError};
use crate::inventory::{Message, Publisher, Status};
use crate::notice::{self, Action, Notice};

/// Metric names.
pub mod names {
    /// Notices seen, by `kind`.
    pub const NOTICES: &str = "spotable_agent_notices_total";
    /// Actions taken, by `action` and `result`.
    pub const ACTIONS: &str = "spotable_agent_actions_total";
    /// Failed metadata polls.
    pub const IMDS_ERRORS: &str = "spotable_agent_imds_errors_total";
}

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
            identity: None,
        }
    }

    /// Notices not handled yet (and due). An unreachable metadata service is an error the
    /// caller logs and counts; the next poll tries again.
    pub async fn poll(&mut self) -> Result<Vec<Notice>, ImdsError> {
        let mut found = Vec::new();
        if let Some(a) = self.imds.spot_action().await? {
            found.push(Notice::spot(&a));
        }
        if let Some(r) = self.imds.rebalance().await? {
            found.push(Notice::rebalance(&r));
        }
        for e in self.imds.scheduled_events().await? {
            found.push(Notice::maintenance(&e));
        }
        let now = SystemTime::now();
        Ok(found
            .into_iter()
            .filter(|n| !self.handled.contains(&n.id))
            .filter(|n| notice::due(n, now, self.config.maintenance_lead))
            .collect())
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

    /// Handles one notice: inventory first, then cordon, then drain. Marked handled first, so
    /// a notice still served on the next poll is not acted on twice.
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
            let r = self
                .drainer
                .cordon(&notice.reason)
                .await
                .map_err(|e| e.to_string());
            count("cordon", r.is_ok());
            if let Err(e) = &r {
                tracing::error!(error = e, "cordon failed");
            }
            Some(r)
        } else {
            None
        };
        let drained = if action == Action::Drain {
            match self.drainer.drain(deadline).await {
                Ok(pods) => {
                    for (_, outcome) in &pods {
                        counter!(names::ACTIONS, "action" => "evict", "result" => outcome.as_str())
                            .increment(1);
                    }
                    pods
                }
                Err(e) => {
                    count("drain", false);
                    tracing::error!(error = %e, "cannot list the node's pods");
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

fn count(action: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(names::ACTIONS, "action" => action, "result" => result).increment(1);
}
