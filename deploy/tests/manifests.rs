//! Checks over every rendered overlay and the AWS files: least privilege, pod hardening, the
//! game server's spread, and that every flag in a manifest is one the binary accepts (parsed
//! with the binaries' own clap definitions). kubectl comes from the fixtures' Python environment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::{Args as _, Parser};
use serde_json::Value;
use spotable_deploy::{
    argv, containers, deploy_dir, expand_env_refs, id, items, overlays, pod_specs, read_yaml,
    render, str_at,
};

fn kubectl() -> std::path::PathBuf {
    spotable_fixtures::tools::path("kubectl").unwrap_or_else(|e| panic!("{e}"))
}

fn rendered() -> BTreeMap<String, Vec<Value>> {
    let names = overlays();
    assert!(
        names.len() >= 6,
        "expected the standard, init-container, host-network, agones, queue-mode and many-games \
         overlays: {names:?}"
    );
    let kubectl = kubectl();
    names
        .into_iter()
        .map(|n| {
            let objects = render(&kubectl, &n).unwrap_or_else(|e| panic!("{e}"));
            assert!(!objects.is_empty(), "{n} renders nothing");
            (n, objects)
        })
        .collect()
}

fn all_pods(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .flat_map(|o| pod_specs(o).into_iter().map(move |p| (id(o), p)))
        .collect()
}

fn strings(v: Option<&Value>) -> BTreeSet<String> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Parses a command line with the clap definition of the program it runs.
fn check_argv(argv: &[String]) -> Result<(), String> {
    let program = argv
        .first()
        .ok_or("empty command")?
        .rsplit('/')
        .next()
        .unwrap_or_default();
    match program {
        "spotable-proxy" => {
            use spotable_proxy::config::{Args, Config};
            let args =
                Args::parse_layers(argv.iter().map(Into::into)).map_err(|e| e.to_string())?;
            Config::resolve(args).map(drop).map_err(|e| e.to_string())
        }
        "spotable-agent" => spotable_agent::cli::Args::try_parse_from(argv)
            .map(drop)
            .map_err(|e| e.to_string()),
        "spotable-wrapper" => {
            spotable_wrapper::cli::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            // The game command after `--`, as the wrapper will run it.
            match argv.iter().position(|a| a == "--") {
                Some(i) => {
                    let vars = vec![
                        ("SERVER_PORT".to_string(), "7777".to_string()),
                        ("SPOTABLE_PORT_GAME".to_string(), "7777".to_string()),
                    ];
                    let game: Vec<String> = argv[i + 1..]
                        .iter()
                        .map(|a| {
                            spotable_wrapper::expand::expand(a.as_ref(), &vars)
                                .to_string_lossy()
                                .into_owned()
                        })
                        .collect();
                    check_argv(&game)
                }
                None => Ok(()),
            }
        }
        "spotable-bench" => {
            let cmd = clap::Command::new("spotable-bench").subcommand(
                spotable_fixtures::replica::ReplicaArgs::augment_args(clap::Command::new(
                    "replica",
                )),
            );
            match cmd.try_get_matches_from(argv) {
                Ok(m) if m.subcommand_name() == Some("replica") => Ok(()),
                Ok(_) => Err("the game must be `spotable-bench replica`".into()),
                Err(e) => Err(e.to_string()),
            }
        }
        // `sh -c '. env && exec PROGRAM ARGS'`: check what is exec'd, with the env file's
        // variables filled in.
        "sh" if argv.get(1).map(String::as_str) == Some("-c") => {
            let script = argv.get(2).ok_or("sh -c without a script")?;
            let exec = script
                .split("exec ")
                .nth(1)
                .ok_or("sh -c script without exec")?;
            let words: Vec<String> = exec
                .split_whitespace()
                .map(|w| w.replace(['"', '\''], "").replace("$SERVER_PORT", "7777"))
                .collect();
            check_argv(&words)
        }
        other => Err(format!("unknown program {other:?}")),
    }
}

/// The command a container runs: its own `command`, or the entrypoint of a Spotable image.
fn container_argv(c: &Value) -> Vec<String> {
    let mut v: Vec<String> = argv(c).iter().map(|a| expand_env_refs(a, c)).collect();
    if c.get("command").is_none() {
        let image = str_at(c, "/image");
        let entry = ["spotable-proxy", "spotable-agent", "spotable-wrapper"]
            .into_iter()
            .find(|b| image.contains(&format!("/{b}:")))
            .or_else(|| {
                (image.contains("/spotable-game-demo:")
                    || image.contains("/spotable-game-demo-migrate:"))
                .then_some("spotable-wrapper")
            });
        if let Some(entry) = entry {
            v.insert(0, entry.to_string());
        }
    }
    v
}

