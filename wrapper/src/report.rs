//! What the wrapper tells the inventory queue about its game server: every message's common
//! part ([`ServerInfo`]) and the outbox that sends them in order without holding up the game
//! ([`Outbox`]). The run mode and the landing pad share them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use spotable_fleet::imds::Identity;
use spotable_fleet::inventory::{Message, PodRef, Port, Publisher, Status};
use tokio::sync::mpsc;

use crate::cli::Common;

/// What every message says about this game server.
pub(crate) struct ServerInfo {
    base: Message,
    id: String,
}

impl ServerInfo {
    pub(crate) fn new(common: &Common, ports: &BTreeMap<String, Port>, identity: Identity) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let pod = match (env("POD_NAMESPACE"), env("POD_NAME")) {
            (Some(namespace), Some(name)) => Some(PodRef {
                namespace,
                name,
                uid: env("POD_UID"),
            }),
            _ => None,
        };
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let id = pod
            .as_ref()
            .map(|p| {
                p.uid
                    .clone()
                    .unwrap_or_else(|| format!("{}/{}", p.namespace, p.name))
            })
            .unwrap_or_else(|| format!("{}-{}-{started}", hostname(), std::process::id()));
        let mut base = Message::new("", Status::Init);
        base.kind = common.kind.clone();
        base.ports = ports.clone();
        base.public_hostname = identity.public_hostname;
        base.public_ipv4 = identity.public_ipv4;
        base.region = identity.region;
        base.instance_id = identity.instance_id;
        base.node = env("NODE_NAME");
        base.pod = pod;
        base.game = common.game.clone();
        base.tokens = common.tokens.clone();
        base.front_address = common.front_address.clone();
        Self { base, id }
    }

    pub(crate) fn message(&self, status: Status) -> Message {
        let mut m = self.base.clone();
        let name = serde_status(status);
        m.event_id = format!("{}:{name}", self.id);
        m.status = status;
        m.ts = spotable_fleet::inventory::now_rfc3339();
        m
    }
}

pub(crate) fn serde_status(s: Status) -> &'static str {
    match s {
        Status::Init => "init",
        Status::Ready => "ready",
        Status::Terminating => "terminating",
        Status::Terminated => "terminated",
        Status::Interrupted => "interrupted",
        Status::Moved => "moved",
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Inventory messages, sent in order by one background task, each with bounded retries, so a
/// slow or absent queue never holds up the game.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: Option<mpsc::UnboundedSender<Message>>,
    done: std::sync::Arc<tokio::sync::Notify>,
}

impl Outbox {
    pub(crate) async fn start(queue_url: Option<String>) -> Self {
        let done = std::sync::Arc::new(tokio::sync::Notify::new());
        let Some(url) = queue_url else {
            tracing::warn!("no --queue-url: inventory messages are not published");
            return Self { tx: None, done };
        };
        let publisher = Publisher::from_env(url).await;
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let notify = done.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                match publisher.send_with_retry(&m, Duration::from_secs(10)).await {
                    Ok(_) => tracing::info!(status = ?m.status, "inventory: published"),
                    Err(e) => tracing::warn!(error = %e, "inventory: message dropped"),
                }
            }
            notify.notify_one();
        });
        Self { tx: Some(tx), done }
    }

    pub(crate) fn send(&self, m: Message) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(m);
        }
    }

    /// Waits up to `bound` for queued messages to go out.
    pub(crate) async fn close(mut self, bound: Duration) {
        if self.tx.take().is_none() {
            return;
        }
        if tokio::time::timeout(bound, self.done.notified())
            .await
            .is_err()
        {
            tracing::warn!(?bound, "inventory: gave up waiting for the queue");
        }
    }
}
