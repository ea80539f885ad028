//! Interruption events as EventBridge delivers them to an SQS queue: the envelope
//! (`detail-type`, `source`, `time`, `detail`) of the events that aws-node-termination-handler's
//! queue processor and Karpenter's interruption queue read. Pure parsing, fuzzed.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use crate::notice::Malformed;

/// How long a spot instance lives after its interruption warning.
pub const SPOT_WARNING: Duration = Duration::from_secs(120);

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `EC2 Spot Instance Interruption Warning`: the instance goes away two minutes after
    /// the event's time.
    Spot {
        /// The instance.
        instance: String,
        /// `terminate`, `stop` or `hibernate`.
        action: String,
    },
    /// `EC2 Instance Rebalance Recommendation`: elevated risk, no deadline.
    Rebalance {
        /// The instance.
        instance: String,
    },
    /// `EC2 Instance State-change Notification` to `stopping`, `stopped`, `shutting-down` or
    /// `terminated`: the instance is going or gone. Other states are not interruptions.
    StateChange {
        /// The instance.
        instance: String,
        /// The new state.
        state: String,
    },
    /// `AWS Health Event` of category `scheduledChange` for EC2: maintenance on instances.
    Scheduled {
        /// Affected instances.
        instances: Vec<String>,
        /// When the change starts, if given.
        start: Option<SystemTime>,
    },
    /// `EC2 Instance-terminate Lifecycle Action`: an Auto Scaling group holds the instance in
    /// `Terminating:Wait` until the lifecycle action is completed.
    ScaleIn {
        /// The instance.
        instance: String,
        /// `AutoScalingGroupName`.
        group: String,
        /// `LifecycleHookName`.
        hook: String,
        /// `LifecycleActionToken`.
        token: String,
    },
}

impl Event {
    /// The instances the event concerns.
    pub fn instances(&self) -> Vec<&str> {
        match self {
            Event::Spot { instance, .. }
            | Event::Rebalance { instance }
            | Event::StateChange { instance, .. }
            | Event::ScaleIn { instance, .. } => vec![instance.as_str()],
            Event::Scheduled { instances, .. } => instances.iter().map(String::as_str).collect(),
        }
    }
}

/// One message from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An interruption event.
    Event {
        /// EventBridge's id of the event: the same on every redelivery.
        id: String,
        /// When it happened.
        time: SystemTime,
        /// What it says.
        event: Event,
    },
    /// A well-formed message that is not an interruption (another detail type, a state change
    /// to `running`, an Auto Scaling test notification): acknowledged and counted.
    Other(String),
}

#[derive(Deserialize)]
struct Envelope {
    id: Option<String>,
    #[serde(rename = "detail-type")]
    detail_type: Option<String>,
    source: Option<String>,
    time: Option<String>,
    #[serde(default)]
    detail: Value,
    /// Auto Scaling's own notifications (`autoscaling:TEST_NOTIFICATION`) carry this instead.
    #[serde(rename = "Event")]
    asg_event: Option<String>,
}

fn text(detail: &Value, key: &str) -> Result<String, Malformed> {
    detail
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Malformed(format!("detail.{key} missing")))
}

/// Reads one message body.
pub fn parse(body: &str) -> Result<Parsed, Malformed> {
    let e: Envelope = serde_json::from_str(body)
        .map_err(|e| Malformed(format!("not an EventBridge event: {e}")))?;
    if let Some(asg) = e.asg_event {
        return Ok(Parsed::Other(asg));
    }
    let (Some(detail_type), Some(source)) = (e.detail_type, e.source) else {
        return Err(Malformed("no detail-type or source".into()));
    };
    let id = e.id.ok_or_else(|| Malformed("no id".into()))?;
    let time = e
        .time
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .ok_or_else(|| Malformed("time missing or not RFC 3339".into()))?;
    let d = &e.detail;
    let event = match (source.as_str(), detail_type.as_str()) {
        ("aws.ec2", "EC2 Spot Instance Interruption Warning") => Event::Spot {
            instance: text(d, "instance-id")?,
            action: text(d, "instance-action")?,
        },
        ("aws.ec2", "EC2 Instance Rebalance Recommendation") => Event::Rebalance {
            instance: text(d, "instance-id")?,
        },
        ("aws.ec2", "EC2 Instance State-change Notification") => {
            let state = text(d, "state")?;
            if !matches!(
                state.as_str(),
                "stopping" | "stopped" | "shutting-down" | "terminated"
            ) {
                return Ok(Parsed::Other(format!("{detail_type}: {state}")));
            }
            Event::StateChange {
                instance: text(d, "instance-id")?,
                state,
            }
        }
        ("aws.health", "AWS Health Event") => {
            let scheduled = d.get("eventTypeCategory").and_then(Value::as_str)
                == Some("scheduledChange")
                && d.get("service").and_then(Value::as_str) == Some("EC2");
            if !scheduled {
                return Ok(Parsed::Other(format!(
                    "{detail_type}: not an EC2 scheduled change"
                )));
            }
            let instances: Vec<String> = d
                .get("affectedEntities")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|a| a.get("entityValue").and_then(Value::as_str))
                .filter(|v| v.starts_with("i-"))
                .map(str::to_owned)
                .collect();
            if instances.is_empty() {
                return Err(Malformed("health event names no instance".into()));
            }
            let start = d
                .get("startTime")
                .and_then(Value::as_str)
                .and_then(parse_health_time);
            Event::Scheduled { instances, start }
        }
        ("aws.autoscaling", "EC2 Instance-terminate Lifecycle Action") => Event::ScaleIn {
            instance: text(d, "EC2InstanceId")?,
            group: text(d, "AutoScalingGroupName")?,
            hook: text(d, "LifecycleHookName")?,
            token: text(d, "LifecycleActionToken")?,
        },
        _ => return Ok(Parsed::Other(format!("{source}: {detail_type}"))),
    };
    Ok(Parsed::Event { id, time, event })
}