#[test]
fn the_flag_check_rejects_what_the_binaries_reject() {
    let ok = |a: &[&str]| check_argv(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(
        ok(&[
            "spotable-proxy",
            "--listen=0.0.0.0:7777",
            "--replica=10.0.0.1:1"
        ])
        .is_ok()
    );
    assert!(ok(&["spotable-proxy", "--listen=0.0.0.0:7777", "--no-such-flag"]).is_err());
    // Parses, but the proxy's own validation refuses it (no replica source).
    assert!(ok(&["spotable-proxy", "--listen=0.0.0.0:7777"]).is_err());
    assert!(ok(&["spotable-agent", "--node-name=n", "--rebalance=explode"]).is_err());
    assert!(
        ok(&[
            "spotable-wrapper",
            "--",
            "spotable-bench",
            "replica",
            "--nope"
        ])
        .is_err()
    );
    assert!(
        ok(&[
            "spotable-wrapper",
            "--",
            "spotable-bench",
            "replica",
            "--listen=0.0.0.0:${SERVER_PORT}"
        ])
        .is_ok()
    );
    assert!(ok(&["sh", "-c", "exec spotable-bench replica --port 1"]).is_err());
}

#[test]
fn every_flag_in_the_manifests_is_accepted_by_its_binary() {
    let mut checked = 0;
    for (overlay, objects) in rendered() {
        for (owner, pod) in all_pods(&objects) {
            for c in containers(pod) {
                let argv = container_argv(c);
                let name = str_at(c, "/name");
                check_argv(&argv).unwrap_or_else(|e| {
                    panic!("{overlay}: {owner} container {name}: {argv:?}: {e}")
                });
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "only {checked} containers checked");
}

#[test]
fn rbac_has_no_wildcard_and_grants_exactly_what_is_used() {
    for (overlay, objects) in rendered() {
        let mut roles = 0;
        for o in &objects {
            let kind = str_at(o, "/kind");
            if kind != "Role" && kind != "ClusterRole" {
                continue;
            }
            roles += 1;
            let rules = items(o, "/rules");
            assert!(!rules.is_empty(), "{overlay}: {} has no rules", id(o));
            let mut grants = BTreeSet::new();
            for r in rules {
                for key in [
                    "apiGroups",
                    "resources",
                    "verbs",
                    "resourceNames",
                    "nonResourceURLs",
                ] {
                    assert!(
                        !strings(r.get(key)).iter().any(|s| s.contains('*')),
                        "{overlay}: wildcard in {} {key}",
                        id(o)
                    );
                }
                for g in strings(r.get("apiGroups")) {
                    for res in strings(r.get("resources")) {
                        for v in strings(r.get("verbs")) {
                            grants.insert(format!("{g}/{res}:{v}"));
                        }
                    }
                }
            }
            let expected = match (kind, str_at(o, "/metadata/name")) {
                ("Role", "spotable-proxy") if overlay == "many-games" => set(&[
                    "discovery.k8s.io/endpointslices:get",
                    "discovery.k8s.io/endpointslices:list",
                    "discovery.k8s.io/endpointslices:watch",
                    "/services:get",
                    "/services:list",
                    "/services:watch",
                ]),
                ("Role", "spotable-proxy") => set(&[
                    "discovery.k8s.io/endpointslices:get",
                    "discovery.k8s.io/endpointslices:list",
                    "discovery.k8s.io/endpointslices:watch",
                ]),
                ("ClusterRole", "spotable-agent") => set(&[
                    "/nodes:get",
                    "/nodes:patch",
                    "/pods:list",
                    "/pods:delete",
                    "/pods/eviction:create",
                    "events.k8s.io/events:create",
                    "events.k8s.io/events:patch",
                ]),
                ("ClusterRole", "spotable-agent-queue") => set(&[
                    "/nodes:get",
                    "/nodes:list",
                    "/nodes:patch",
                    "/pods:list",
                    "/pods:delete",
                    "/pods/eviction:create",
                    "events.k8s.io/events:create",
                    "events.k8s.io/events:patch",
                ]),
                ("Role", "spotable-game-migrate") if overlay == "migrate" => set(&[
                    "/pods:list",
                    "coordination.k8s.io/leases:create",
                    "coordination.k8s.io/leases:get",
                    "coordination.k8s.io/leases:patch",
                    "coordination.k8s.io/leases:delete",
                    "/events:create",
                ]),
                ("Role", "spotable-landing-pad") if overlay == "migrate" => set(&[
                    "discovery.k8s.io/endpointslices:create",
                    "discovery.k8s.io/endpointslices:delete",
                    "coordination.k8s.io/leases:patch",
                    "coordination.k8s.io/leases:delete",
                    "/events:create",
                ]),
                _ => panic!("{overlay}: unexpected role {}", id(o)),
            };
            assert_eq!(grants, expected, "{overlay}: {}", id(o));
        }
        assert!(roles >= 1, "{overlay}: no RBAC at all");
    }
}

/// What a container that moves games with CRIU needs (measured; the `migrate` overlay).
const MOVE_CAPS: &[&str] = &[
    "CHECKPOINT_RESTORE",
    "SYS_PTRACE",
    "SYS_ADMIN",
    "SYS_TIME",
    "SYS_CHROOT",
    "SETPCAP",
    "NET_ADMIN",
];

/// Whether a container moves games: a wrapper with `--migrate`, or a landing pad.
fn moves_games(c: &Value) -> bool {
    let argv = container_argv(c);
    argv.first().is_some_and(|p| p == "spotable-wrapper")
        && (argv.iter().any(|a| a == "--migrate") || argv.get(1).is_some_and(|a| a == "land"))
}

#[test]
fn every_container_is_non_root_hardened_and_requests_resources() {
    for (overlay, objects) in rendered() {
        for (owner, pod) in all_pods(&objects) {
            let pod_ctx = pod.get("securityContext");
            for c in containers(pod) {
                let name = str_at(c, "/name");
                let at = format!("{overlay}: {owner} container {name}");
                let field = |k: &str| {
                    c.pointer(&format!("/securityContext/{k}"))
                        .or_else(|| pod_ctx.and_then(|p| p.get(k)))
                };
                let added = strings(c.pointer("/securityContext/capabilities/add"));
                if overlay == "migrate" && moves_games(c) {
                    // CRIU runs as root: with exactly the capabilities a move was measured
                    // to need (the migration tests run under the same list) and no more.
                    assert_eq!(added, set(MOVE_CAPS), "{at}: capabilities");
                    assert_eq!(field("runAsUser").and_then(Value::as_u64), Some(0), "{at}");
                } else {
                    assert_eq!(
                        field("runAsNonRoot"),
                        Some(&Value::Bool(true)),
                        "{at}: runAsNonRoot"
                    );
                    let uid = field("runAsUser").and_then(Value::as_u64);
                    assert!(uid.is_some_and(|u| u > 0), "{at}: runAsUser {uid:?}");
                    assert!(added.is_empty(), "{at}: adds capabilities {added:?}");
                }
                assert_eq!(
                    c.pointer("/securityContext/allowPrivilegeEscalation"),
                    Some(&Value::Bool(false)),
                    "{at}: allowPrivilegeEscalation"
                );
                assert_eq!(
                    c.pointer("/securityContext/readOnlyRootFilesystem"),
                    Some(&Value::Bool(true)),
                    "{at}: readOnlyRootFilesystem"
                );
                assert!(
                    strings(c.pointer("/securityContext/capabilities/drop")).contains("ALL"),
                    "{at}: capabilities not dropped"
                );
                for r in ["cpu", "memory"] {
                    assert!(
                        c.pointer(&format!("/resources/requests/{r}")).is_some(),
                        "{at}: no {r} request"
                    );
                }
                assert!(
                    c.pointer("/resources/limits/memory").is_some(),
                    "{at}: no memory limit"
                );
            }
        }
    }
}

#[test]
fn game_server_copies_never_share_a_node_and_spread_over_zones() {
    for (overlay, objects) in rendered() {
        let games = game_workloads(&objects);
        let expected = if overlay == "many-games" { 2 } else { 1 };
        assert_eq!(games.len(), expected, "{overlay}: game-server workloads");
        for game in games {
            game_copies_are_spread(&overlay, game);
        }
        if overlay == "migrate" {
            pads_wait_apart_from_the_game(&objects);
        }
    }
}

/// The game-server workloads (`game-server`, or `game-server-<game>` per game).
fn game_workloads(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| str_at(o, "/metadata/name").starts_with("game-server"))
        .filter(|o| !pod_specs(o).is_empty())
        .collect()
}

fn game_copies_are_spread(overlay: &str, game: &Value) {
    {
        let pod = pod_specs(game)[0];
        let at = format!("{overlay}: {}", id(game));
        let replicas = game.pointer("/spec/replicas").and_then(Value::as_u64);
        // Migration keeps one copy: the pads, not a second copy, carry it over a notice.
        let copies = if overlay == "migrate" { 1 } else { 2 };
        assert_eq!(
            replicas,
            Some(copies),
            "{at}: the documented default of {copies} copies"
        );
        assert_eq!(str_at(pod, "/nodeSelector/lifecycle"), "spot", "{at}");
        let spread: BTreeMap<String, String> = items(pod, "/topologySpreadConstraints")
            .iter()
            .map(|c| {
                (
                    str_at(c, "/topologyKey").to_string(),
                    str_at(c, "/whenUnsatisfiable").to_string(),
                )
            })
            .collect();
        assert_eq!(
            spread.get("kubernetes.io/hostname").map(String::as_str),
            Some("DoNotSchedule"),
            "{at}: spread over nodes"
        );
        assert!(
            spread.contains_key("topology.kubernetes.io/zone"),
            "{at}: spread over zones"
        );
        let anti = items(
            pod,
            "/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
        )
        .to_vec();
        let labels = pod_labels(game);
        assert!(
            anti.iter().any(|t| {
                str_at(t, "/topologyKey") == "kubernetes.io/hostname"
                    && selects(t.pointer("/labelSelector/matchLabels"), &labels)
            }),
            "{at}: no required anti-affinity per node that selects its own pods"
        );
        // The pod is gone before the 120 s spot deadline, and the wrapper's own SIGKILL
        // comes before the kubelet's.
        let tgp = pod
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(30);
        assert!(tgp < 120, "{at}: grace period {tgp}s reaches the reclaim");
        for c in containers(pod) {
            if let Some(grace) = argv(c).iter().find_map(|a| a.strip_prefix("--grace=")) {
                let grace = parse_secs(grace);
                assert!(grace < tgp, "{at}: wrapper --grace {grace}s ≥ pod's {tgp}s");
            }
        }
    }
}

/// Landing pads: never on a game's node, never an endpoint of the game until they hold it,
/// spread over zones, and given the game's grace period (a pad that holds a game is it).
fn pads_wait_apart_from_the_game(objects: &[Value]) {
    let pads = objects
        .iter()
        .find(|o| str_at(o, "/metadata/name") == "landing-pads")
        .expect("migrate: a landing-pads Deployment");
    let game = objects
        .iter()
        .find(|o| {
            str_at(o, "/kind") == "Deployment" && str_at(o, "/metadata/name") == "game-server"
        })
        .expect("migrate: the game");
    let (pad_labels, game_labels) = (pod_labels(pads), pod_labels(game));
    assert_eq!(
        pad_labels.get("spotable.io/role").map(String::as_str),
        Some("pad")
    );
    assert_eq!(
        pad_labels.get("spotable.io/game"),
        game_labels.get("spotable.io/game"),
        "a pad names the game it waits for"
    );
    let pod = pod_specs(pads)[0];
    let anti = items(
        pod,
        "/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
    );
    assert!(
        anti.iter()
            .any(|t| str_at(t, "/topologyKey") == "kubernetes.io/hostname"
                && selects(t.pointer("/labelSelector/matchLabels"), &game_labels)),
        "pads must never share a node with the game"
    );
    let service = objects
        .iter()
        .find(|o| str_at(o, "/kind") == "Service" && str_at(o, "/metadata/name") == "game-server")
        .expect("the game's Service");
    let selector = service.pointer("/spec/selector");
    assert!(
        selects(selector, &game_labels),
        "the Service selects the game"
    );
    assert!(
        !selects(selector, &pad_labels),
        "a waiting pad is no endpoint of the game"
    );
    let grace = |p: &Value| {
        p.get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64)
    };
    assert_eq!(grace(pod), grace(pod_specs(game)[0]));
}

fn parse_secs(s: &str) -> u64 {
    s.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("grace {s:?} is not in seconds"))
}

