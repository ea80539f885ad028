//! Kubernetes discovery: watch a Service's EndpointSlices and publish its replicas.
//!
//! `kube`'s watcher lists, then watches from the list's resourceVersion, relists on 410 Gone
//! and resumes dropped watches; a reflector store holds the merged state. We publish only after
//! a complete list (`InitDone`) and on changes after it. While the API is unreachable nothing
//! is published, so the data plane keeps forwarding on the last known set.

use std::time::Duration;

use std::collections::HashMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::ExponentialBackoff;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};

use crate::config::{GameTemplate, GameWatch};
use crate::discovery::endpoints;
use crate::discovery::games::{self, GAME_LABEL, Member};
use crate::replicas::{Replica, ReplicaSet, ReplicaState};
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
                let moves = endpoints::moves(
                    slices.iter().map(AsRef::as_ref),
                    source.port_name.as_deref(),
                );
                let known = replicas.snapshot().moves.clone();
                for m in moves.iter().filter(|m| !known.contains(m)) {
                    tracing::info!(from = %m.from, to = %m.to, "a replica moved");
                }
                if replicas.publish_with_moves(found, moves) {
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

/// Follows the Services labelled [`GAME_LABEL`] and their EndpointSlices forever, publishing
/// their games into `replicas`.
pub async fn run_services(client: Client, watch: GameWatch, replicas: ReplicaSet) {
    let namespace = watch
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let (service_store, service_writer) = reflector::store::<Service>();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let service_events = watcher(services, watcher::Config::default().labels(GAME_LABEL))
        .backoff(backoff())
        .reflect(service_writer)
        .map(|e| (0, e.map(unit)));
    let slice_events = watcher(
        slices,
        watcher::Config::default().labels("kubernetes.io/service-name"),
    )
    .backoff(backoff())
    .reflect(slice_writer)
    .map(|e| (1, e.map(unit)));
    let events = futures::stream::select(service_events.boxed(), slice_events.boxed());
    let mut events = std::pin::pin!(events);
    tracing::info!(namespace, label = GAME_LABEL, "watching games' Services");
    let mut publisher = GamePublisher::new(watch.template, replicas, "Service");
    while let Some((stream, item)) = events.next().await {
        if !publisher.event(stream, item) {
            continue;
        }
        let services = service_store.state();
        let slices = slice_store.state();
        let mut by_service: HashMap<&str, Vec<&EndpointSlice>> = HashMap::new();
        for slice in &slices {
            if let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            {
                by_service.entry(service).or_default().push(slice);
            }
        }
        let mut notes = Vec::new();
        let members = services.iter().filter_map(|svc| {
            let name = svc.metadata.name.as_deref()?;
            let game = svc.metadata.labels.as_ref()?.get(GAME_LABEL)?;
            let (found, problems) = endpoints::replicas(
                by_service.get(name).into_iter().flatten().copied(),
                watch.port_name.as_deref(),
            );
            notes.extend(problems.iter().map(ToString::to_string));
            Some((
                Member {
                    object: format!("Service/{name}"),
                    game,
                    annotations: svc.metadata.annotations.as_ref(),
                },
                found,
            ))
        });
        let members: Vec<_> = members.collect();
        publisher.publish(members, notes);
    }
}

/// An event without its object: the publisher reads objects from the stores.
pub(crate) fn unit<K>(event: watcher::Event<K>) -> watcher::Event<()> {
    match event {
        watcher::Event::Apply(_) => watcher::Event::Apply(()),
        watcher::Event::Delete(_) => watcher::Event::Delete(()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(_) => watcher::Event::InitApply(()),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Publishes games from two or more watch streams: waits for every stream's first complete
/// list, tracks their health for the sync age, and logs the problems only when they change.
pub(crate) struct GamePublisher {
    template: GameTemplate,
    replicas: ReplicaSet,
    kind: &'static str,
    listed: Vec<bool>,
    failing: Vec<bool>,
    problems: Vec<String>,
    errors: metrics::Counter,
}

impl GamePublisher {
    pub(crate) fn new(template: GameTemplate, replicas: ReplicaSet, kind: &'static str) -> Self {
        Self {
            template,
            replicas,
            kind,
            listed: Vec::new(),
            failing: Vec::new(),
            problems: Vec::new(),
            errors: metrics::counter!(names::WATCH_ERRORS),
        }
    }

    /// Takes one item of stream `stream`; true when the games should be recomputed.
    pub(crate) fn event(
        &mut self,
        stream: usize,
        item: Result<watcher::Event<()>, watcher::Error>,
    ) -> bool {
        if self.listed.len() <= stream {
            self.listed.resize(stream + 1, false);
            self.failing.resize(stream + 1, false);
        }
        match item {
            Ok(event) => {
                self.failing[stream] = false;
                if !self.failing.iter().any(|f| *f) {
                    self.replicas.heard();
                }
                let changed = match event {
                    watcher::Event::InitDone => {
                        self.listed[stream] = true;
                        true
                    }
                    watcher::Event::Apply(()) | watcher::Event::Delete(()) => self.listed[stream],
                    // A (re)list is in progress: keep forwarding on the last complete set.
                    watcher::Event::Init | watcher::Event::InitApply(()) => false,
                };
                changed && self.listed.iter().all(|l| *l)
            }
            Err(e) => {
                self.failing[stream] = true;
                self.replicas.lost(std::time::Instant::now());
                self.errors.increment(1);
                tracing::warn!(error = %e, kind = self.kind, "game watch failed; retrying");
                false
            }
        }
    }

    /// Publishes the games `members` make; `notes` are problems found on the way.
    pub(crate) fn publish(&mut self, members: Vec<(Member<'_>, Vec<Replica>)>, notes: Vec<String>) {
        let (specs, problems) = games::games(members, &self.template);
        let mut problems: Vec<String> = notes
            .into_iter()
            .chain(problems.iter().map(ToString::to_string))
            .collect();
        problems.sort();
        problems.dedup();
        if problems != self.problems {
            for p in &problems {
                tracing::warn!("{p}");
            }
            self.problems = problems;
        }
        metrics::gauge!(names::GAME_PROBLEMS).set(self.problems.len() as f64);
        let count = specs.len();
        match self.replicas.publish_games(self.template.spec, specs) {
            Ok(true) => {
                let snapshot = self.replicas.snapshot();
                tracing::info!(
                    games = count,
                    ready = snapshot.count(ReplicaState::Ready),
                    draining = snapshot.count(ReplicaState::Draining),
                    version = snapshot.version,
                    "games changed"
                );
            }
            Ok(false) => {}
            // `games` settled every conflict; this would be a bug, and the last set stays.
            Err(e) => tracing::error!(error = %e, "games refused"),
        }
    }
}

/// 250 ms doubling to 10 s, jittered (backon, the workspace's one backoff): quick to come
/// back after a short API outage, gentle on an API server that stays down, and proxies that
/// lost the API together do not return together.
pub(crate) fn backoff() -> ExponentialBackoff {
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