/// AWS Health times: RFC 3339, or `Sat, 05 Jun 2021 15:10:09 GMT` as some events carry.
fn parse_health_time(s: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Some(t);
    }
    let (_, rest) = s.split_once(", ")?;
    crate::notice::parse_imds_date(rest)
}

/// The instance id in a node's `spec.providerID` (`aws:///us-west-2a/i-0abc`).
pub fn instance_of_provider_id(provider_id: &str) -> Option<&str> {
    let id = provider_id.strip_prefix("aws://")?.rsplit('/').next()?;
    id.starts_with("i-").then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, source: &str, detail: &str) -> String {
        format!(
            r#"{{"version": "0", "id": "e-1", "detail-type": "{kind}", "source": "{source}",
                "account": "123456789012", "time": "2026-11-25T10:00:00Z", "region": "us-west-2",
                "resources": [], "detail": {detail}}}"#
        )
    }

    fn parsed(body: &str) -> Event {
        match parse(body) {
            Ok(Parsed::Event { event, id, .. }) => {
                assert_eq!(id, "e-1");
                event
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_documented_interruption_events() {
        assert_eq!(
            parsed(&event(
                "EC2 Spot Instance Interruption Warning",
                "aws.ec2",
                r#"{"instance-id": "i-0abc", "instance-action": "terminate"}"#
            )),
            Event::Spot {
                instance: "i-0abc".into(),
                action: "terminate".into()
            }
        );
        assert_eq!(
            parsed(&event(
                "EC2 Instance Rebalance Recommendation",
                "aws.ec2",
                r#"{"instance-id": "i-0abc"}"#
            )),
            Event::Rebalance {
                instance: "i-0abc".into()
            }
        );
        assert_eq!(
            parsed(&event(
                "EC2 Instance State-change Notification",
                "aws.ec2",
                r#"{"instance-id": "i-0abc", "state": "stopping"}"#
            )),
            Event::StateChange {
                instance: "i-0abc".into(),
                state: "stopping".into()
            }
        );
        let health = parsed(&event(
            "AWS Health Event",
            "aws.health",
            r#"{"service": "EC2", "eventTypeCategory": "scheduledChange",
                "startTime": "Sat, 05 Jun 2021 15:10:09 GMT",
                "affectedEntities": [{"entityValue": "i-0abc"}, {"entityValue": "i-0def"}]}"#,
        ));
        assert_eq!(
            health,
            Event::Scheduled {
                instances: vec!["i-0abc".into(), "i-0def".into()],
                start: humantime::parse_rfc3339("2021-06-05T15:10:09Z").ok(),
            }
        );
        assert_eq!(
            parsed(&event(
                "EC2 Instance-terminate Lifecycle Action",
                "aws.autoscaling",
                r#"{"LifecycleActionToken": "tok", "AutoScalingGroupName": "games",
                    "LifecycleHookName": "drain", "EC2InstanceId": "i-0abc",
                    "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"}"#
            )),
            Event::ScaleIn {
                instance: "i-0abc".into(),
                group: "games".into(),
                hook: "drain".into(),
                token: "tok".into()
            }
        );
    }

    #[test]
    fn other_messages_are_recognised_not_acted_on() {
        for body in [
            event(
                "EC2 Instance State-change Notification",
                "aws.ec2",
                r#"{"instance-id": "i-1", "state": "running"}"#,
            ),
            event(
                "AWS Health Event",
                "aws.health",
                r#"{"service": "RDS", "eventTypeCategory": "scheduledChange"}"#,
            ),
            event("Object Created", "aws.s3", "{}"),
            r#"{"Event": "autoscaling:TEST_NOTIFICATION", "AutoScalingGroupName": "games"}"#
                .to_string(),
        ] {
            assert!(matches!(parse(&body), Ok(Parsed::Other(_))), "{body}");
        }
    }

    #[test]
    fn malformed_messages_are_errors() {
        for body in [
            "not json".to_string(),
            "{}".to_string(),
            event("EC2 Spot Instance Interruption Warning", "aws.ec2", "{}"),
            event(
                "EC2 Spot Instance Interruption Warning",
                "aws.ec2",
                r#"{"instance-id": 7}"#,
            ),
            event(
                "AWS Health Event",
                "aws.health",
                r#"{"service": "EC2", "eventTypeCategory": "scheduledChange", "affectedEntities": []}"#,
            ),
            event(
                "EC2 Instance Rebalance Recommendation",
                "aws.ec2",
                r#"{"instance-id": "i-1"}"#,
            )
            .replace("2026-11-25T10:00:00Z", "soon"),
        ] {
            assert!(parse(&body).is_err(), "{body}");
        }
    }

    #[test]
    fn provider_ids() {
        assert_eq!(
            instance_of_provider_id("aws:///us-west-2a/i-0abc"),
            Some("i-0abc")
        );
        assert_eq!(instance_of_provider_id("aws:///i-0abc"), Some("i-0abc"));
        assert_eq!(instance_of_provider_id("gce://p/z/n"), None);
        assert_eq!(instance_of_provider_id("aws:///us-west-2a/"), None);
    }
}
