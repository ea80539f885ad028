//! The live fleet, as the inventory queue tells it: one row per game server.
//!
//! SQS cannot be browsed without consuming it (a FIFO queue returns nothing more from a group
//! while earlier messages are in flight), so by default this reader is the queue's consumer:
//! it deletes what it reads and keeps the fleet in a state file, so every run shows the whole
//! fleet. With `--peek` it leaves the messages to the real consumer (a matchmaker) and only
//! reads them under a short visibility timeout.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use spotable_fleet::inventory::{Message, Status};

/// What is known of one game server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// Last status.
    pub status: Status,
    /// `host:port` players connect to.
    pub address: String,
    /// Kubernetes node.
    pub node: Option<String>,
    /// When it first reported (RFC 3339).
    pub since: String,
    /// When it last reported (RFC 3339).
    pub updated: String,
    /// Game type.
    pub kind: Option<String>,
    /// The game it is a replica of (behind a token-routing proxy).
    #[serde(default)]
    pub game: Option<String>,
}

/// All servers, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    /// Server id → state.
    pub servers: BTreeMap<String, Server>,
}

impl Fleet {
    /// Reads the state file; a missing file is an empty fleet.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }

    /// Folds one message in. Game-server messages update their server; an agent's
    /// `interrupted` marks every running server on that node.
    pub fn apply(&mut self, m: &Message) {
        if m.status == Status::Interrupted {
            for s in self.servers.values_mut() {
                if s.node.is_some() && s.node == m.node && s.status != Status::Terminated {
                    s.status = Status::Interrupted;
                    s.updated = m.ts.clone();
                }
            }
            return;
        }
        if m.status == Status::Moved
            && let Some(from) = m.moved_from.as_ref().and_then(|f| f.pod.as_ref())
        {
            // The game went on elsewhere: its old server is done.
            let old = format!("{}/{}", from.namespace, from.name);
            if let Some(s) = self.servers.get_mut(&old) {
                s.status = Status::Terminated;
                s.updated = m.ts.clone();
            }
        }
        let id = server_id(m);
        let host = m
            .public_hostname
            .clone()
            .or_else(|| m.public_ipv4.clone())
            .unwrap_or_else(|| "?".into());
        let port = m
            .ports
            .get("game")
            .or_else(|| m.ports.values().next())
            .map_or_else(|| "?".to_string(), |p| p.port.to_string());
        let entry = self.servers.entry(id).or_insert_with(|| Server {
            status: m.status,
            address: String::new(),
            node: None,
            since: m.ts.clone(),
            updated: m.ts.clone(),
            kind: None,
            game: None,
        });
        // Messages can arrive out of order (a standard queue, a redelivery, clocks that agree
        // to the second): never move a server backwards, in time or, within one second, in
        // its lifecycle.
        if (m.ts.as_str(), lifecycle(m.status)) >= (entry.updated.as_str(), lifecycle(entry.status))
        {
            entry.status = m.status;
            entry.updated = m.ts.clone();
        }
        // Behind the proxy, players use its address (and the game's token).
        entry.address = m
            .front_address
            .clone()
            .unwrap_or_else(|| format!("{host}:{port}"));
        entry.game = m.game.clone().or(entry.game.take());
        entry.node = m.node.clone().or(entry.node.take());
        entry.kind = m.kind.clone().or(entry.kind.take());
    }

    /// Servers still in play (terminated ones are dropped once they are `keep` old).
    pub fn prune(&mut self, now: SystemTime, keep: Duration) {
        self.servers.retain(|_, s| {
            s.status != Status::Terminated
                || humantime::parse_rfc3339_weak(&s.updated)
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_none_or(|age| age < keep)
        });
    }

    /// A table: one row per server.
    pub fn table(&self, now: SystemTime) -> String {
        let mut out = format!(
            "{:<28} {:<12} {:<16} {:<28} {:<20} {:>8}\n",
            "SERVER", "STATUS", "GAME", "ADDRESS", "NODE", "AGE"
        );
        for (id, s) in &self.servers {
            let age = humantime::parse_rfc3339_weak(&s.since)
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .map_or_else(|| "?".into(), format_age);
            let status = serde_json::to_value(s.status)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<28} {:<12} {:<16} {:<28} {:<20} {:>8}\n",
                id,
                status,
                s.game.as_deref().unwrap_or("-"),
                s.address,
                s.node.as_deref().unwrap_or("-"),
                age
            ));
        }
        out
    }
}

/// A status's place in a server's life.
fn lifecycle(s: Status) -> u8 {
    match s {
        Status::Init => 0,
        Status::Ready | Status::Moved => 1,
        Status::Interrupted => 2,
        Status::Terminating => 3,
        Status::Terminated => 4,
    }
}

/// A server's id: its pod, or the event id without its status suffix.
pub fn server_id(m: &Message) -> String {
    match &m.pod {
        Some(p) => format!("{}/{}", p.namespace, p.name),
        None => m
            .event_id
            .rsplit_once(':')
            .map_or(m.event_id.clone(), |(id, _)| id.to_string()),
    }
}

fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spotable_fleet::inventory::{PodRef, Port, Proto};

    fn msg(pod: &str, status: Status, ts: &str) -> Message {
        let mut m = Message::new(format!("{pod}:{status:?}"), status);
        m.pod = Some(PodRef {
            namespace: "games".into(),
            name: pod.into(),
            uid: None,
        });
        m.node = Some("node-1".into());
        m.public_ipv4 = Some("203.0.113.7".into());
        m.ports.insert(
            "game".into(),
            Port {
                port: 7001,
                proto: Proto::Udp,
            },
        );
        m.ts = ts.into();
        m
    }

    #[test]
    fn folds_steps_interruptions_and_prunes() {
        let mut f = Fleet::default();
        f.apply(&msg("a", Status::Init, "2026-11-24T08:00:00Z"));
        f.apply(&msg("a", Status::Ready, "2026-11-24T08:00:05Z"));
        f.apply(&msg("b", Status::Ready, "2026-11-24T08:00:05Z"));
        f.apply(&msg("b", Status::Terminated, "2026-11-24T08:01:00Z"));
        // Late arrivals never move a server back: an older message, or an earlier step of
        // the same second.
        f.apply(&msg("b", Status::Ready, "2026-11-24T08:00:30Z"));
        f.apply(&msg("c", Status::Ready, "2026-11-24T08:00:05Z"));
        f.apply(&msg("c", Status::Init, "2026-11-24T08:00:05Z"));
        assert_eq!(f.servers["games/c"].status, Status::Ready);
        let mut interrupted = Message::new("spot:terminate:x", Status::Interrupted);
        interrupted.node = Some("node-1".into());
        interrupted.ts = "2026-11-24T08:02:00Z".into();
        f.apply(&interrupted);
        assert_eq!(f.servers["games/a"].status, Status::Interrupted);
        assert_eq!(f.servers["games/a"].address, "203.0.113.7:7001");
        assert_eq!(
            f.servers["games/b"].status,
            Status::Terminated,
            "not resurrected"
        );
        let now = humantime::parse_rfc3339("2026-11-24T08:10:00Z").unwrap();
        f.prune(now, Duration::from_secs(300));
        assert!(!f.servers.contains_key("games/b"));
        let table = f.table(now);
        assert!(table.contains("games/a"));
        assert!(table.contains("interrupted"));
        assert!(table.contains("10m"));
    }
}
