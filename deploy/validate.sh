#!/usr/bin/env bash
# Renders every overlay with `kubectl kustomize` into target/deploy/ and validates each
# rendered object offline with `kubernetes-validate --strict` (its bundled schemas, no
# cluster). Custom resources have no schema there; they are written apart and checked by the
# tests in deploy/tests: Agones objects for their required fields, the Prometheus Operator's
# (PodMonitor, PrometheusRule) strictly against the CRD schemas in deploy/monitoring/crds,
# with the rules and dashboard queries run through promtool. Any other object without a
# schema is an error.
#
# kubectl, kubernetes-validate and a Python with PyYAML come from the tests' own Python
# environment under target/ (spotable-test-tools creates it on first use; see
# benches/fixtures/src/tools.rs), so nothing is installed into the system.
# Usage: deploy/validate.sh [KUBERNETES_VERSION]   (default: the newest the tool knows)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/deploy"
version="${1:-}"
bin="$(cd "$root" && cargo run --quiet -p spotable-fixtures --bin spotable-test-tools)"
export PATH="$bin:$PATH"
mkdir -p "$out"
vflags=(--strict --quiet)
[ -n "$version" ] && vflags+=(-k "$version")

status=0
for dir in "$root"/deploy/overlays/*/; do
    name="$(basename "$dir")"
    kubectl kustomize "$dir" > "$out/$name.yaml"
    # Split into objects with a schema and Agones objects (PyYAML comes with the validator).
    python3 - "$out/$name.yaml" "$out/$name.k8s.yaml" "$out/$name.custom.yaml" <<'PY'
import sys, yaml
src, k8s, custom = sys.argv[1:]
groups = ("agones.dev/", "monitoring.coreos.com/")
docs = [d for d in yaml.safe_load_all(open(src)) if d]
core = [d for d in docs if not d["apiVersion"].startswith(groups)]
rest = [d for d in docs if d["apiVersion"].startswith(groups)]
yaml.safe_dump_all(core, open(k8s, "w"), sort_keys=False)
yaml.safe_dump_all(rest, open(custom, "w"), sort_keys=False)
print(f"{src}: {len(docs)} objects ({len(rest)} custom resources, checked by the tests)")
PY
    # --quiet prints only problems; a missing schema is only a warning to the tool, so it is
    # caught here as an error.
    if ! report="$(kubernetes-validate "${vflags[@]}" "$out/$name.k8s.yaml" 2>&1)"; then
        echo "$report" | head -40 >&2
        echo "validate: $name: schema errors" >&2
        status=1
    elif [ -n "$report" ]; then
        echo "$report" | head -40 >&2
        echo "validate: $name: objects the validator has no schema for" >&2
        status=1
    else
        echo "validate: $name: every object valid (kubernetes-validate --strict)"
    fi
done
exit $status
