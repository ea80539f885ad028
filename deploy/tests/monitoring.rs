//! deploy/monitoring, offline: the PodMonitors and the PrometheusRule hold strictly against the
//! Prometheus Operator's CRD schemas (deploy/monitoring/crds), the PodMonitors find the pods
//! and ports they name, the rules pass `promtool check rules` and their unit tests (`promtool
//! test rules`), every dashboard query passes promtool's parser, and every series a rule or a
//! panel names is one the programs export. promtool comes from Debian's `prometheus` package,
//! unpacked by the fixtures on first use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use spotable_deploy::{containers, deploy_dir, id, pod_specs, read_yaml, render, str_at};

const GROUP: &str = "monitoring.coreos.com/";

fn monitored() -> Vec<Value> {
    let kubectl = spotable_fixtures::tools::path("kubectl").unwrap_or_else(|e| panic!("{e}"));
    render(&kubectl, "monitored").unwrap_or_else(|e| panic!("{e}"))
}

fn promtool() -> PathBuf {
    spotable_fixtures::tools::promtool().unwrap_or_else(|e| panic!("{e}"))
}

/// A scratch directory of this test under target/.
fn scratch(name: &str) -> PathBuf {
    let dir = deploy_dir().join("../target/monitoring-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn crd_for(kind: &str) -> Value {
    let dir = deploy_dir().join("monitoring/crds");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .flat_map(|p| read_yaml(&p).unwrap_or_else(|e| panic!("{e}")))
        .find(|crd| crd["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind} in {}", dir.display()))
}

fn rule_spec(objects: &[Value]) -> Value {
    let rules: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "PrometheusRule")
        .collect();
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0]["spec"].clone()
}

fn dashboard() -> Value {
    let path = deploy_dir().join("monitoring/dashboards/spotable.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel query of the dashboard, rows' nested panels included.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                str_at(p, "/title").to_string(),
                str_at(t, "/expr").to_string(),
            ));
        }
    }
    out
}

/// Grafana's interval variables as promtool would see them once Grafana has substituted them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "30s")
        .replace("$__range", "1h")
}

#[test]
fn the_monitoring_objects_hold_strictly_against_the_operator_crds_and_find_their_pods() {
    let objects = monitored();
    let custom: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with(GROUP))
        })
        .collect();
    let kinds: BTreeSet<&str> = custom.iter().map(|o| str_at(o, "/kind")).collect();
    assert_eq!(kinds, BTreeSet::from(["PodMonitor", "PrometheusRule"]));
    for o in &custom {
        spotable_fixtures::schema::crd_object(&crd_for(str_at(o, "/kind")), o)
            .unwrap_or_else(|e| panic!("{}: {e}", id(o)));
    }
    // The check can fail: a misspelt field and a wrong type are refused.
    let monitor = custom.iter().find(|o| o["kind"] == "PodMonitor").unwrap();
    let crd = crd_for("PodMonitor");
    let mut typo = (*monitor).clone();
    typo["spec"]["podMetricsEndpoints"][0]["prot"] = "admin".into();
    assert!(spotable_fixtures::schema::crd_object(&crd, &typo).is_err());
    let mut wrong = (*monitor).clone();
    wrong["spec"]["podMetricsEndpoints"][0]["interval"] = 15.into();
    assert!(spotable_fixtures::schema::crd_object(&crd, &wrong).is_err());

    // Each PodMonitor selects pods of the render, in its namespace, that name the port it
    // scrapes; and every program with an admin listener is scraped by one.
    let mut scraped: BTreeSet<String> = BTreeSet::new();
    for m in custom.iter().filter(|o| o["kind"] == "PodMonitor") {
        let ns = str_at(m, "/metadata/namespace");
        let port = str_at(m, "/spec/podMetricsEndpoints/0/port");
        let selector = &m["spec"]["selector"];
        let mut found = 0;
        for w in objects.iter().filter(|o| o["metadata"]["namespace"] == ns) {
            for pod in pod_specs(w) {
                let labels = &w["spec"]["template"]["metadata"]["labels"];
                if !selects(selector, labels) {
                    continue;
                }
                let named = containers(pod).iter().any(|c| {
                    c["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["name"] == port)
                });
                assert!(named, "{}: {} has no port named {port}", id(m), id(w));
                found += 1;
                scraped.insert(id(w));
            }
        }
        assert!(found > 0, "{} selects no pod of the render", id(m));
    }
    for w in &objects {
        for pod in pod_specs(w) {
            let admin = containers(pod).iter().any(|c| {
                c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a.as_str().is_some_and(|a| a.starts_with("--admin=")))
            });
            if admin {
                assert!(
                    scraped.contains(&id(w)),
                    "{} serves /metrics unscraped",
                    id(w)
                );
            }
        }
    }
}

