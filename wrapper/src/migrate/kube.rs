//! The few Kubernetes API calls a move needs, over plain REST: the wrapper does not pull in
//! the Kubernetes client (the fleet crate keeps it out on purpose). In a pod it speaks to
//! the API server with the pod's service account (`KUBERNETES_SERVICE_HOST`, its token and
//! CA); `--kube-api URL` points it elsewhere (a test's stand-in, `kubectl proxy`).
//!
//! - **Pads**: pods labelled `spotable.io/role=pad` and `spotable.io/game=<game>`, running and
//!   ready, on another node. A pad is claimed by creating the Lease `spotable-pad-<pod>`:
//!   the API server lets one creation through and answers 409 to the rest, so two wrappers
//!   moving at once never take the same pad.
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

    /// Claims `pad` for `holder`: true when this call created its Lease, false when another
    /// wrapper holds it.
    pub async fn claim(&self, pad: &str, holder: &str) -> Result<bool, KubeError> {
        let path = self.path("/apis/coordination.k8s.io/v1", "leases");
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": lease_name(pad), "labels": {ROLE: "pad-claim"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 600},
        });
        match self.call("POST", &path, Some(&lease)).await? {
            (200..=299, _) => Ok(true),
            (409, _) => Ok(false),
            (status, body) => Err(KubeError::Status {
                method: "POST",
                path,
                status,
                body: body.to_string().chars().take(200).collect(),
            }),
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

fn lease_name(pad: &str) -> String {
    format!("spotable-pad-{pad}")
}

fn moved_slice(service: &str, pod: &str) -> String {
    // EndpointSlice names are DNS subdomains of 253 characters at most.
    let mut name = format!("{service}-moved-{pod}");
    name.truncate(253);
    name
}