fn pod_labels(workload: &Value) -> BTreeMap<String, String> {
    let pointer = if str_at(workload, "/kind") == "Fleet" {
        "/spec/template/spec/template/metadata/labels"
    } else {
        "/spec/template/metadata/labels"
    };
    workload
        .pointer(pointer)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

fn selects(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector.and_then(Value::as_object) else {
        return false;
    };
    !sel.is_empty()
        && sel
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

#[test]
fn the_proxy_finds_its_game_and_runs_highly_available() {
    for (overlay, objects) in rendered() {
        let Some(proxy) = objects
            .iter()
            .find(|o| str_at(o, "/kind") == "Deployment" && id(o).ends_with("/spotable-proxy"))
        else {
            assert_eq!(
                overlay, "host-network",
                "only direct mode runs without the proxy"
            );
            continue;
        };
        let at = format!("{overlay}: {}", id(proxy));
        let ns = str_at(proxy, "/metadata/namespace");
        let pod = pod_specs(proxy)[0];
        assert!(
            proxy
                .pointer("/spec/replicas")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                >= 2,
            "{at}"
        );
        assert_eq!(str_at(pod, "/nodeSelector/lifecycle"), "ondemand", "{at}");
        let c = containers(pod)[0];
        assert_eq!(str_at(c, "/readinessProbe/httpGet/path"), "/readyz", "{at}");
        let annotations = proxy.pointer("/spec/template/metadata/annotations");
        assert_eq!(
            annotations.and_then(|a| a.get("prometheus.io/scrape")),
            Some(&Value::String("true".into())),
            "{at}"
        );
        let labels = pod_labels(proxy);
        assert!(
            objects
                .iter()
                .any(|o| str_at(o, "/kind") == "PodDisruptionBudget"
                    && selects(o.pointer("/spec/selector/matchLabels"), &labels)),
            "{at}: no PodDisruptionBudget"
        );
        let lb = objects
            .iter()
            .find(|o| {
                str_at(o, "/kind") == "Service"
                    && str_at(o, "/spec/type") == "LoadBalancer"
                    && selects(o.pointer("/spec/selector"), &labels)
            })
            .unwrap_or_else(|| panic!("{at}: no LoadBalancer Service"));
        assert!(
            str_at(
                lb,
                "/metadata/annotations/service.beta.kubernetes.io~1aws-load-balancer-type"
            ) == "external",
            "{at}: not an NLB"
        );
        let ports = items(lb, "/spec/ports");
        assert!(
            !ports.is_empty() && ports.iter().all(|p| str_at(p, "/protocol") == "UDP"),
            "{at}: player ports are UDP"
        );
        let args = container_argv(c);
        let flag = |f: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("--{f}=")))
                .unwrap_or_else(|| panic!("{at}: no --{f}"))
                .to_string()
        };
        let port = flag("port-name");
        // Each Service the proxy follows is in its namespace, has the --port-name port and
        // selects exactly one game's pods.
        let services: Vec<&Value> = if args.iter().any(|a| a == "--kubernetes-games") {
            games_of(&at, &objects, ns, &flag("token-bytes"))
        } else {
            // --kubernetes-service names one Service.
            let svc = flag("kubernetes-service");
            vec![
                objects
                    .iter()
                    .find(|o| {
                        str_at(o, "/kind") == "Service"
                            && str_at(o, "/metadata/name") == svc
                            && str_at(o, "/metadata/namespace") == ns
                    })
                    .unwrap_or_else(|| panic!("{at}: Service {ns}/{svc} not rendered")),
            ]
        };
        for service in services {
            let svc = id(service);
            assert!(
                items(service, "/spec/ports")
                    .iter()
                    .any(|p| str_at(p, "/name") == port),
                "{at}: {svc} has no port {port}"
            );
            let selected: Vec<_> = game_workloads(&objects)
                .into_iter()
                .filter(|g| selects(service.pointer("/spec/selector"), &pod_labels(g)))
                .collect();
            assert_eq!(
                selected.len(),
                1,
                "{at}: {svc} must select one game-server workload's pods"
            );
        }
    }
}

