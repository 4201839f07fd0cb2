#!/usr/bin/env bash
# Install Debian's `prometheus` server for the metrics scrape test. Idempotent and never fatal:
# without it, that test skips with the reason.
if command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus: apt-get not available; the Prometheus scrape test will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "prometheus: not root and no passwordless sudo; the Prometheus scrape test will skip" >&2
    exit 0
  fi
fi
# The package's postinst may try to start a service; no init system here, so tell it not to.
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || echo "prometheus: apt-get update failed; trying the install anyway" >&2
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
  echo "prometheus: apt-get install prometheus failed; the Prometheus scrape test will skip" >&2
fi
exit 0
