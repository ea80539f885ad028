//! The few Kubernetes API calls a move needs, over plain REST: the wrapper does not pull in
//! the Kubernetes client (the fleet crate keeps it out on purpose). In a pod it speaks to
//! the API server with the pod's service account (`KUBERNETES_SERVICE_HOST`, its token and
//! CA); `--kube-api URL` points it elsewhere (a test's stand-in, `kubectl proxy`).
//!
//! - **Pads**: pods labelled `spotable.io/role=pad` and `spotable.io/game=<game>`, running and
//!   ready, on another node. A pad is claimed by creating the Lease `spotable-pad-<pod>`:
//!   the API server lets one creation through and answers 409 to the rest, so two wrappers
//!   moving at once never take the same pad. The pad renews the claim while it holds a game
//!   and deletes it when free; a claim left by a wrapper that died before using it lapses
//!   after [`CLAIM_FOR`], and is then taken over by an update that names the version read
//!   (one of two racing takers wins again).
//! - **The move**: the pad that took a game publishes an EndpointSlice of the game's Service
//!   naming its own address, annotated `spotable.io/moved-from` with the old one: the proxies
//!   follow it in place (only whoever may write EndpointSlices can say a replica moved).
//! - **Events** on the pods involved, for `kubectl describe`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

/// Label of a pad pod (`pad`) and of a game pod (`game`).
pub const ROLE: &str = "spotable.io/role";
/// Label naming the game (as the proxy's games are named).
pub const GAME: &str = "spotable.io/game";
/// Annotation on a pad pod: its migration port, when not 7100.
pub const MIGRATION_PORT: &str = "spotable.io/migration-port";
/// The EndpointSlice annotation the proxies read.
pub const MOVED_FROM: &str = "spotable.io/moved-from";
/// How long a claim holds without renewal.
pub const CLAIM_FOR: Duration = Duration::from_secs(60);
/// A pad's migration port unless annotated otherwise.
pub const DEFAULT_MIGRATION_PORT: u16 = 7100;

/// A client of one namespace of the API.
#[derive(Debug, Clone)]
pub struct Kube {
    base: String,
    token: Option<String>,
    namespace: String,
    http: reqwest::Client,
}

/// A pad found in the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PadPod {
    /// Its name.
    pub name: String,
    /// Where its migration port is.
    pub addr: SocketAddr,
    /// Its node.
    pub node: Option<String>,
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No API to speak to.
    #[error("no Kubernetes API: {0}")]
    Config(String),
    /// The request did not get an answer.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// An answer other than the one wanted.
    #[error("{method} {path}: {status} {body}")]
    Status {
        /// The verb.
        method: &'static str,
        /// The path.
        path: String,
        /// Its status.
        status: u16,
        /// The start of its body.
        body: String,
    },
}