/// With --kubernetes-games: the Services labelled as games in `ns`. Each has tokens of the
/// proxy's length that no other game claims, and its pods carry the same label and
/// annotation, which their wrapper publishes through the downward API.
fn games_of<'a>(at: &str, objects: &'a [Value], ns: &str, token_bytes: &str) -> Vec<&'a Value> {
    let token_bytes: usize = token_bytes
        .parse()
        .unwrap_or_else(|e| panic!("{at}: --token-bytes={token_bytes}: {e}"));
    let games: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            str_at(o, "/kind") == "Service"
                && str_at(o, "/metadata/namespace") == ns
                && !str_at(o, "/metadata/labels/spotable.io~1game").is_empty()
        })
        .collect();
    assert!(games.len() >= 2, "{at}: many games, found {}", games.len());
    let mut owners = BTreeMap::new();
    for g in &games {
        let name = str_at(g, "/metadata/labels/spotable.io~1game");
        let tokens = str_at(g, "/metadata/annotations/spotable.io~1tokens");
        assert!(!tokens.is_empty(), "{at}: {} has no tokens", id(g));
        for t in tokens.split(',') {
            let bytes = spotable_proxy::token::parse_token(t.trim())
                .unwrap_or_else(|e| panic!("{at}: {}: {e}", id(g)));
            assert_eq!(bytes.len(), token_bytes, "{at}: token {t} of {}", id(g));
            if let Some(other) = owners.insert(bytes, name) {
                panic!("{at}: token {t} of both {other} and {name}");
            }
        }
        for w in game_workloads(objects) {
            if selects(g.pointer("/spec/selector"), &pod_labels(w)) {
                let template = w
                    .pointer("/spec/template/metadata")
                    .unwrap_or_else(|| panic!("{at}: {} has no pod template", id(w)));
                assert_eq!(str_at(template, "/labels/spotable.io~1game"), name);
                assert_eq!(
                    str_at(template, "/annotations/spotable.io~1tokens"),
                    tokens,
                    "{at}: {} publishes other tokens than the proxy routes",
                    id(w)
                );
            }
        }
    }
    games
}

