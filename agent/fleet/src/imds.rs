//! EC2 instance metadata (IMDS) client, shared by the agent and the wrapper.
//!
//! IMDSv2 first: a session token from `PUT /latest/api/token` (TTL header), refreshed before it
//! expires and renewed once on a 401. When no token can be had (old instances, a hop limit of
//! 1 seen from a container), it falls back to IMDSv1 plain GETs. Short timeouts and a few
//! jittered retries: metadata is local, and an agent stuck on it would miss its deadline.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::clock::Clock;

/// Header carrying the token.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Header asking for a token lifetime.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// What went wrong talking to IMDS.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// No answer (connection refused, timeout) after the retries.
    #[error("instance metadata unreachable at {url}: {reason}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Last error.
        reason: String,
    },
    /// An unexpected HTTP status.
    #[error("instance metadata answered {status} for {url}")]
    Status {
        /// What was asked.
        url: String,
        /// The status.
        status: u16,
    },
    /// A body that is not what the documentation describes.
    #[error("unexpected instance metadata at {path}: {reason}")]
    Parse {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
}

/// IMDS client settings.
#[derive(Debug, Clone)]
pub struct ImdsConfig {
    /// Base URL, `http://169.254.169.254` on EC2.
    pub endpoint: String,
    /// Lifetime asked for tokens.
    pub token_ttl: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Attempts per request (timeouts and 5xx are retried).
    pub attempts: u32,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://169.254.169.254".into(),
            token_ttl: Duration::from_secs(21_600),
            timeout: Duration::from_secs(2),
            attempts: 3,
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    refresh_at: Instant,
}

/// Which protocol the last request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Token-based.
    V2,
    /// Plain GETs (no token could be had).
    V1,
}

/// A metadata client.
#[derive(Debug)]
pub struct Imds {
    config: ImdsConfig,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
    last_version: Mutex<Option<Version>>,
    clock: Clock,
}

/// `spot/instance-action`: the two-minute warning.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SpotAction {
    /// `terminate`, `stop` or `hibernate`.
    pub action: String,
    /// When it happens, RFC 3339.
    pub time: String,
}

/// `events/recommendations/rebalance`: elevated risk of interruption.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Rebalance {
    /// When the recommendation was made, RFC 3339.
    #[serde(rename = "noticeTime")]
    pub notice_time: String,
}

/// One `events/maintenance/scheduled` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduledEvent {
    /// `system-reboot`, `instance-stop`, …
    pub code: String,
    /// Stable id.
    pub event_id: String,
    /// `active`, `completed`, `canceled`.
    pub state: String,
    /// Earliest start, e.g. `21 Jan 2019 09:00:43 GMT`.
    #[serde(default)]
    pub not_before: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// Who this instance is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `i-…`.
    pub instance_id: Option<String>,
    /// `eu-west-1`.
    pub region: Option<String>,
    /// Public DNS name, when the instance has one.
    pub public_hostname: Option<String>,
    /// Public IPv4, when the instance has one.
    pub public_ipv4: Option<String>,
}

impl Imds {
    /// A client for `config.endpoint`.
    pub fn new(config: ImdsConfig) -> Result<Self, ImdsError> {
        crate::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .no_proxy()
            .build()
            .map_err(|e| ImdsError::Unreachable {
                url: config.endpoint.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            config,
            http,
            token: Mutex::new(None),
            last_version: Mutex::new(None),
            clock: Clock::system(),
        })
    }

