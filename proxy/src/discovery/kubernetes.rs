//! Kubernetes discovery: watch a Service's EndpointSlices and publish its replicas.
//!
//! `kube`'s watcher lists, then watches from the list's resourceVersion, relists on 410 Gone
//! and resumes dropped watches; a reflector store holds the merged state. We publish only after
//! a complete list (`InitDone`) and on changes after it. While the API is unreachable nothing
//! is published, so the data plane keeps forwarding on the last known set.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::ExponentialBackoff;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};

use crate::discovery::endpoints;
use crate::replicas::{ReplicaSet, ReplicaState};
use crate::stats::names;

/// Which Service to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Namespace of the Service; `None` for the client's default (in-cluster: the pod's own).
    pub namespace: Option<String>,
    /// Service name (`kubernetes.io/service-name` label of its slices).
    pub service: String,
    /// Port to use, by name; `None` for the only (UDP) port.
    pub port_name: Option<String>,
}

/// The Kubernetes API could not be reached or configured.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// Neither in-cluster nor kubeconfig settings could be loaded.
    #[error("cannot find Kubernetes settings (in-cluster or KUBECONFIG): {0}")]
    Config(#[from] kube::config::InferConfigError),
    /// The client could not be built from them.
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from the in-cluster service account, or `KUBECONFIG` / `~/.kube/config`.
pub async fn client() -> Result<Client, KubernetesError> {
    let config = kube::Config::infer().await?;
    Ok(Client::try_from(config)?)
}

/// Follows `source` forever, publishing into `replicas`.
pub async fn run(client: Client, source: Source, replicas: ReplicaSet) {
    let namespace = source
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let selector = format!("kubernetes.io/service-name={}", source.service);
    let config = watcher::Config::default().labels(&selector);
    let (store, writer) = reflector::store::<EndpointSlice>();
    let stream = watcher(api, config).backoff(backoff()).reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let errors = metrics::counter!(names::WATCH_ERRORS);
    let mut listed = false;
    tracing::info!(
        namespace,
        service = source.service,
        "watching EndpointSlices"
    );
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                replicas.heard();
                match event {
                    watcher::Event::InitDone => listed = true,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) if listed => {}
                    // A (re)list is in progress: keep forwarding on the last complete set.
                    _ => continue,
                }
                let slices = store.state();
                let (found, problems) = endpoints::replicas(
                    slices.iter().map(AsRef::as_ref),
                    source.port_name.as_deref(),
                );
                for p in problems {
                    tracing::warn!("{p}");
                }
                if replicas.publish(found) {
                    let snapshot = replicas.snapshot();
                    tracing::info!(
                        ready = snapshot.count(ReplicaState::Ready),
                        draining = snapshot.count(ReplicaState::Draining),
                        version = snapshot.version,
                        "replica set changed"
                    );
                }
            }
            Err(e) => {
                replicas.lost(std::time::Instant::now());
                errors.increment(1);
                tracing::warn!(error = %e, "EndpointSlice watch failed; retrying");
            }
        }
    }
}

/// 250 ms doubling to 10 s, jittered (backon, the workspace's one backoff): quick to come
/// back after a short API outage, gentle on an API server that stays down, and proxies that
/// lost the API together do not return together.
fn backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
        .without_max_times()
        .into()
}

const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut b = backoff();
        let d: Vec<_> = b.by_ref().take(8).collect();
        assert!(d[0] >= Duration::from_millis(250) && d[0] <= Duration::from_millis(500));
        assert!(d[1] >= Duration::from_millis(500));
        assert!(d[7] >= BACKOFF_MAX && d[7] <= BACKOFF_MAX * 2);
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(500));
    }
}
