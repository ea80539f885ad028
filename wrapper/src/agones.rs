//! The Agones SDK, through the sidecar's HTTP API (`AGONES_SDK_HTTP_PORT` on localhost):
//! `ready` once the game holds its ports, `health` while it runs, `shutdown` when it exits.
//! Without these calls Agones marks the GameServer Unhealthy and never allocates it.

use std::time::Duration;

use spotable_core::loglimit::LogLimit;
use spotable_fleet::backoff;

/// The SDK's default HTTP port, when `AGONES_SDK_HTTP_PORT` is unset.
pub const DEFAULT_PORT: u16 = 9358;

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The sidecar could not be reached or answered with an error.
    #[error("Agones SDK {call}: {reason}")]
    Call {
        /// `/ready`, `/health`, …
        call: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// `AGONES_SDK_HTTP_PORT` is not a port.
    #[error("AGONES_SDK_HTTP_PORT={0:?} is not a port number")]
    Port(String),
}

/// A client of the local SDK sidecar.
#[derive(Debug, Clone)]
pub struct Sdk {
    http: reqwest::Client,
    base: String,
}

impl Sdk {
    /// A client for `http://localhost:$AGONES_SDK_HTTP_PORT` (9358 when unset).
    pub fn from_env() -> Result<Self, SdkError> {
        let port = match std::env::var("AGONES_SDK_HTTP_PORT") {
            Ok(p) if !p.is_empty() => p.parse::<u16>().map_err(|_| SdkError::Port(p))?,
            _ => DEFAULT_PORT,
        };
        Self::new(port)
    }

    /// A client for the sidecar on `port`.
    pub fn new(port: u16) -> Result<Self, SdkError> {
        spotable_fleet::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .map_err(|e| SdkError::Call {
                call: "client",
                reason: e.to_string(),
            })?;
        Ok(Self {
            http,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// One call: `POST {path}` with `{}`, as the SDK's REST gateway expects.
    pub async fn call(&self, path: &'static str) -> Result<(), SdkError> {
        let fail = |reason: String| SdkError::Call { call: path, reason };
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let body = response.text().await.unwrap_or_default();
            Err(fail(format!("{status}: {}", body.trim())))
        }
    }

    /// `call` until it succeeds or `within` has passed (the sidecar may still be starting).
    pub async fn call_until(&self, path: &'static str, within: Duration) -> Result<(), SdkError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut pauses = backoff::pauses(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            match self.call(path).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "Agones SDK call failed; retrying");
                    let pause = pauses.next().unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause))
                        .await;
                }
            }
        }
    }

    /// Reports health every `every` until dropped (abort the task to stop). A failed report
    /// is logged, at most once per minute, and the next one tried on time: Agones counts
    /// missed reports itself.
    pub async fn health_loop(self, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warnings = LogLimit::new(Duration::from_secs(60));
        loop {
            ticks.tick().await;
            if let Err(e) = self.call("/health").await
                && let Some(held) = warnings.hit(tokio::time::Instant::now().into_std())
            {
                tracing::warn!(error = %e, held, "Agones health report failed");
            }
        }
    }
}