    /// Reads token lifetimes off `clock` instead of the system's (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The protocol the last successful request used.
    pub fn last_version(&self) -> Option<Version> {
        *self.last_version.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/latest/{}",
            self.config.endpoint.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    /// A valid token, fetching one if needed; `None` when IMDSv2 is not available.
    async fn token(&self, force: bool) -> Option<String> {
        if !force
            && let Some(t) = self
                .token
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            && self.clock.now() < t.refresh_at
        {
            return Some(t.value.clone());
        }
        let ttl = self.config.token_ttl.as_secs().clamp(1, 21_600);
        let url = self.url("api/token");
        let mut pauses = retry_pauses();
        for _ in 0..self.config.attempts.max(1) {
            let sent = self
                .http
                .put(&url)
                .header(TTL_HEADER, ttl.to_string())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let Ok(value) = r.text().await else { continue };
                    // Refresh when a quarter of the lifetime is left (at most a minute early).
                    let margin = Duration::from_secs(ttl)
                        .div_f64(4.0)
                        .min(Duration::from_secs(60));
                    let refresh_at = self.clock.now() + Duration::from_secs(ttl) - margin;
                    *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(Token {
                        value: value.clone(),
                        refresh_at,
                    });
                    return Some(value);
                }
                // 5xx: worth another try; 4xx (403 disabled, 404/405 no v2): fall back.
                Ok(r) if r.status().is_server_error() => {}
                Ok(_) => return None,
                Err(_) => {}
            }
            pause(&mut pauses).await;
        }
        None
    }

    /// `GET /latest/<path>`: `Ok(None)` on 404.
    pub async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let url = self.url(path);
        let mut token = self.token(false).await;
        let mut renewed = false;
        let mut last = String::new();
        let mut attempt = 0;
        let mut pauses = retry_pauses();
        while attempt < self.config.attempts.max(1) {
            let mut req = self.http.get(&url);
            if let Some(t) = &token {
                req = req.header(TOKEN_HEADER, t);
            }
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    match status {
                        200 => {
                            let body = r.text().await.map_err(|e| ImdsError::Unreachable {
                                url: url.clone(),
                                reason: e.to_string(),
                            })?;
                            let v = if token.is_some() {
                                Version::V2
                            } else {
                                Version::V1
                            };
                            *self.last_version.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
                            return Ok(Some(body));
                        }
                        404 => return Ok(None),
                        // Token expired or revoked: one new token, then try again.
                        401 if !renewed => {
                            renewed = true;
                            token = self.token(true).await;
                            continue;
                        }
                        s if s >= 500 => last = format!("status {s}"),
                        _ => return Err(ImdsError::Status { url, status }),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            pause(&mut pauses).await;
            attempt += 1;
        }
        Err(ImdsError::Unreachable { url, reason: last })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, ImdsError> {
        match self.get(path).await? {
            None => Ok(None),
            Some(body) => serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| ImdsError::Parse {
                    path: path.into(),
                    reason: e.to_string(),
                }),
        }
    }

    /// The pending spot interruption, if any.
    pub async fn spot_action(&self) -> Result<Option<SpotAction>, ImdsError> {
        self.get_json("meta-data/spot/instance-action").await
    }

    /// The pending rebalance recommendation, if any.
    pub async fn rebalance(&self) -> Result<Option<Rebalance>, ImdsError> {
        self.get_json("meta-data/events/recommendations/rebalance")
            .await
    }

    /// Scheduled maintenance events still to come (`active`).
    pub async fn scheduled_events(&self) -> Result<Vec<ScheduledEvent>, ImdsError> {
        let all: Vec<ScheduledEvent> = self
            .get_json("meta-data/events/maintenance/scheduled")
            .await?
            .unwrap_or_default();
        Ok(all.into_iter().filter(|e| e.state == "active").collect())
    }

    /// Instance id, region and public address; missing items stay `None`.
    pub async fn identity(&self) -> Result<Identity, ImdsError> {
        let text = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        Ok(Identity {
            instance_id: text(self.get("meta-data/instance-id").await?),
            region: text(self.get("meta-data/placement/region").await?),
            public_hostname: text(self.get("meta-data/public-hostname").await?),
            public_ipv4: text(self.get("meta-data/public-ipv4").await?),
        })
    }
}

/// 100 ms, 200 ms, 400 ms… (jittered, at most 3.2 s) between attempts at the metadata service.
fn retry_pauses() -> impl Iterator<Item = Duration> {
    crate::backoff::pauses(Duration::from_millis(100), Duration::from_millis(3200))
}

async fn pause(pauses: &mut impl Iterator<Item = Duration>) {
    tokio::time::sleep(pauses.next().unwrap_or(Duration::from_millis(100))).await;
}