#[test]
fn references_resolve_within_the_render() {
    for (overlay, objects) in rendered() {
        let have = |kind: &str, ns: &str, name: &str| {
            objects.iter().any(|o| {
                str_at(o, "/kind") == kind
                    && str_at(o, "/metadata/name") == name
                    && (ns.is_empty() || str_at(o, "/metadata/namespace") == ns)
            })
        };
        for o in &objects {
            let ns = str_at(o, "/metadata/namespace");
            if !ns.is_empty() {
                assert!(
                    have("Namespace", "", ns),
                    "{overlay}: {} in a missing namespace",
                    id(o)
                );
            }
            for pod in pod_specs(o) {
                let sa = str_at(pod, "/serviceAccountName");
                assert!(
                    sa.is_empty() || have("ServiceAccount", ns, sa),
                    "{overlay}: {} uses missing ServiceAccount {sa}",
                    id(o)
                );
                for c in containers(pod) {
                    for from in items(c, "/envFrom").iter() {
                        let cm = str_at(from, "/configMapRef/name");
                        assert!(
                            cm.is_empty() || have("ConfigMap", ns, cm),
                            "{overlay}: {} uses missing ConfigMap {cm}",
                            id(o)
                        );
                    }
                }
            }
            if str_at(o, "/kind").ends_with("RoleBinding") {
                for s in items(o, "/subjects").iter() {
                    assert!(
                        have(
                            "ServiceAccount",
                            str_at(s, "/namespace"),
                            str_at(s, "/name")
                        ),
                        "{overlay}: {} binds a missing account",
                        id(o)
                    );
                }
            }
        }
    }
}

