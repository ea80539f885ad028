//! The game-server inventory: its message schema and the SQS publisher, shared by the agent
//! and the wrapper.
//!
//! Messages are versioned JSON. Every documented key is always present (null when unknown), so
//! consumers can rely on the shape. On a FIFO queue (`….fifo`) each message carries an explicit
//! deduplication id (its `event_id`) and a group id (the game server, or the node), so a retried
//! send is delivered once and one server's messages stay in order.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// Schema version carried in `v`. Version 2 added `game`, `tokens` and `front_address`,
/// version 3 the status `moved` and `moved_from`; the JSON Schema of the current version is
/// `deploy/schema/inventory.v3.json`.
pub const SCHEMA_VERSION: u32 = 3;

/// The keys every message carries (null when unknown), as documented for consumers.
pub const KEYS: [&str; 19] = [
    "v",
    "event_id",
    "status",
    "reason",
    "type",
    "public_hostname",
    "public_ipv4",
    "ports",
    "region",
    "instance_id",
    "node",
    "pod",
    "deadline",
    "exit_code",
    "game",
    "tokens",
    "front_address",
    "moved_from",
    "ts",
];

/// Lifecycle of a game server (or its node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Ports allocated, about to start.
    Init,
    /// Listening on its port.
    Ready,
    /// Asked to stop.
    Terminating,
    /// Exited.
    Terminated,
    /// Its node is being reclaimed.
    Interrupted,
    /// A landing pad took over a game moved off a reclaimed node: this message is the new
    /// server's, `moved_from` names the old one.
    Moved,
}

/// The game server a `moved` message's server took over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedFrom {
    /// Its pod.
    pub pod: Option<PodRef>,
    /// Its node.
    pub node: Option<String>,
    /// `IP:PORT` the proxies sent to.
    pub address: Option<String>,
}

/// Transport of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// One named port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Number.
    pub port: u16,
    /// Transport.
    pub proto: Proto,
}

/// The pod a message is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, when known.
    pub uid: Option<String>,
}

/// One inventory message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Schema version.
    pub v: u32,
    /// Stable id of the event: a retried send carries the same one.
    pub event_id: String,
    /// What happened.
    pub status: Status,
    /// Why (`spot-terminate`, `rebalance`, `exit`, `SIGTERM`…).
    pub reason: Option<String>,
    /// Game type (`minecraft`…).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Public DNS name.
    pub public_hostname: Option<String>,
    /// Public IPv4.
    pub public_ipv4: Option<String>,
    /// Named ports.
    pub ports: BTreeMap<String, Port>,
    /// AWS region.
    pub region: Option<String>,
    /// EC2 instance id.
    pub instance_id: Option<String>,
    /// Kubernetes node.
    pub node: Option<String>,
    /// Kubernetes pod.
    pub pod: Option<PodRef>,
    /// When the node goes away (RFC 3339), for `interrupted`.
    pub deadline: Option<String>,
    /// Exit code, for `terminated`.
    pub exit_code: Option<i32>,
    /// The game (match, world) this server is a replica of: the `spotable.io/game` label.
    #[serde(default)]
    pub game: Option<String>,
    /// Tokens that route players to the game through the proxy, as the proxy spells them
    /// (UTF-8 text, or `base64:…`). Empty when the proxy does not route by token.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// `HOST:PORT` players send to when the server sits behind the proxy (its load
    /// balancer). Then `public_ipv4` and `public_hostname` are null: players cannot reach
    /// the server itself.
    #[serde(default)]
    pub front_address: Option<String>,
    /// For `moved`: the game server this one took over.
    #[serde(default)]
    pub moved_from: Option<MovedFrom>,
    /// When the message was made (RFC 3339).
    pub ts: String,
}

impl Message {
    /// A message with `v`, `event_id`, `status` and `ts` set, the rest empty.
    pub fn new(event_id: impl Into<String>, status: Status) -> Self {
        Self {
            v: SCHEMA_VERSION,
            event_id: event_id.into(),
            status,
            reason: None,
            kind: None,
            public_hostname: None,
            public_ipv4: None,
            ports: BTreeMap::new(),
            region: None,
            instance_id: None,
            node: None,
            pod: None,
            deadline: None,
            exit_code: None,
            game: None,
            tokens: Vec::new(),
            front_address: None,
            moved_from: None,
            ts: now_rfc3339(),
        }
    }

    /// FIFO group: one game server's (or node's) messages stay in order.
    pub fn group_id(&self) -> String {
        self.pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .or_else(|| self.node.clone())
            .or_else(|| self.instance_id.clone())
            .unwrap_or_else(|| "spotable".into())
    }
}

