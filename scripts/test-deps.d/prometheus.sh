#!/usr/bin/env bash
# Install Debian's `prometheus` server for the metrics scrape test. Idempotent; exits 1 naming
# what stopped it.
if command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus.sh: apt-get not available to install Debian's prometheus" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "prometheus.sh: installing Debian's prometheus needs root or passwordless sudo" >&2
    exit 1
  fi
fi
# The package's postinst may try to start a service; no init system here, so tell it not to.
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || echo "prometheus.sh: apt-get update failed; trying the install anyway" >&2
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
  echo "prometheus.sh: apt-get install prometheus failed" >&2
  exit 1
fi
