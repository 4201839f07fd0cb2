#!/usr/bin/env bash
# Stop a test run that would run out of disk, before it starts, with one line naming the space.
# The tests write gigabytes: at their peak 5 GB with the set-up's caches warm (the clusters' state,
# the runs' checkpoints, containers' layers), and 9 GB more while the real node first imports the
# trainer image (6.4 GB of it kept). With too little free space they fail 40 minutes in, on a
# kubelet's DiskPressure.
#   bash scripts/check-free-disk.sh     # MIN_FREE_GB (default 10) moves the bar
set -euo pipefail
min_free_gb=${MIN_FREE_GB:-10}
case "$min_free_gb" in ''|*[!0-9]*) echo "check-free-disk: MIN_FREE_GB=$min_free_gb: expected a whole number of GB" >&2; exit 2 ;; esac
# pytest's temporary folders, and the caches (the real node's image store among them).
for dir in "${TMPDIR:-/tmp}" "${DDETR_REAL_NODE_CACHE:-$HOME/.cache}"; do
  mkdir -p "$dir"
  free_gb=$(df -P -k "$dir" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt "$min_free_gb" ]; then
    echo "check-free-disk: only $free_gb GB free on the disk holding $dir; the tests need at least $min_free_gb GB (MIN_FREE_GB)" >&2
    exit 1
  fi
done
