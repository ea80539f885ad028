//! Agones discovery: GameServers labelled `spotable.io/game` are the games' replicas.
//!
//! Agones allocates the address and port and reports them in `status`; its state machine says
//! when a GameServer can take players. A GameServer is a member while `Ready`, `Reserved` or
//! `Allocated`, and draining once it is being deleted or shut down (its pod terminating):
//! running sessions keep it, new ones do not pick it.

use std::net::{IpAddr, SocketAddr};

use futures::StreamExt;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};

use crate::config::GameWatch;
use crate::discovery::games::{GAME_LABEL, Member};
use crate::discovery::kubernetes::{GamePublisher, backoff, unit};
use crate::replicas::{Replica, ReplicaState};

/// `agones.dev/v1` `GameServer`.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("agones.dev", "v1", "GameServer"),
        "gameservers",
    )
}

/// The replica a GameServer is now, if any; `Err` says why one that should be cannot be used.
pub fn replica(gs: &DynamicObject, port_name: Option<&str>) -> Result<Option<Replica>, String> {
    let name = gs.metadata.name.as_deref().unwrap_or_default();
    let status = &gs.data["status"];
    let state = match status["state"].as_str().unwrap_or_default() {
        _ if gs.metadata.deletion_timestamp.is_some() => ReplicaState::Draining,
        "Shutdown" => ReplicaState::Draining,
        "Ready" | "Reserved" | "Allocated" => ReplicaState::Ready,
        // Scheduled, RequestReady, Unhealthy, Error, …: not (or no longer) serving.
        _ => return Ok(None),
    };
    let Some(address) = status["address"].as_str().filter(|a| !a.is_empty()) else {
        // A GameServer deleted before it was ever scheduled has no address: nothing to drain.
        return match state {
            ReplicaState::Draining => Ok(None),
            ReplicaState::Ready => Err(format!("GameServer/{name}: no status.address")),
        };
    };
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("GameServer/{name}: status.address {address:?} is not an IP"))?;
    let ports = status["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let port = match (port_name, ports) {
        (Some(wanted), _) => ports
            .iter()
            .find(|p| p["name"].as_str() == Some(wanted))
            .ok_or_else(|| format!("GameServer/{name}: no port named {wanted:?}"))?,
        (None, [one]) => one,
        (None, []) => return Err(format!("GameServer/{name}: no status.ports")),
        (None, _) => {
            return Err(format!(
                "GameServer/{name}: several ports; choose one with --port-name"
            ));
        }
    };
    let port = port["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("GameServer/{name}: port {port} is not a port number"))?;
    Ok(Some(Replica {
        addr: SocketAddr::new(ip, port),
        state,
    }))
}

/// Follows the GameServers labelled [`GAME_LABEL`] forever, publishing their games into
/// `replicas`.
pub async fn run(client: Client, watch: GameWatch, replicas: crate::replicas::ReplicaSet) {
    let namespace = watch
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let ar = resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &ar);
    let writer = reflector::store::Writer::new(ar);
    let store = writer.as_reader();
    let events = watcher(api, watcher::Config::default().labels(GAME_LABEL))
        .backoff(backoff())
        .reflect(writer)
        .map(|e| e.map(unit));
    let mut events = std::pin::pin!(events);
    tracing::info!(namespace, label = GAME_LABEL, "watching games' GameServers");
    let mut publisher = GamePublisher::new(watch.template, replicas, "GameServer");
    while let Some(item) = events.next().await {
        if !publisher.event(0, item) {
            continue;
        }
        let servers = store.state();
        let mut notes = Vec::new();
        let members = servers
            .iter()
            .filter_map(|gs| {
                let game = gs.metadata.labels.as_ref()?.get(GAME_LABEL)?;
                let name = gs.metadata.name.as_deref()?;
                let found = replica(gs, watch.port_name.as_deref())
                    .unwrap_or_else(|e| {
                        notes.push(e);
                        None
                    })
                    .into_iter()
                    .collect();
                Some((
                    Member {
                        object: format!("GameServer/{name}"),
                        game,
                        annotations: gs.metadata.annotations.as_ref(),
                    },
                    found,
                ))
            })
            .collect();
        publisher.publish(members, notes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gs(status: serde_json::Value, deleting: bool) -> DynamicObject {
        let mut object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "agones.dev/v1",
            "kind": "GameServer",
            "metadata": {"name": "gs-1", "labels": {GAME_LABEL: "arena"}},
            "status": status,
        }))
        .unwrap();
        if deleting {
            object.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
        }
        object
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn states_map_to_membership() {
        let status = |state: &str| json!({"state": state, "address": "10.0.0.7", "ports": [{"name": "default", "port": 7654}]});
        for (state, want) in [
            ("Ready", Some(ReplicaState::Ready)),
            ("Reserved", Some(ReplicaState::Ready)),
            ("Allocated", Some(ReplicaState::Ready)),
            ("Shutdown", Some(ReplicaState::Draining)),
            ("Scheduled", None),
            ("RequestReady", None),
            ("Unhealthy", None),
            ("Error", None),
        ] {
            let got = replica(&gs(status(state), false), None).unwrap();
            assert_eq!(got.map(|r| r.state), want, "{state}");
            if let Some(r) = got {
                assert_eq!(r.addr, addr("10.0.0.7:7654"));
            }
        }
        let deleting = replica(&gs(status("Allocated"), true), None).unwrap();
        assert_eq!(deleting.map(|r| r.state), Some(ReplicaState::Draining));
        let unscheduled = replica(&gs(json!({"state": "Creating"}), true), None).unwrap();
        assert_eq!(unscheduled, None);
    }

    #[test]
    fn ports_by_name_or_the_only_one_and_clear_errors() {
        let two = json!({"state": "Ready", "address": "fd00::7",
            "ports": [{"name": "game", "port": 7000}, {"name": "query", "port": 7001}]});
        assert_eq!(
            replica(&gs(two.clone(), false), Some("query"))
                .unwrap()
                .map(|r| r.addr),
            Some(addr("[fd00::7]:7001"))
        );
        assert_eq!(
            replica(&gs(two.clone(), false), None).unwrap_err(),
            "GameServer/gs-1: several ports; choose one with --port-name"
        );
        assert_eq!(
            replica(&gs(two, false), Some("voice")).unwrap_err(),
            "GameServer/gs-1: no port named \"voice\""
        );
        let bad = json!({"state": "Ready", "address": "node-1.example", "ports": [{"port": 1}]});
        assert!(
            replica(&gs(bad, false), None)
                .unwrap_err()
                .contains("is not an IP")
        );
        let none = json!({"state": "Ready"});
        assert_eq!(
            replica(&gs(none, false), None).unwrap_err(),
            "GameServer/gs-1: no status.address"
        );
    }
}
