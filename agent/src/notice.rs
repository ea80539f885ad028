//! Interruption notices: what they are, their stable ids, their deadlines, and what to do.
//! Pure logic, tested without metadata or a cluster.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::imds::{Rebalance, ScheduledEvent, SpotAction};

/// Where a notice came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `spot/instance-action`: the node goes away at `time`.
    Spot,
    /// `events/recommendations/rebalance`: elevated risk, no deadline.
    Rebalance,
    /// `events/maintenance/scheduled`.
    Maintenance,
}

impl Kind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spot => "spot",
            Kind::Rebalance => "rebalance",
            Kind::Maintenance => "maintenance",
        }
    }
}

/// One notice, with an id that is the same every time it is polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Source.
    pub kind: Kind,
    /// Stable id (also the inventory event id).
    pub id: String,
    /// Short reason for messages and taints (`spot-terminate`, `rebalance`…).
    pub reason: String,
    /// When the node goes away, if known.
    pub deadline: Option<SystemTime>,
}

impl Notice {
    /// From the spot instance-action document.
    pub fn spot(a: &SpotAction) -> Self {
        Self {
            kind: Kind::Spot,
            id: format!("spot:{}:{}", a.action, a.time),
            reason: format!("spot-{}", a.action),
            deadline: humantime::parse_rfc3339_weak(&a.time).ok(),
        }
    }

    /// From a rebalance recommendation.
    pub fn rebalance(r: &Rebalance) -> Self {
        Self {
            kind: Kind::Rebalance,
            id: format!("rebalance:{}", r.notice_time),
            reason: "rebalance".into(),
            deadline: None,
        }
    }

    /// From a scheduled maintenance event.
    pub fn maintenance(e: &ScheduledEvent) -> Self {
        Self {
            kind: Kind::Maintenance,
            id: format!("maintenance:{}", e.event_id),
            reason: format!("maintenance-{}", e.code),
            deadline: parse_imds_date(&e.not_before),
        }
    }
}

/// What to do about a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Record it, change nothing.
    Ignore,
    /// Stop new pods landing on the node.
    Cordon,
    /// Cordon, then move the pods off.
    Drain,
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ignore" => Ok(Action::Ignore),
            "cordon" => Ok(Action::Cordon),
            "drain" => Ok(Action::Drain),
            other => Err(format!("{other:?} is not one of ignore, cordon, drain")),
        }
    }
}

/// Spot interruptions and maintenance drain; rebalance recommendations follow the policy.
pub fn action_for(kind: Kind, rebalance: Action) -> Action {
    match kind {
        Kind::Spot | Kind::Maintenance => Action::Drain,
        Kind::Rebalance => rebalance,
    }
}

/// Maintenance is acted on only once it is this close (or its date is unreadable).
pub fn due(notice: &Notice, now: SystemTime, lead: Duration) -> bool {
    match (notice.kind, notice.deadline) {
        (Kind::Maintenance, Some(at)) => at.duration_since(now).unwrap_or(Duration::ZERO) <= lead,
        _ => true,
    }
}

/// IMDS maintenance dates: `21 Jan 2019 09:00:43 GMT`.
pub fn parse_imds_date(s: &str) -> Option<SystemTime> {
    let mut it = s.split_whitespace();
    let day: u32 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u32 = it.next()?.parse().ok()?;
    let time = it.next()?;
    if it.next()? != "GMT" {
        return None;
    }
    let rfc = format!("{year:04}-{month:02}-{day:02}T{time}Z");
    humantime::parse_rfc3339(&rfc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_deadlines_parsed() {
        let a = SpotAction {
            action: "terminate".into(),
            time: "2026-11-24T08:22:00Z".into(),
        };
        let n = Notice::spot(&a);
        assert_eq!(n, Notice::spot(&a.clone()));
        assert_eq!(n.id, "spot:terminate:2026-11-24T08:22:00Z");
        assert_eq!(n.reason, "spot-terminate");
        assert_eq!(
            n.deadline,
            humantime::parse_rfc3339("2026-11-24T08:22:00Z").ok()
        );
        let r = Notice::rebalance(&Rebalance {
            notice_time: "2026-11-24T08:20:00Z".into(),
        });
        assert_eq!(r.id, "rebalance:2026-11-24T08:20:00Z");
        assert_eq!(r.deadline, None);
    }

    #[test]
    fn imds_maintenance_dates() {
        assert_eq!(
            parse_imds_date("21 Jan 2019 09:00:43 GMT"),
            humantime::parse_rfc3339("2019-01-21T09:00:43Z").ok()
        );
        assert_eq!(
            parse_imds_date("1 Feb 2019 00:00:00 GMT"),
            humantime::parse_rfc3339("2019-02-01T00:00:00Z").ok()
        );
        assert_eq!(parse_imds_date("21 Foo 2019 09:00:43 GMT"), None);
        assert_eq!(parse_imds_date("21 Jan 2019 09:00:43 CET"), None);
        assert_eq!(parse_imds_date(""), None);
    }

    #[test]
    fn policy() {
        assert_eq!(action_for(Kind::Spot, Action::Ignore), Action::Drain);
        assert_eq!(action_for(Kind::Rebalance, Action::Cordon), Action::Cordon);
        assert_eq!(action_for(Kind::Rebalance, Action::Ignore), Action::Ignore);
        assert_eq!("drain".parse::<Action>(), Ok(Action::Drain));
        assert!("nuke".parse::<Action>().is_err());
        let now = SystemTime::now();
        let soon = Notice {
            kind: Kind::Maintenance,
            id: "m".into(),
            reason: "m".into(),
            deadline: Some(now + Duration::from_secs(60)),
        };
        assert!(due(&soon, now, Duration::from_secs(600)));
        let later = Notice {
            deadline: Some(now + Duration::from_secs(6000)),
            ..soon
        };
        assert!(!due(&later, now, Duration::from_secs(600)));
    }
}
