//! The manifests in `deploy/` as a cluster would receive them: every overlay rendered by
//! `kubectl kustomize` and parsed into JSON values, plus the walks over pod templates that
//! the checks in `tests/` share. Policy lives in the tests; this is only the plumbing.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Why an overlay could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot run kubectl ({0})")]
    KubectlMissing(std::io::Error),
    #[error("kubectl kustomize {overlay} failed: {stderr}")]
    Kustomize { overlay: String, stderr: String },
    #[error("{path}: {message}")]
    Yaml { path: String, message: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// `deploy/` itself.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Every overlay under `deploy/overlays`, so that a new one is checked without a change here.
pub fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(deploy_dir().join("overlays"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("kustomization.yaml").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Renders one overlay with `kubectl kustomize deploy/overlays/NAME`.
pub fn render(kubectl: &Path, overlay: &str) -> Result<Vec<Value>, RenderError> {
    let dir = deploy_dir().join("overlays").join(overlay);
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()
        .map_err(RenderError::KubectlMissing)?;
    if !out.status.success() {
        return Err(RenderError::Kustomize {
            overlay: overlay.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse_yaml_stream(&String::from_utf8_lossy(&out.stdout), overlay)
}

/// Reads a YAML file of one or more documents.
pub fn read_yaml(path: &Path) -> Result<Vec<Value>, RenderError> {
    let text = std::fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_yaml_stream(&text, &path.display().to_string())
}

fn parse_yaml_stream(text: &str, path: &str) -> Result<Vec<Value>, RenderError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| RenderError::Yaml {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// `kind/namespace/name` of an object, for messages.
pub fn id(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        str_at(object, "/kind"),
        str_at(object, "/metadata/namespace"),
        str_at(object, "/metadata/name")
    )
}

/// The string at a JSON pointer, or "".
pub fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The list at a JSON pointer, or an empty one.
pub fn items<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The pod template specs an object carries, wherever its kind keeps them: workloads at
/// `spec.template.spec`, an Agones Fleet one level deeper (Fleet → GameServer → pod).
pub fn pod_specs(object: &Value) -> Vec<&Value> {
    let pointer = match (str_at(object, "/apiVersion"), str_at(object, "/kind")) {
        ("agones.dev/v1", "Fleet") => "/spec/template/spec/template/spec",
        ("agones.dev/v1", "GameServer") => "/spec/template/spec",
        (_, "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job") => {
            "/spec/template/spec"
        }
        (_, "Pod") => "/spec",
        _ => return Vec::new(),
    };
    object.pointer(pointer).into_iter().collect()
}

/// A pod spec's init containers and containers.
pub fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod.get(*k).and_then(Value::as_array))
        .flatten()
        .collect()
}

/// The strings of a container's `command` followed by its `args`.
pub fn argv(container: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .filter_map(|k| container.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

/// Replaces `$(VAR)` as the kubelet would, with a stand-in for each variable the container
/// defines (an address for IPs, the variable's name otherwise). Unknown references stay, as
/// the kubelet leaves them.
pub fn expand_env_refs(arg: &str, container: &Value) -> String {
    let mut out = arg.to_string();
    for env in items(container, "/env") {
        let name = str_at(env, "/name");
        let field = str_at(env, "/valueFrom/fieldRef/fieldPath");
        let value = match (env.get("value").and_then(Value::as_str), field) {
            (Some(v), _) => v.to_string(),
            (None, f) if f.ends_with("IP") => "10.0.0.1".to_string(),
            _ => name.to_lowercase().replace('_', "-"),
        };
        out = out.replace(&format!("$({name})"), &value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_specs_are_found_per_kind() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "spec": {"template": {"spec": {"containers": [{"name": "a"}]}}}});
        assert_eq!(pod_specs(&d).len(), 1);
        let f = json!({"apiVersion": "agones.dev/v1", "kind": "Fleet",
            "spec": {"template": {"spec": {"template": {"spec": {"containers": []}}}}}});
        assert_eq!(pod_specs(&f).len(), 1);
        let s = json!({"apiVersion": "v1", "kind": "Service", "spec": {}});
        assert!(pod_specs(&s).is_empty());
    }

    #[test]
    fn env_refs_expand_like_the_kubelet() {
        let c = json!({"env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "MODE", "value": "fast"}]});
        assert_eq!(expand_env_refs("--ip=$(POD_IP)", &c), "--ip=10.0.0.1");
        assert_eq!(
            expand_env_refs("$(NODE_NAME)/$(MODE)", &c),
            "node-name/fast"
        );
        assert_eq!(
            expand_env_refs("$(OTHER) ${SERVER_PORT}", &c),
            "$(OTHER) ${SERVER_PORT}"
        );
    }

    #[test]
    fn yaml_streams_parse_to_values() {
        let docs = parse_yaml_stream("a: 1\n---\nb: [x]\n---\n", "t").unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), json!({"b": ["x"]})]);
        assert!(parse_yaml_stream("a: [", "t").is_err());
    }
}
