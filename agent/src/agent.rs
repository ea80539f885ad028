//! The agent: poll instance metadata, and for each new notice tell the inventory, cordon the
//! node and drain it, in that order, before the deadline.
//!
//! Handling a notice is a goal pursued until its deadline, not one attempt: an API server that
//! is unreachable for a few seconds when the notice arrives delays the cordon and the drain,
//! it does not cancel them.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use metrics::counter;

use crate::drain::Drainer;
use crate::metrics::names;
use crate::respond::{Policy, Responder, Source};
pub use crate::respond::{Published, Report};
use spotable_fleet::imds::{Identity, Imds, ImdsError};
use spotable_fleet::inventory::Publisher;
use spotable_fleet::notice::{self, Kind, Malformed, Notice};

/// Distinct malformed bodies remembered, so each is logged once; past this the memory is
/// cleared (a body that keeps changing is logged again, never without bound).
const MALFORMED_MEMORY: usize = 256;

/// Agent behaviour.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's Kubernetes name.
    pub node: String,
    /// How notices are answered.
    pub policy: Policy,
    /// How close scheduled maintenance must be before it is acted on.
    pub maintenance_lead: Duration,
}

/// The agent's state.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    imds: Imds,
    responder: Responder,
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
        let responder = Responder::new(config.policy.clone(), publisher);
        Self::with_responder(config, imds, responder, drainer)
    }

    /// An agent answering through `responder` (with Events or a webhook), whose policy is the
    /// one in force.
    pub fn with_responder(
        config: AgentConfig,
        imds: Imds,
        responder: Responder,
        drainer: Drainer,
    ) -> Self {
        Self {
            config,
            imds,
            responder,
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
        if self.identity.is_none() && !self.responder.policy().dry_run {
            match self.imds.identity().await {
                Ok(id) => self.identity = Some(id),
                Err(e) => tracing::warn!(error = %e, "instance identity unavailable"),
            }
        }
        self.responder
            .respond(notice, Source::Imds, &self.drainer, self.identity.as_ref())
            .await
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