/// `matchLabels` and `In` expressions, which is what the PodMonitors use.
fn selects(selector: &Value, labels: &Value) -> bool {
    let labels_match = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| &labels[k] == v);
    let expressions_match = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            assert_eq!(e["operator"], "In", "only In is understood here");
            e["values"]
                .as_array()
                .is_some_and(|vs| vs.contains(&labels[str_at(e, "/key")]))
        });
    labels_match && expressions_match
}

#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    let spec = rule_spec(&monitored());
    let alerts: BTreeSet<&str> = spec["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "SpotableGameWithoutReplicas",
        "SpotableNoReplicas",
        "SpotableReplicaSilent",
        "SpotableSessionLimitNear",
        "SpotableKernelDrops",
        "SpotableAgentDrainPastDeadline",
        "SpotableGameDivergent",
        "SpotableForwardingLoop",
        "SpotableGameAtItsLimits",
    ] {
        assert!(alerts.contains(want), "no alert {want}: {alerts:?}");
    }
    let dir = scratch("rules");
    // JSON is YAML: the spec is a Prometheus rule file as it stands.
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_string_pretty(&spec).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        deploy_dir().join("monitoring/rules/tests.yaml"),
        dir.join("tests.yaml"),
    )
    .unwrap();
    let promtool = promtool();
    let checked = run(&promtool, &["check", "rules", "rules.yaml"], &dir)
        .unwrap_or_else(|e| panic!("promtool check rules:\n{e}"));
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    run(&promtool, &["test", "rules", "tests.yaml"], &dir)
        .unwrap_or_else(|e| panic!("promtool test rules:\n{e}"));
    // Every alert is exercised by the unit tests.
    let tests = std::fs::read_to_string(dir.join("tests.yaml")).unwrap();
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}")),
            "no unit test for {a}"
        );
    }
    // And promtool does fail a wrong expression.
    std::fs::write(
        dir.join("broken.yaml"),
        r#"{"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum by (x (y)"}]}]}"#,
    )
    .unwrap();
    assert!(run(&promtool, &["check", "rules", "broken.yaml"], &dir).is_err());
}

#[test]
fn every_dashboard_query_parses_and_the_dashboard_covers_what_operators_ask() {
    let d = dashboard();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 15, "{} queries", queries.len());
    // Each query as a recording rule: promtool parses (and type-checks) every one.
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": substitute(expr)}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = scratch("dashboard");
    std::fs::write(dir.join("queries.yaml"), file.to_string()).unwrap();
    let out = run(&promtool(), &["check", "rules", "queries.yaml"], &dir)
        .unwrap_or_else(|e| panic!("a dashboard query does not parse:\n{e}"));
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
    let all: String = queries
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for topic in [
        "spotable_sessions",
        "spotable_delivered_packets_total",
        "spotable_drops_total",
        "spotable_failovers_total",
        "spotable_replica_lag_seconds_bucket",
        "spotable_replica_silence_seconds",
        "spotable_transit_seconds_bucket",
        "spotable_agent_notices_total",
        "spotable_agent_drain_seconds_bucket",
    ] {
        assert!(all.contains(topic), "no panel shows {topic}");
    }
    // Panels: unique ids, a title each, every query on the dashboard's data source variable.
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel id {} twice",
            p["id"]
        );
        assert!(!str_at(p, "/title").is_empty());
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    // The ConfigMap the component renders carries this very file.
    let objects = monitored();
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "spotable-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let carried: Value = serde_json::from_str(str_at(cm, "/data/spotable.json")).unwrap();
    assert_eq!(carried, d);
}

/// Series names in a PromQL expression (`spotable_…`), histogram suffixes removed.
fn series_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("spotable_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

/// Every `"spotable_…"` string literal in the programs' sources.
fn exported() -> BTreeSet<String> {
    let root = deploy_dir().join("..");
    let mut names = BTreeSet::new();
    let mut dirs: Vec<PathBuf> = ["proxy/src", "proxy/core/src", "agent/src", "wrapper/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("spotable_")
                        && piece.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        names.insert(piece.to_string());
                    }
                }
            }
        }
    }
    names
}

#[test]
fn every_series_the_rules_and_the_dashboard_name_is_one_the_programs_export() {
    let exported = exported();
    assert!(
        exported.contains("spotable_replica_lag_seconds"),
        "{exported:?}"
    );
    let spec = rule_spec(&monitored());
    let mut exprs: Vec<String> = spec["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| str_at(r, "/expr").to_string())
        .collect();
    exprs.extend(dashboard_queries(&dashboard()).into_iter().map(|(_, e)| e));
    let named: BTreeSet<String> = exprs.iter().flat_map(|e| series_in(e)).collect();
    let unknown: Vec<&String> = named.difference(&exported).collect();
    assert!(unknown.is_empty(), "named but never exported: {unknown:?}");
    assert!(series_in("rate(spotable_x_bucket[1m]) + spotable_y").contains("spotable_x"));
}