#[test]
fn the_agent_runs_on_every_spot_node_with_metadata_access() {
    for (overlay, objects) in rendered() {
        let queue = objects.iter().find(|o| {
            str_at(o, "/kind") == "Deployment" && id(o).ends_with("/spotable-agent-queue")
        });
        if let Some(queue) = queue {
            // Queue mode: one agent for the cluster, off the capacity it watches, reading the
            // interruption queue instead of a node's metadata.
            assert!(
                !objects.iter().any(|o| str_at(o, "/kind") == "DaemonSet"),
                "{overlay}: queue mode and a DaemonSet would both drain"
            );
            assert_eq!(queue["spec"]["replicas"], 1, "{overlay}: one processor");
            let pod = pod_specs(queue)[0];
            assert_eq!(
                str_at(pod, "/nodeSelector/lifecycle"),
                "ondemand",
                "{overlay}"
            );
            let argv = container_argv(containers(pod)[0]);
            assert!(
                argv.iter()
                    .any(|a| a.starts_with("--interruption-queue-url=")),
                "{overlay}: {argv:?}"
            );
            continue;
        }
        let agent = objects
            .iter()
            .find(|o| str_at(o, "/kind") == "DaemonSet" && id(o).ends_with("/spotable-agent"))
            .unwrap_or_else(|| panic!("{overlay}: no agent DaemonSet"));
        let pod = pod_specs(agent)[0];
        let terms: BTreeSet<String> = items(
            pod,
            "/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
        )
        .iter()
        .flat_map(|t| items(t, "/matchExpressions"))
        .map(|e| format!("{}={}", str_at(e, "/key"), strings(e.get("values")).into_iter().collect::<Vec<_>>().join(",")))
        .collect();
        assert_eq!(
            terms,
            set(&[
                "lifecycle=spot",
                "eks.amazonaws.com/capacityType=SPOT",
                "karpenter.sh/capacity-type=spot",
            ]),
            "{overlay}: spot nodes by every common label"
        );
        assert_eq!(
            pod.get("hostNetwork"),
            Some(&Value::Bool(true)),
            "{overlay}"
        );
        assert!(
            items(pod, "/tolerations")
                .iter()
                .any(|t| str_at(t, "/key") == "spotable.io/interrupted"),
            "{overlay}: the agent must stay on the node it cordons"
        );
    }
}

#[test]
fn agones_objects_have_their_required_fields() {
    let objects = render(&kubectl(), "agones").unwrap_or_else(|e| panic!("{e}"));
    let fleets: Vec<&Value> = objects
        .iter()
        .filter(|o| str_at(o, "/apiVersion").starts_with("agones.dev/"))
        .collect();
    assert!(
        !fleets.is_empty(),
        "the agones overlay renders no Agones object"
    );
    for f in fleets {
        let at = id(f);
        assert_eq!(str_at(f, "/apiVersion"), "agones.dev/v1", "{at}");
        assert!(matches!(str_at(f, "/kind"), "Fleet" | "GameServer"), "{at}");
        assert!(!str_at(f, "/metadata/name").is_empty(), "{at}: name");
        let gs = if str_at(f, "/kind") == "Fleet" {
            assert!(
                f.pointer("/spec/replicas")
                    .and_then(Value::as_u64)
                    .is_some(),
                "{at}"
            );
            if let Some(s) = f.pointer("/spec/scheduling").and_then(Value::as_str) {
                assert!(
                    matches!(s, "Packed" | "Distributed"),
                    "{at}: scheduling {s}"
                );
            }
            f.pointer("/spec/template/spec")
        } else {
            f.pointer("/spec")
        };
        let gs = gs.unwrap_or_else(|| panic!("{at}: no GameServer spec"));
        let ports = items(gs, "/ports").to_vec();
        assert!(!ports.is_empty(), "{at}: ports");
        for p in &ports {
            assert!(!str_at(p, "/name").is_empty(), "{at}: port name");
            assert!(
                p.get("containerPort").and_then(Value::as_u64).is_some(),
                "{at}"
            );
            assert!(
                matches!(
                    str_at(p, "/portPolicy"),
                    "Dynamic" | "Static" | "Passthrough" | "None"
                ),
                "{at}: portPolicy"
            );
            assert!(
                matches!(str_at(p, "/protocol"), "UDP" | "TCP" | "TCPUDP"),
                "{at}"
            );
        }
        let cs = items(gs, "/template/spec/containers").to_vec();
        assert!(!cs.is_empty(), "{at}: template.spec.containers");
        for c in &cs {
            assert!(
                !str_at(c, "/name").is_empty() && !str_at(c, "/image").is_empty(),
                "{at}"
            );
        }
    }
}

