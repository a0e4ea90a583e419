#!/usr/bin/env bash
# Renders every Kustomize overlay of k8s/ with `kubectl kustomize` and checks every rendered object
# against the Kubernetes JSON schemas (the npm registry's kubernetes-models and
# @kubernetes-models/prometheus-operator, installed once into the work folder), that every image an
# overlay names is built by a Dockerfile here and that each Dockerfile parses (dockerfile-utils,
# tools/k8s/check_images.mjs). With SCOUT_BINARY,
# every scout flag the manifests pass (args and --config files) must exist in that build.
# usage: k8s_test.sh SOURCE_DIR WORK_DIR [SCOUT_BINARY]
set -euo pipefail
src=$1
work=$2
scout=${3:-}
fail() { echo "FAIL: $*"; exit 1; }
command -v kubectl >/dev/null || fail "kubectl is needed to render k8s/ (kubectl kustomize)"
command -v node >/dev/null && command -v npm >/dev/null || fail "node and npm are needed (tools/setup.sh installs them)"
mkdir -p "$work"
cp "$src/tools/k8s/package.json" "$src/tools/k8s/validate.mjs" "$src/tools/k8s/check_images.mjs" "$work/"
if [ ! -d "$work/node_modules/kubernetes-models" ] || [ ! -d "$work/node_modules/dockerfile-utils" ]; then
  (cd "$work" && npm install --no-audit --no-fund --silent) || fail "npm install of the schema packages"
fi
overlays=0
for overlay in "$src"/k8s/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$work/$name.yaml" || fail "kubectl kustomize k8s/overlays/$name"
  echo "== k8s/overlays/$name"
  node "$work/validate.mjs" "$work/$name.yaml" || fail "k8s/overlays/$name: objects fail the schema check"
  # What the deployment relies on, beyond the schemas: the probes and the drain.
  grep -q "path: /ready" "$work/$name.yaml" || fail "$name: no readiness probe on /ready"
  grep -q "path: /health" "$work/$name.yaml" || fail "$name: no liveness probe on /health"
  grep -q "preStop" "$work/$name.yaml" || fail "$name: no preStop drain"
  if [ -n "$scout" ]; then
    python3 "$src/tools/k8s/check_flags.py" "$scout" "$work/$name.yaml" || fail "$name: flags scout does not know"
  fi
  overlays=$((overlays + 1))
done
[ "$overlays" -gt 0 ] || fail "no overlays under k8s/overlays"
# Every image an overlay names is built by a Dockerfile here, and every Dockerfile parses.
node "$work/check_images.mjs" "$src" "$work"/*.yaml || fail "images the overlays name, or the Dockerfiles"
echo "k8s_test: $overlays overlays render and pass the schema check"