impl Kube {
    /// The API at `url` (a test's stand-in, no credentials), or the cluster's when `None`.
    /// The namespace is `POD_NAMESPACE` (the downward API).
    pub fn new(url: Option<&str>) -> Result<Self, KubeError> {
        let namespace = std::env::var("POD_NAMESPACE")
            .map_err(|_| KubeError::Config("POD_NAMESPACE is not set".into()))?;
        // Any client is built on rustls, plain HTTP or not.
        spotable_fleet::ensure_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .no_proxy();
        let (base, token) = match url {
            Some(u) => (u.trim_end_matches('/').to_string(), None),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    KubeError::Config(
                        "not in a pod (no KUBERNETES_SERVICE_HOST); give --kube-api".into(),
                    )
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let dir = std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
                let token = std::fs::read_to_string(dir.join("token"))
                    .map_err(|e| KubeError::Config(format!("service account token: {e}")))?;
                let ca = std::fs::read(dir.join("ca.crt"))
                    .map_err(|e| KubeError::Config(format!("service account CA: {e}")))?;
                let cert = reqwest::Certificate::from_pem(&ca)?;
                builder = builder.add_root_certificate(cert);
                let host = match host.parse::<IpAddr>() {
                    Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
                    _ => host,
                };
                (
                    format!("https://{host}:{port}"),
                    Some(token.trim().to_string()),
                )
            }
        };
        Ok(Self {
            base,
            token,
            namespace,
            http: builder.build()?,
        })
    }

    async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), KubeError> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(&url),
            "POST" => self.http.post(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.patch(&url),
        };
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap_or_default());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    fn path(&self, api: &str, resource: &str) -> String {
        format!("{api}/namespaces/{}/{resource}", self.namespace)
    }

    /// The pads of `game` that can take a game now: running, ready, not on `not_on`.
    pub async fn pads(&self, game: &str, not_on: Option<&str>) -> Result<Vec<PadPod>, KubeError> {
        let path = format!(
            "{}?labelSelector={ROLE}%3Dpad%2C{GAME}%3D{game}",
            self.path("/api/v1", "pods")
        );
        let (status, list) = self.call("GET", &path, None).await?;
        if status != 200 {
            return Err(KubeError::Status {
                method: "GET",
                path,
                status,
                body: list.to_string().chars().take(200).collect(),
            });
        }
        let mut pads = Vec::new();
        for pod in list["items"].as_array().into_iter().flatten() {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let running = pod["status"]["phase"] == "Running";
            let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
            let node = pod["spec"]["nodeName"].as_str().map(String::from);
            let elsewhere = not_on.is_none_or(|n| node.as_deref() != Some(n));
            let Some(ip) = pod["status"]["podIP"]
                .as_str()
                .and_then(|i| i.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if !(ready && running && !deleting && elsewhere) {
                continue;
            }
            let port = pod["metadata"]["annotations"][MIGRATION_PORT]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or(DEFAULT_MIGRATION_PORT);
            pads.push(PadPod {
                name: pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                addr: SocketAddr::new(ip, port),
                node,
            });
        }
        pads.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pads)
    }

    /// Claims `pad` for `holder`: true when this call created its Lease (or took over one
    /// that lapsed), false when another wrapper holds it.
    pub async fn claim(&self, pad: &str, holder: &str) -> Result<bool, KubeError> {
        let path = self.path("/apis/coordination.k8s.io/v1", "leases");
        let now = micro_time(std::time::SystemTime::now());
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": lease_name(pad), "labels": {ROLE: "pad-claim"}},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": CLAIM_FOR.as_secs(),
                "acquireTime": now,
                "renewTime": now,
            },
        });
        match self.call("POST", &path, Some(&lease)).await? {
            (200..=299, _) => return Ok(true),
            (409, _) => {}
            (status, body) => return Err(status_error("POST", path, status, &body)),
        }
        let one = format!("{path}/{}", lease_name(pad));
        let (status, held) = self.call("GET", &one, None).await?;
        match status {
            200 => {}
            // Released in between: try once more from the start next time.
            404 => return Ok(false),
            _ => return Err(status_error("GET", one, status, &held)),
        }
        if !lapsed(&held, std::time::SystemTime::now()) {
            return Ok(false);
        }
        let Some(version) = held["metadata"]["resourceVersion"].as_str() else {
            return Ok(false);
        };
        let take = json!({
            "metadata": {"resourceVersion": version},
            "spec": {"holderIdentity": holder, "acquireTime": now, "renewTime": now},
        });
        match self.call("PATCH", &one, Some(&take)).await? {
            (200..=299, _) => {
                tracing::info!(pad, "took over a claim that had lapsed");
                Ok(true)
            }
            (409 | 404, _) => Ok(false),
            (status, body) => Err(status_error("PATCH", one, status, &body)),
        }
    }

    /// Renews the claim on `pad` (the pad, while it holds a game).
    pub async fn renew(&self, pad: &str) -> Result<(), KubeError> {
        let path = format!(
            "{}/{}",
            self.path("/apis/coordination.k8s.io/v1", "leases"),
            lease_name(pad)
        );
        let renew = json!({"spec": {"renewTime": micro_time(std::time::SystemTime::now())}});
        match self.call("PATCH", &path, Some(&renew)).await? {
            (200..=299, _) => Ok(()),
            (status, body) => Err(status_error("PATCH", path, status, &body)),
        }
    }

    /// Gives `pad` back (the move did not happen there, or its game is gone).
    pub async fn release(&self, pad: &str) -> Result<(), KubeError> {
        let path = format!(
            "{}/{}",
            self.path("/apis/coordination.k8s.io/v1", "leases"),
            lease_name(pad)
        );
        self.call("DELETE", &path, None).await.map(|_| ())
    }

    /// Publishes that the game at `from` now answers at `to`: an EndpointSlice of `service`
    /// naming `pod`, annotated [`MOVED_FROM`].
    pub async fn publish_move(
        &self,
        service: &str,
        pod: &str,
        from: &str,
        to: IpAddr,
        ports: &[(String, u16)],
    ) -> Result<(), KubeError> {
        let path = self.path("/apis/discovery.k8s.io/v1", "endpointslices");
        let name = moved_slice(service, pod);
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "spotable.io-wrapper",
                },
                "annotations": {MOVED_FROM: from},
            },
            "addressType": if to.is_ipv6() { "IPv6" } else { "IPv4" },
            "endpoints": [{
                "addresses": [to.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": self.namespace},
            }],
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "UDP"})).collect::<Vec<_>>(),
        });
        let (status, body) = self.call("POST", &path, Some(&slice)).await?;
        if (200..=299).contains(&status) {
            return Ok(());
        }
        if status == 409 {
            // Left over from an earlier game of this pad: replace it.
            self.call("DELETE", &format!("{path}/{name}"), None).await?;
            let (status, body) = self.call("POST", &path, Some(&slice)).await?;
            if (200..=299).contains(&status) {
                return Ok(());
            }
            return Err(KubeError::Status {
                method: "POST",
                path,
                status,
                body: body.to_string().chars().take(200).collect(),
            });
        }
        Err(KubeError::Status {
            method: "POST",
            path,
            status,
            body: body.to_string().chars().take(200).collect(),
        })
    }

    /// Withdraws what [`Self::publish_move`] published.
    pub async fn withdraw_move(&self, service: &str, pod: &str) -> Result<(), KubeError> {
        let path = format!(
            "{}/{}",
            self.path("/apis/discovery.k8s.io/v1", "endpointslices"),
            moved_slice(service, pod)
        );
        self.call("DELETE", &path, None).await.map(|_| ())
    }

    /// Records an Event on `pod` (best effort: an event lost is only a line less in
    /// `kubectl describe`).
    pub async fn event(&self, pod: &str, reason: &str, message: &str, warning: bool) {
        let path = self.path("/api/v1", "events");
        let now = spotable_fleet::inventory::now_rfc3339();
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{pod}.")},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": self.namespace},
            "reason": reason,
            "message": message,
            "type": if warning { "Warning" } else { "Normal" },
            "source": {"component": "spotable-wrapper"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        if let Err(e) = self.call("POST", &path, Some(&event)).await {
            tracing::debug!(error = %e, "cannot record an event");
        }
    }
}

