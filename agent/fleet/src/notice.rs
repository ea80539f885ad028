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
    /// `events/maintenance/scheduled`, or an AWS Health scheduled change.
    Maintenance,
    /// The instance is stopping or terminating (an EC2 state change).
    StateChange,
    /// An Auto Scaling group is terminating the instance (a lifecycle hook holds it).
    ScaleIn,
}

impl Kind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spot => "spot",
            Kind::Rebalance => "rebalance",
            Kind::Maintenance => "maintenance",
            Kind::StateChange => "state_change",
            Kind::ScaleIn => "scale_in",
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

/// Where each kind of notice is served, under `/latest/`.
pub const SPOT_PATH: &str = "meta-data/spot/instance-action";
/// See [`SPOT_PATH`].
pub const REBALANCE_PATH: &str = "meta-data/events/recommendations/rebalance";
/// See [`SPOT_PATH`].
pub const MAINTENANCE_PATH: &str = "meta-data/events/maintenance/scheduled";

/// A notice body that cannot be acted on: bad JSON, an unknown action, a time that does not
/// parse. Never taken as "now": the real notice that follows must be handled once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn json<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, Malformed> {
    serde_json::from_str(body).map_err(|e| Malformed(format!("not the documented JSON: {e}")))
}

impl Notice {
    /// From the body of `spot/instance-action`.
    pub fn parse_spot(body: &str) -> Result<Self, Malformed> {
        let a: SpotAction = json(body)?;
        if !matches!(a.action.as_str(), "terminate" | "stop" | "hibernate") {
            return Err(Malformed(format!("unknown spot action {:?}", a.action)));
        }
        let deadline = humantime::parse_rfc3339_weak(&a.time)
            .map_err(|_| Malformed(format!("spot time {:?} is not RFC 3339", a.time)))?;
        Ok(Self {
            kind: Kind::Spot,
            id: format!("spot:{}:{}", a.action, a.time),
            reason: format!("spot-{}", a.action),
            deadline: Some(deadline),
        })
    }

    /// From the body of `events/recommendations/rebalance`.
    pub fn parse_rebalance(body: &str) -> Result<Self, Malformed> {
        let r: Rebalance = json(body)?;
        humantime::parse_rfc3339_weak(&r.notice_time).map_err(|_| {
            Malformed(format!(
                "rebalance noticeTime {:?} is not RFC 3339",
                r.notice_time
            ))
        })?;
        Ok(Self {
            kind: Kind::Rebalance,
            id: format!("rebalance:{}", r.notice_time),
            reason: "rebalance".into(),
            deadline: None,
        })
    }

    /// From the body of `events/maintenance/scheduled`: one result per active event.
    pub fn parse_maintenance(body: &str) -> Result<Vec<Result<Self, Malformed>>, Malformed> {
        let all: Vec<ScheduledEvent> = json(body)?;
        Ok(all
            .iter()
            .filter(|e| e.state == "active")
            .map(|e| {
                let deadline = parse_imds_date(&e.not_before).ok_or_else(|| {
                    Malformed(format!(
                        "maintenance {} NotBefore {:?} is not a date",
                        e.event_id, e.not_before
                    ))
                })?;
                Ok(Self {
                    kind: Kind::Maintenance,
                    id: format!("maintenance:{}", e.event_id),
                    reason: format!("maintenance-{}", e.code),
                    deadline: Some(deadline),
                })
            })
            .collect())
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

impl Action {
    /// Name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ignore => "ignore",
            Action::Cordon => "cordon",
            Action::Drain => "drain",
        }
    }
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
        Kind::Spot | Kind::Maintenance | Kind::StateChange | Kind::ScaleIn => Action::Drain,
        Kind::Rebalance => rebalance,
    }
}

/// Maintenance is acted on only once it is this close.
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
        let body = r#"{"action": "terminate", "time": "2026-11-24T08:22:00Z"}"#;
        let n = Notice::parse_spot(body).unwrap();
        assert_eq!(Notice::parse_spot(body), Ok(n.clone()));
        assert_eq!(n.id, "spot:terminate:2026-11-24T08:22:00Z");
        assert_eq!(n.reason, "spot-terminate");
        assert_eq!(
            n.deadline,
            humantime::parse_rfc3339("2026-11-24T08:22:00Z").ok()
        );
        let r = Notice::parse_rebalance(r#"{"noticeTime": "2026-11-24T08:20:00Z"}"#).unwrap();
        assert_eq!(r.id, "rebalance:2026-11-24T08:20:00Z");
        assert_eq!(r.deadline, None);
        let m = Notice::parse_maintenance(
            r#"[{"Code": "system-reboot", "EventId": "instance-event-1", "State": "active",
                 "NotBefore": "21 Jan 2019 09:00:43 GMT"},
                {"Code": "system-reboot", "EventId": "instance-event-0", "State": "completed",
                 "NotBefore": "1 Jan 2019 09:00:43 GMT"}]"#,
        )
        .unwrap();
        assert_eq!(m.len(), 1, "only active events");
        assert_eq!(m[0].as_ref().unwrap().id, "maintenance:instance-event-1");
    }

    #[test]
    fn malformed_bodies_are_rejected_never_taken_as_now() {
        for body in [
            r#"{"action": "terminate", "time": "soon"}"#,
            r#"{"action": "explode", "time": "2026-11-24T08:22:00Z"}"#,
            r#"{"action": "terminate"}"#,
            "not json",
            "",
        ] {
            assert!(Notice::parse_spot(body).is_err(), "{body}");
        }
        assert!(Notice::parse_rebalance(r#"{"noticeTime": "yesterday"}"#).is_err());
        assert!(Notice::parse_maintenance("{}").is_err());
        let m = Notice::parse_maintenance(
            r#"[{"Code": "system-reboot", "EventId": "e", "State": "active", "NotBefore": "tbd"}]"#,
        )
        .unwrap();
        assert!(m[0].is_err(), "an unreadable date is not a date due now");
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
