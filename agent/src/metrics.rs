//! The agent's metric names, help texts and label values, in one place, so every series is
//! registered (at zero) and described before the first notice.

use metrics::{counter, describe_counter, describe_histogram, histogram};

use spotable_fleet::notice::Kind;

/// Metric names.
pub mod names {
    /// Notices handled, by `kind` and `source`.
    pub const NOTICES: &str = "spotable_agent_notices_total";
    /// Actions taken, by `action` and `result`.
    pub const ACTIONS: &str = "spotable_agent_actions_total";
    /// Failed metadata polls.
    pub const IMDS_ERRORS: &str = "spotable_agent_imds_errors_total";
    /// Notice bodies that could not be acted on, by `kind`, once per distinct body.
    pub const MALFORMED: &str = "spotable_agent_malformed_notices_total";
    /// Failed attempts at a step that was then tried again, by `action`.
    pub const RETRIES: &str = "spotable_agent_retries_total";
    /// Interruption-queue messages, by `outcome`.
    pub const QUEUE_MESSAGES: &str = "spotable_agent_queue_messages_total";
    /// Seconds from a notice to its node drained.
    pub const DRAIN_SECONDS: &str = "spotable_agent_drain_seconds";
}

/// `action` label values of [`names::ACTIONS`] and [`names::RETRIES`].
pub const ACTION_LABELS: [&str; 9] = [
    "list_nodes",
    "publish",
    "cordon",
    "drain",
    "event",
    "webhook",
    "heartbeat",
    "complete_lifecycle",
    "queue_receive",
];
/// `result` values of `action="evict"`.
pub const POD_OUTCOMES: [&str; 5] = ["evicted", "deleted", "gone", "failed", "dry_run"];
/// `outcome` values of [`names::QUEUE_MESSAGES`].
pub const QUEUE_OUTCOMES: [&str; 6] = [
    "acted",
    "not_ours",
    "other",
    "malformed",
    "duplicate",
    "failed",
];
/// Kinds of notice.
pub const KINDS: [Kind; 5] = [
    Kind::Spot,
    Kind::Rebalance,
    Kind::Maintenance,
    Kind::StateChange,
    Kind::ScaleIn,
];
/// Buckets of [`names::DRAIN_SECONDS`]: a drain has two minutes at most.
pub const DRAIN_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0];

/// Registers help texts and every series at zero.
pub fn describe() {
    use names::*;
    describe_counter!(NOTICES, "Interruption notices handled, by kind and source");
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
    describe_counter!(QUEUE_MESSAGES, "Interruption-queue messages, by outcome");
    describe_histogram!(DRAIN_SECONDS, "Seconds from a notice to its node drained");
    for kind in KINDS {
        for source in ["imds", "queue"] {
            counter!(NOTICES, "kind" => kind.as_str(), "source" => source).absolute(0);
        }
        counter!(MALFORMED, "kind" => kind.as_str()).absolute(0);
    }
    counter!(MALFORMED, "kind" => "eventbridge").absolute(0);
    for action in ACTION_LABELS {
        for result in ["ok", "error"] {
            counter!(ACTIONS, "action" => action, "result" => result).absolute(0);
        }
        counter!(RETRIES, "action" => action).absolute(0);
    }
    for outcome in POD_OUTCOMES {
        counter!(ACTIONS, "action" => "evict", "result" => outcome).absolute(0);
    }
    for outcome in QUEUE_OUTCOMES {
        counter!(QUEUE_MESSAGES, "outcome" => outcome).absolute(0);
    }
    counter!(IMDS_ERRORS).absolute(0);
    // Registering the handle makes the histogram show (empty) before its first sample.
    let _ = histogram!(DRAIN_SECONDS);
}
