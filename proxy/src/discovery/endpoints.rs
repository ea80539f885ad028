//! From EndpointSlices to replicas: pure, deterministic, unit-tested.
//!
//! Kubernetes' rules, as the EndpointSlice API documents them: an unset `ready` means ready,
//! an unset `serving` means the same as `ready`, an unset `terminating` means not terminating;
//! the first address of an endpoint is the one to use.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};

use crate::replicas::{Move, Replica, ReplicaState};

/// Annotation on an EndpointSlice that a landing pad publishes for the game it took over:
/// the address (`IP:PORT`, comma-separated for several) of the replica its endpoint replaces.
/// Only whoever may write EndpointSlices in the namespace (RBAC) can say a replica moved, so
/// no player or game server can steer sessions to an address of its choice.
pub const MOVED_FROM: &str = "spotable.io/moved-from";

/// Why a slice contributed nothing (worth a log line, never fatal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceProblem {
    /// The slice has no port of the configured name.
    #[error("slice {slice} has no port named {name:?}")]
    NoSuchPort {
        /// The slice.
        slice: String,
        /// The name asked for.
        name: String,
    },
    /// Several ports and no `--port-name` to choose.
    #[error("slice {slice} has several ports ({names}); choose one with --port-name")]
    Ambiguous {
        /// The slice.
        slice: String,
        /// The ports' names.
        names: String,
    },
    /// No port at all.
    #[error("slice {slice} has no port")]
    NoPort {
        /// The slice.
        slice: String,
    },
    /// Address type we cannot send to (FQDN).
    #[error("slice {slice} has address type {kind}; only IPv4 and IPv6 are used")]
    AddressType {
        /// The slice.
        slice: String,
        /// The type.
        kind: String,
    },
}

/// Maps an endpoint's conditions to its replica state; `None` means not a member.
pub fn state(conditions: Option<&EndpointConditions>) -> Option<ReplicaState> {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    match (terminating, serving, ready) {
        (true, true, _) => Some(ReplicaState::Draining),
        (true, false, _) => None,
        (false, _, true) => Some(ReplicaState::Ready),
        (false, _, false) => None,
    }
}

/// The UDP port to use from `slice`: the one named `port_name`, or the only one (a lone UDP
/// port wins over TCP ports when no name is given).
pub fn port(slice: &EndpointSlice, port_name: Option<&str>) -> Result<u16, SliceProblem> {
    let name = slice.metadata.name.clone().unwrap_or_default();
    let ports = slice.ports.as_deref().unwrap_or_default();
    let valid = |p: &&k8s_openapi::api::discovery::v1::EndpointPort| {
        p.port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
    };
    let chosen = match port_name {
        Some(wanted) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(wanted))
            .ok_or_else(|| SliceProblem::NoSuchPort {
                slice: name.clone(),
                name: wanted.to_string(),
            })?,
        None => {
            let udp: Vec<_> = ports
                .iter()
                .filter(|p| p.protocol.as_deref() == Some("UDP"))
                .collect();
            match (udp.as_slice(), ports) {
                ([one], _) => *one,
                ([], [one]) => one,
                ([], []) => return Err(SliceProblem::NoPort { slice: name }),
                _ => {
                    let names = ports
                        .iter()
                        .map(|p| p.name.as_deref().unwrap_or("<unnamed>"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(SliceProblem::Ambiguous { slice: name, names });
                }
            }
        }
    };
    valid(&chosen).ok_or(SliceProblem::NoPort { slice: name })
}

/// Every replica of a service, merged over all its slices. Problems are reported, not fatal:
/// one bad slice must not empty the set. The same address in two slices (during a slice
/// hand-over) collapses to one entry, `Ready` winning, when the set is published.
pub fn replicas<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: Option<&str>,
) -> (Vec<Replica>, Vec<SliceProblem>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for slice in slices {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            other => {
                problems.push(SliceProblem::AddressType {
                    slice: name,
                    kind: other.to_string(),
                });
                continue;
            }
        };
        let port = match port(slice, port_name) {
            Ok(p) => p,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        for endpoint in &slice.endpoints {
            let Some(state) = state(endpoint.conditions.as_ref()) else {
                continue;
            };
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|ip| ip.is_ipv6() == v6)
            else {
                continue;
            };
            out.push(Replica {
                addr: SocketAddr::new(ip, port),
                state,
            });
        }
    }
    (out, problems)
}

