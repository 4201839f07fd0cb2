#!/usr/bin/env bash
# Which storage driver buildah and podman should use here: overlay where the kernel lets this
# process mount an overlay filesystem (layers shared, not copied), else vfs (every layer a full
# copy: several times the disk). STORAGE_DRIVER, when set, wins. Prints the driver's name.
set -uo pipefail
if [ -n "${STORAGE_DRIVER:-}" ]; then
  echo "$STORAGE_DRIVER"
  exit 0
fi
probe=$(mktemp -d "${TMPDIR:-/tmp}/ddetr-overlay-probe.XXXXXX") || exit 1
mkdir -p "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" "$probe/merged" 2>/dev/null; then
  umount "$probe/merged"
  driver=overlay
else
  driver=vfs
fi
rm -rf "$probe"
echo "$driver"