#[test]
fn iam_policies_name_only_the_queue_actions_each_part_needs() {
    let queue = serde_json::from_str::<Value>(
        &std::fs::read_to_string(deploy_dir().join("aws/sqs-queue.json")).unwrap(),
    )
    .expect("sqs-queue.json parses");
    let name = str_at(&queue, "/QueueName");
    assert!(name.ends_with(".fifo"), "{name}");
    assert_eq!(str_at(&queue, "/Attributes/FifoQueue"), "true");
    for (file, expected) in [
        (
            "agent-policy.json",
            &["sqs:SendMessage", "sqs:GetQueueUrl"][..],
        ),
        (
            "wrapper-policy.json",
            &["sqs:SendMessage", "sqs:GetQueueUrl"][..],
        ),
        (
            "consumer-policy.json",
            &["sqs:ReceiveMessage", "sqs:DeleteMessage"][..],
        ),
    ] {
        let path = deploy_dir().join("aws/iam").join(file);
        let policy: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{file} does not parse: {e}"));
        assert_eq!(str_at(&policy, "/Version"), "2012-10-17", "{file}");
        let statements = policy["Statement"].as_array().expect("Statement list");
        let mut actions = BTreeSet::new();
        for s in statements {
            assert_eq!(str_at(s, "/Effect"), "Allow", "{file}");
            let one_or_many = |k: &str| match s.get(k) {
                Some(Value::String(a)) => set(&[a]),
                v => strings(v),
            };
            actions.extend(one_or_many("Action"));
            let resources = one_or_many("Resource");
            assert_eq!(resources.len(), 1, "{file}: one queue");
            for r in &resources {
                assert!(
                    r.starts_with("arn:aws:sqs:") && r.ends_with(&format!(":{name}")),
                    "{file}: {r} is not the inventory queue"
                );
            }
        }
        assert_eq!(actions, set(expected), "{file}");
    }
}

#[test]
fn the_node_groups_are_labelled_as_the_manifests_select() {
    let docs = read_yaml(&deploy_dir().join("aws/eksctl-cluster.yaml")).unwrap();
    let cfg = &docs[0];
    assert_eq!(str_at(cfg, "/kind"), "ClusterConfig");
    let groups = cfg["managedNodeGroups"].as_array().expect("node groups");
    let by_label = |l: &str| {
        groups
            .iter()
            .find(|g| str_at(g, "/labels/lifecycle") == l)
            .unwrap_or_else(|| panic!("no node group labelled lifecycle={l}"))
    };
    let spot = by_label("spot");
    assert_eq!(spot.get("spot"), Some(&Value::Bool(true)));
    let types = strings(spot.get("instanceTypes"));
    assert!(types.len() >= 3, "spot group not diversified: {types:?}");
    let ondemand = by_label("ondemand");
    assert_ne!(ondemand.get("spot"), Some(&Value::Bool(true)));
}

#[test]
fn the_queue_url_in_the_manifests_is_the_queue_the_policies_name() {
    let queue = serde_json::from_str::<Value>(
        &std::fs::read_to_string(deploy_dir().join("aws/sqs-queue.json")).unwrap(),
    )
    .unwrap();
    let name = str_at(&queue, "/QueueName").to_string();
    for (overlay, objects) in rendered() {
        // Every ConfigMap but the Grafana dashboard's carries the queue URL.
        for o in objects.iter().filter(|o| {
            str_at(o, "/kind") == "ConfigMap" && str_at(o, "/metadata/name") != "spotable-dashboard"
        }) {
            let url = str_at(o, "/data/QUEUE_URL");
            assert!(
                url.ends_with(&format!("/{name}")),
                "{overlay}: {}: {url}",
                id(o)
            );
        }
    }
}