/// Current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// SQS refused or could not be reached.
    #[error("cannot send to {queue}: {reason}")]
    Send {
        /// Queue URL.
        queue: String,
        /// Why.
        reason: String,
    },
    /// Retries ran out of time.
    #[error("gave up sending {event_id} to {queue} after {attempts} attempts: {reason}")]
    GaveUp {
        /// Queue URL.
        queue: String,
        /// The message.
        event_id: String,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        reason: String,
    },
}

/// Sends inventory messages to one SQS queue.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl Publisher {
    /// A publisher using the standard AWS configuration chain (`AWS_REGION`, credentials,
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_SQS`), over rustls with the ring provider.
    pub async fn from_env(queue_url: impl Into<String>) -> Self {
        Self::with_client(sqs_client().await, queue_url)
    }

    /// A publisher over an existing client.
    pub fn with_client(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }

    /// The queue.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// One attempt.
    pub async fn send(&self, message: &Message) -> Result<(), PublishError> {
        let body = serde_json::to_string(message).map_err(|e| PublishError::Send {
            queue: self.queue_url.clone(),
            reason: e.to_string(),
        })?;
        let mut req = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body);
        if self.queue_url.ends_with(".fifo") {
            req = req
                .message_group_id(message.group_id())
                .message_deduplication_id(dedup_id(&message.event_id));
        }
        req.send()
            .await
            .map(|_| ())
            .map_err(|e| PublishError::Send {
                queue: self.queue_url.clone(),
                reason: aws_sdk_sqs::error::DisplayErrorContext(e).to_string(),
            })
    }

    /// Retries with jittered backoff (200 ms doubling to 5 s) until sent or `within` has passed.
    pub async fn send_with_retry(
        &self,
        message: &Message,
        within: Duration,
    ) -> Result<u32, PublishError> {
        let deadline = Instant::now() + within;
        let mut pauses = crate::backoff::pauses(Duration::from_millis(200), Duration::from_secs(5));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let result =
                tokio::time::timeout(left.max(Duration::from_millis(1)), self.send(message))
                    .await
                    .unwrap_or_else(|_| {
                        Err(PublishError::Send {
                            queue: self.queue_url.clone(),
                            reason: "timed out".into(),
                        })
                    });
            match result {
                Ok(()) => return Ok(attempts),
                Err(e) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(PublishError::GaveUp {
                            queue: self.queue_url.clone(),
                            event_id: message.event_id.clone(),
                            attempts,
                            reason: e.to_string(),
                        });
                    }
                    tracing::warn!(error = %e, attempts, "inventory send failed; retrying");
                    let pause = pauses.next().unwrap_or(Duration::from_secs(5));
                    tokio::time::sleep(pause.min(left)).await;
                }
            }
        }
    }
}

/// SQS deduplication ids are at most 128 characters of a limited alphabet.
fn dedup_id(event_id: &str) -> String {
    let clean: String = event_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean.chars().take(128).collect()
}

/// The HTTP client for AWS calls: HTTPS over rustls with ring, the workspace's one crypto
/// provider (the SDK's default would bring aws-lc-rs).
pub fn https_client() -> aws_sdk_sqs::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// An SQS client from the standard AWS configuration chain (region, credentials,
/// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_SQS`).
pub async fn sqs_client() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&aws_config().await)
}

/// The standard AWS configuration chain (region, credentials, endpoint overrides) on
/// [`https_client`], for every AWS client of the node-side programs.
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https_client())
        .load()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_key_is_present() {
        let mut m = Message::new("spot:terminate:2026-01-01T00:00:00Z", Status::Interrupted);
        m.ports.insert(
            "game".into(),
            Port {
                port: 7777,
                proto: Proto::Udp,
            },
        );
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        for key in KEYS {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["status"], "interrupted");
        assert_eq!(v["ports"]["game"]["proto"], "udp");
        assert_eq!(v["v"], 3);
        assert!(v["moved_from"].is_null());
        let back: Message = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn version_1_messages_still_read() {
        let mut v: serde_json::Value =
            serde_json::to_value(Message::new("x", Status::Ready)).unwrap();
        let o = v.as_object_mut().unwrap();
        for key in ["game", "tokens", "front_address"] {
            o.remove(key);
        }
        o.insert("v".into(), 1.into());
        let m: Message = serde_json::from_value(v).unwrap();
        assert_eq!((m.game, m.tokens.len(), m.front_address), (None, 0, None));
    }

    #[test]
    fn group_and_dedup_ids() {
        let mut m = Message::new("a b\u{e9}", Status::Ready);
        assert_eq!(m.group_id(), "spotable");
        m.node = Some("ip-10-0-0-1".into());
        assert_eq!(m.group_id(), "ip-10-0-0-1");
        m.pod = Some(PodRef {
            namespace: "games".into(),
            name: "mc-0".into(),
            uid: None,
        });
        assert_eq!(m.group_id(), "games/mc-0");
        assert_eq!(dedup_id("a b\u{e9}"), "a_b_");
        assert_eq!(dedup_id(&"x".repeat(300)).len(), 128);
    }
}