fn status_error(method: &'static str, path: String, status: u16, body: &Value) -> KubeError {
    KubeError::Status {
        method,
        path,
        status,
        body: body.to_string().chars().take(200).collect(),
    }
}

/// A Lease's `MicroTime`.
fn micro_time(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Whether a Lease's holder has let it lapse: neither acquired nor renewed within its
/// duration. A Lease that cannot be read is held (never take what may be in use).
fn lapsed(lease: &Value, now: std::time::SystemTime) -> bool {
    let spec = &lease["spec"];
    let Some(duration) = spec["leaseDurationSeconds"].as_u64() else {
        return false;
    };
    let last = ["renewTime", "acquireTime"]
        .iter()
        .filter_map(|k| spec[*k].as_str())
        .filter_map(|t| humantime::parse_rfc3339_weak(t).ok())
        .max();
    last.is_some_and(|t| t + Duration::from_secs(duration) < now)
}

fn lease_name(pad: &str) -> String {
    format!("spotable-pad-{pad}")
}

fn moved_slice(service: &str, pod: &str) -> String {
    // EndpointSlice names are DNS subdomains of 253 characters at most.
    let mut name = format!("{service}-moved-{pod}");
    name.truncate(253);
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn lease(renewed: SystemTime, secs: u64) -> Value {
        json!({"spec": {
            "holderIdentity": "game-a",
            "leaseDurationSeconds": secs,
            "acquireTime": micro_time(renewed - Duration::from_secs(600)),
            "renewTime": micro_time(renewed),
        }})
    }

    #[test]
    fn a_claim_lapses_only_once_neither_acquired_nor_renewed_within_its_duration() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(!lapsed(&lease(t, 60), t + Duration::from_secs(59)));
        assert!(lapsed(&lease(t, 60), t + Duration::from_secs(61)));
        // What cannot be read is held: never take a pad that may be in use.
        assert!(!lapsed(&json!({"spec": {"holderIdentity": "x"}}), t));
        let mut odd = lease(t, 60);
        odd["spec"]["renewTime"] = json!("yesterday");
        odd["spec"]["acquireTime"] = json!(null);
        assert!(!lapsed(&odd, t + Duration::from_secs(3600)));
    }
}
