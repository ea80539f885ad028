//! Cordon, taint and drain a node through the Kubernetes API.
//!
//! Evictions go through the Eviction API, so PodDisruptionBudgets are honoured, with each
//! pod's own grace period. An eviction the budget refuses (429) is retried until the deadline
//! is close; then the pod is deleted with whatever grace still fits, because the node is
//! going away regardless and a graceful stop beats a hard one.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

/// Taint placed on an interrupted node.
pub const TAINT_KEY: &str = "spotable.io/interrupted";
/// How close to the deadline a PDB-blocked eviction turns into a delete (beyond its grace).
pub const DELETE_MARGIN: Duration = Duration::from_secs(5);
/// Pause between eviction attempts refused by a budget.
pub const EVICT_RETRY: Duration = Duration::from_secs(1);

/// What became of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOutcome {
    /// Evicted through the Eviction API.
    Evicted,
    /// The budget kept refusing; deleted with this grace near the deadline.
    Deleted {
        /// Grace period given.
        grace_seconds: u32,
    },
    /// Already gone.
    Gone,
    /// Not done before the deadline (or an API error); the reason.
    Failed(String),
    /// Dry run: what would have happened.
    WouldEvict,
}

impl PodOutcome {
    /// Metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            PodOutcome::Evicted => "evicted",
            PodOutcome::Deleted { .. } => "deleted",
            PodOutcome::Gone => "gone",
            PodOutcome::Failed(_) => "failed",
            PodOutcome::WouldEvict => "dry_run",
        }
    }
}

/// Whether a pod is ours to move: not owned by a DaemonSet, not a static (mirror) pod, not
/// finished, not already being deleted.
pub fn should_drain(pod: &Pod) -> bool {
    let meta = &pod.metadata;
    let daemonset = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet");
    let mirror = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !(daemonset || mirror || finished || meta.deletion_timestamp.is_some())
}

/// The pod's own termination grace period (Kubernetes' default is 30 s).
pub fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Node operations for one node.
#[derive(Clone)]
pub struct Drainer {
    client: Client,
    node: String,
    dry_run: bool,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("node", &self.node)
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

impl Drainer {
    /// Operations on `node`; with `dry_run`, reads only and logs what it would change.
    pub fn new(client: Client, node: impl Into<String>, dry_run: bool) -> Self {
        Self {
            client,
            node: node.into(),
            dry_run,
        }
    }

    /// The node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Marks the node unschedulable and taints it `NoSchedule`, keeping its other taints.
    ///
    /// The patch carries the `resourceVersion` the taints were read at, so a taint that another
    /// controller (NTH, Karpenter, the node lifecycle controller) adds in between is never
    /// overwritten: the API answers 409 and the caller reads again and retries.
    pub async fn cordon(&self, reason: &str) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes.get(&self.node).await?;
        let version = node.metadata.resource_version.clone();
        let mut taints: Vec<Taint> = node
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.key != TAINT_KEY)
            .collect();
        taints.push(Taint {
            key: TAINT_KEY.into(),
            value: Some(reason.into()),
            effect: "NoSchedule".into(),
            time_added: None,
        });
        if self.dry_run {
            tracing::info!(node = self.node, reason, "dry run: would cordon and taint");
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "spec": {"unschedulable": true, "taints": taints},
        });
        nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(node = self.node, reason, "cordoned and tainted");
        Ok(())
    }

    /// The node's pods that a drain moves.
    pub async fn pods(&self) -> Result<Vec<Pod>, kube::Error> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", self.node)))
            .await?;
        Ok(list.items.into_iter().filter(should_drain).collect())
    }

    /// Evicts every pod of the node in parallel, finishing by `deadline`.
    pub async fn drain(
        &self,
        deadline: SystemTime,
    ) -> Result<Vec<(String, PodOutcome)>, kube::Error> {
        let pods = self.pods().await?;
        let jobs = pods.into_iter().map(|pod| async move {
            let name = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            let outcome = self.evict(&pod, deadline).await;
            tracing::info!(pod = name, outcome = ?outcome, "drain");
            (name, outcome)
        });
        Ok(futures::future::join_all(jobs).await)
    }

    async fn evict(&self, pod: &Pod, deadline: SystemTime) -> PodOutcome {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        if self.dry_run {
            tracing::info!(pod = %format!("{ns}/{name}"), "dry run: would evict");
            return PodOutcome::WouldEvict;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let grace = grace_of(pod);
        loop {
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let err = match api.evict(&name, &EvictParams::default()).await {
                Ok(_) => return PodOutcome::Evicted,
                Err(e) => e,
            };
            match api_code(&err) {
                Some(404) => return PodOutcome::Gone,
                Some(429) if left <= grace + DELETE_MARGIN => {
                    // The budget still says no and the node is about to vanish.
                    let fit = left.saturating_sub(Duration::from_secs(1)).min(grace);
                    let grace_seconds = u32::try_from(fit.as_secs()).unwrap_or(u32::MAX);
                    let params = DeleteParams {
                        grace_period_seconds: Some(grace_seconds),
                        ..DeleteParams::default()
                    };
                    return match api.delete(&name, &params).await {
                        Ok(_) => PodOutcome::Deleted { grace_seconds },
                        Err(e) if api_code(&e) == Some(404) => PodOutcome::Gone,
                        Err(e) => PodOutcome::Failed(e.to_string()),
                    };
                }
                _ if left.is_zero() => return PodOutcome::Failed(err.to_string()),
                _ => {
                    tracing::debug!(pod = %format!("{ns}/{name}"), error = %err, "eviction refused; retrying");
                    tokio::time::sleep(EVICT_RETRY.min(left)).await;
                }
            }
        }
    }
}

/// A client for draining. kube retries 429 responses by itself by default; for evictions a 429
/// is the disruption budget speaking, and only the drain loop knows the deadline, so that
/// retry is turned off here.
pub fn client(mut config: kube::Config) -> Result<Client, kube::Error> {
    config.default_retry = false;
    Client::try_from(config)
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn which_pods_a_drain_moves() {
        assert!(should_drain(&pod()));
        let mut ds = pod();
        ds.metadata.owner_references = Some(vec![OwnerReference {
            kind: "DaemonSet".into(),
            name: "agent".into(),
            api_version: "apps/v1".into(),
            uid: "u".into(),
            ..Default::default()
        }]);
        assert!(!should_drain(&ds));
        let mut mirror = pod();
        mirror.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_string(), "x".to_string())].into());
        assert!(!should_drain(&mirror));
        let mut done = pod();
        done.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert!(!should_drain(&done));
        let mut deleting = pod();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(!should_drain(&deleting));
    }

    #[test]
    fn grace_defaults_to_thirty_seconds() {
        assert_eq!(grace_of(&pod()), Duration::from_secs(30));
        let mut p = pod();
        p.spec = Some(PodSpec {
            termination_grace_period_seconds: Some(90),
            ..Default::default()
        });
        assert_eq!(grace_of(&p), Duration::from_secs(90));
    }
}