#[test]
fn queue_mode_hears_every_event_it_reads_and_may_call_only_what_it_calls() {
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(deploy_dir().join(f)).unwrap())
            .unwrap_or_else(|e| panic!("{f} does not parse: {e}"))
    };
    let queue = read("aws/interruption-queue.json");
    let name = str_at(&queue, "/QueueName");
    let rules = read("aws/eventbridge-rules.json");
    assert!(str_at(&rules, "/Target").ends_with(&format!(":{name}")));
    // Each event the agent's parser acts on has a rule that sends it, and nothing else does.
    let mut heard = BTreeSet::new();
    for rule in rules["Rules"].as_array().unwrap() {
        let p = &rule["EventPattern"];
        for source in strings(p.get("source")) {
            for kind in strings(p.get("detail-type")) {
                heard.insert(format!("{source}: {kind}"));
            }
        }
    }
    assert_eq!(
        heard,
        set(&[
            "aws.ec2: EC2 Spot Instance Interruption Warning",
            "aws.ec2: EC2 Instance Rebalance Recommendation",
            "aws.ec2: EC2 Instance State-change Notification",
            "aws.health: AWS Health Event",
            "aws.autoscaling: EC2 Instance-terminate Lifecycle Action",
        ])
    );
    let policy = read("aws/iam/agent-queue-policy.json");
    let mut actions = BTreeSet::new();
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(str_at(s, "/Effect"), "Allow");
        actions.extend(strings(s.get("Action")));
        let resource = str_at(s, "/Resource");
        assert!(!resource.contains("*:*"), "{resource}: too wide");
    }
    assert_eq!(
        actions,
        set(&[
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:SendMessage",
            "sqs:GetQueueUrl",
            "autoscaling:RecordLifecycleActionHeartbeat",
            "autoscaling:CompleteLifecycleAction",
        ])
    );
}

/// The `--kubernetes-service` each proxy of `objects` follows (env references expanded).
fn followed_services(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .flat_map(pod_specs)
        .flat_map(containers)
        .flat_map(container_argv)
        .filter_map(|a| a.strip_prefix("--kubernetes-service=").map(str::to_string))
        .collect()
}

/// The README's overlay for a second game, rendered: its proxy follows its own Service, and
/// that Service selects only its own game's pods.
#[test]
fn the_readme_second_game_follows_its_own_service() {
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    let snippet = readme
        .split("### A game with its own proxy")
        .nth(1)
        .and_then(|s| s.split("```yaml\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the second-game snippet in deploy/README.md");
    // The snippet lives in deploy/overlays/NAME; from a scratch directory, its `../../` is
    // deploy/ by a relative path (kustomize takes no absolute one).
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("second-game");
    std::fs::create_dir_all(&dir).unwrap();
    let up = "../".repeat(dir.canonicalize().unwrap().components().count() - 1);
    let deploy = deploy_dir().canonicalize().unwrap();
    let deploy = deploy.strip_prefix("/").unwrap().display().to_string();
    std::fs::write(
        dir.join("kustomization.yaml"),
        snippet.replace("../../", &format!("{up}{deploy}/")),
    )
    .unwrap();
    let out = std::process::Command::new(kubectl())
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = dir.join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    let objects = read_yaml(&rendered).unwrap();
    assert_eq!(
        followed_services(&objects),
        vec!["game-server-arena-2".to_string()]
    );
    let service = objects
        .iter()
        .find(|o| {
            str_at(o, "/kind") == "Service" && str_at(o, "/metadata/name") == "game-server-arena-2"
        })
        .expect("the game's Service");
    assert_eq!(
        str_at(service, "/spec/selector/spotable.io~1game"),
        "arena-2"
    );
    // The standard overlay's proxy follows the unsuffixed Service.
    assert_eq!(
        followed_services(&render(&kubectl(), "standard").unwrap()),
        vec!["game-server".to_string()]
    );
}

/// Where proxies put a PROXY v2 header before each datagram, every game they serve has an
/// anchor in front of its port (the wrapper's `--anchor`, or an `anchor` sidecar) that trusts
/// some network: a game that got the header unread would take it for game data.
#[test]
fn where_proxies_send_headers_every_game_has_an_anchor_that_trusts_the_pod_network() {
    let mut checked = 0;
    for (overlay, objects) in rendered() {
        let headers = objects
            .iter()
            .flat_map(pod_specs)
            .flat_map(containers)
            .map(container_argv)
            .any(|a| {
                a.first().is_some_and(|p| p == "spotable-proxy")
                    && a.iter().any(|x| x == "--replica-header=proxy-v2")
            });
        if !headers {
            continue;
        }
        let games: Vec<&Value> = objects
            .iter()
            .filter(|o| str_at(o, "/metadata/name").starts_with("game-server"))
            .filter(|o| !pod_specs(o).is_empty())
            .collect();
        assert!(!games.is_empty(), "{overlay}: no game");
        for g in games {
            let argvs: Vec<Vec<String>> = pod_specs(g)
                .into_iter()
                .flat_map(containers)
                .map(container_argv)
                .collect();
            let has = |a: &[String], flag: &str| a.iter().any(|x| x.starts_with(flag));
            let anchored = argvs.iter().any(|a| {
                let wrapper = a.first().is_some_and(|p| p == "spotable-wrapper");
                let sidecar = wrapper && a.get(1).is_some_and(|s| s == "anchor");
                (wrapper && has(a, "--anchor=") && has(a, "--anchor-trust="))
                    || (sidecar && has(a, "--trust="))
            });
            assert!(
                anchored,
                "{overlay}: {} gets PROXY v2 headers without an anchor that trusts the pods",
                id(g)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} games checked");
}