/// The replicas that moved, from the slices annotated [`MOVED_FROM`]: each old address to
/// the slice's (first) live endpoint on its port. Unreadable annotations are skipped.
pub fn moves<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: Option<&str>,
) -> Vec<Move> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(from) = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MOVED_FROM))
        else {
            continue;
        };
        let Ok(port) = port(slice, port_name) else {
            continue;
        };
        let to = slice.endpoints.iter().find_map(|e| {
            state(e.conditions.as_ref())?;
            let ip = e.addresses.first()?.parse::<IpAddr>().ok()?;
            Some(SocketAddr::new(ip, port))
        });
        let Some(to) = to else { continue };
        out.extend(
            from.split(',')
                .filter_map(|a| a.trim().parse::<SocketAddr>().ok())
                .filter(|f| *f != to)
                .map(|from| Move { from, to }),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cond(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> EndpointConditions {
        EndpointConditions {
            ready,
            serving,
            terminating,
        }
    }

    fn ep(ip: &str, c: Option<EndpointConditions>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_string()],
            conditions: c,
            ..Default::default()
        }
    }

    #[test]
    fn a_pads_slice_says_which_replica_it_replaces() {
        let mut pad = slice(
            "game-moved-pad-1",
            "IPv4",
            vec![udp(None, 7777)],
            vec![ep("10.0.2.9", None)],
        );
        pad.metadata.annotations = Some(
            [(MOVED_FROM.to_string(), "10.0.1.5:7777, bogus".to_string())]
                .into_iter()
                .collect(),
        );
        let plain = slice(
            "game-1",
            "IPv4",
            vec![udp(None, 7777)],
            vec![ep("10.0.1.5", None)],
        );
        let m = moves([&plain, &pad], None);
        assert_eq!(
            m,
            vec![Move {
                from: "10.0.1.5:7777".parse().unwrap(),
                to: "10.0.2.9:7777".parse().unwrap()
            }]
        );
        // A pad whose game is not serving any more moves nothing.
        pad.endpoints[0].conditions = Some(cond(Some(false), Some(false), Some(true)));
        assert!(moves([&pad], None).is_empty());
    }

    fn udp(name: Option<&str>, port: i32) -> EndpointPort {
        EndpointPort {
            name: name.map(String::from),
            port: Some(port),
            protocol: Some("UDP".into()),
            ..Default::default()
        }
    }

    fn slice(
        name: &str,
        kind: &str,
        ports: Vec<EndpointPort>,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: kind.into(),
            endpoints,
            ports: Some(ports),
        }
    }

    #[test]
    fn conditions_map_to_states() {
        use ReplicaState::{Draining, Ready};
        assert_eq!(state(None), Some(Ready), "no conditions: ready");
        assert_eq!(state(Some(&cond(None, None, None))), Some(Ready));
        assert_eq!(
            state(Some(&cond(Some(true), Some(true), Some(false)))),
            Some(Ready)
        );
        assert_eq!(
            state(Some(&cond(Some(false), None, None))),
            None,
            "not ready"
        );
        assert_eq!(
            state(Some(&cond(Some(false), Some(false), Some(false)))),
            None
        );
        assert_eq!(
            state(Some(&cond(Some(false), Some(true), Some(true)))),
            Some(Draining),
            "serving and terminating"
        );
        assert_eq!(
            state(Some(&cond(Some(false), Some(false), Some(true)))),
            None
        );
        assert_eq!(
            state(Some(&cond(None, None, Some(true)))),
            Some(Draining),
            "serving defaults to ready"
        );
    }

    #[test]
    fn port_by_name_or_the_only_one() {
        let two = slice(
            "s",
            "IPv4",
            vec![udp(Some("game"), 7777), udp(Some("query"), 27015)],
            vec![],
        );
        assert_eq!(port(&two, Some("game")), Ok(7777));
        assert_eq!(port(&two, Some("query")), Ok(27015));
        assert!(matches!(
            port(&two, Some("rcon")),
            Err(SliceProblem::NoSuchPort { .. })
        ));
        assert!(matches!(
            port(&two, None),
            Err(SliceProblem::Ambiguous { .. })
        ));
        let one = slice("s", "IPv4", vec![udp(None, 7777)], vec![]);
        assert_eq!(port(&one, None), Ok(7777));
        let mixed = slice(
            "s",
            "IPv4",
            vec![
                EndpointPort {
                    name: Some("http".into()),
                    port: Some(8080),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                udp(Some("game"), 7777),
            ],
            vec![],
        );
        assert_eq!(port(&mixed, None), Ok(7777), "the lone UDP port");
        let none = slice("s", "IPv4", vec![], vec![]);
        assert!(matches!(
            port(&none, None),
            Err(SliceProblem::NoPort { .. })
        ));
        let bad = slice("s", "IPv4", vec![udp(None, 70000)], vec![]);
        assert!(matches!(port(&bad, None), Err(SliceProblem::NoPort { .. })));
    }

    #[test]
    fn slices_merge_across_families_and_skip_what_cannot_be_used() {
        let draining = cond(Some(false), Some(true), Some(true));
        let gone = cond(Some(false), Some(false), Some(true));
        let a = slice(
            "game-a",
            "IPv4",
            vec![udp(Some("game"), 7777)],
            vec![
                ep("10.0.0.1", None),
                ep("10.0.0.2", Some(draining)),
                ep("10.0.0.3", Some(gone)),
            ],
        );
        let b = slice(
            "game-b",
            "IPv6",
            vec![udp(Some("game"), 7777)],
            vec![ep("fd00::1", None)],
        );
        let fqdn = slice(
            "game-c",
            "FQDN",
            vec![udp(Some("game"), 7777)],
            vec![ep("x.example", None)],
        );
        let noport = slice(
            "game-d",
            "IPv4",
            vec![udp(Some("other"), 1)],
            vec![ep("10.0.0.9", None)],
        );
        let (mut replicas, problems) = replicas([&a, &b, &fqdn, &noport], Some("game"));
        replicas.sort();
        assert_eq!(
            replicas,
            vec![
                Replica::ready("10.0.0.1:7777".parse().unwrap()),
                Replica {
                    addr: "10.0.0.2:7777".parse().unwrap(),
                    state: ReplicaState::Draining
                },
                Replica::ready("[fd00::1]:7777".parse().unwrap()),
            ]
        );
        assert_eq!(problems.len(), 2);
    }

    #[test]
    fn malformed_addresses_are_skipped() {
        let s = slice(
            "s",
            "IPv4",
            vec![udp(None, 7777)],
            vec![
                ep("not-an-ip", None),
                ep("fd00::1", None),
                Endpoint::default(),
            ],
        );
        assert_eq!(replicas([&s], None).0, vec![]);
    }
}
