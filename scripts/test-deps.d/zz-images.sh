#!/usr/bin/env bash
# The image tools (Debian's buildah, podman, skopeo, mmdebstrap) and both images, built by
# scripts/build-images.sh with the CUDA kernel (KERNELS=all) for the tests in tests/images/. Runs
# after the other steps (the name sorts last). On a warm machine with nothing changed the build is
# a no-op (seconds); a cold one takes the times the README gives ("The images"). Exits 1 naming
# the tool or image it could not provide.
set -uo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)

missing=()
for tool in buildah podman skopeo mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "zz-images.sh: installing ${missing[*]} (apt-get)" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           buildah podman skopeo mmdebstrap >/dev/null; }; then
    echo "zz-images.sh: apt-get could not install ${missing[*]}" >&2
    exit 1
  fi
  for tool in "${missing[@]}"; do
    command -v "$tool" >/dev/null || { echo "zz-images.sh: $tool is still missing after apt-get install" >&2; exit 1; }
  done
fi
if ! result=$(KERNELS=all bash "$here/scripts/build-images.sh"); then
  echo "zz-images.sh: scripts/build-images.sh could not build the images (its message is above)" >&2
  exit 1
fi
echo "$result" >&2
