#!/usr/bin/env bash
# Local stand-ins for the Dockerfiles' base images, made from Debian packages (nothing can be
# pulled from a container registry here). mmdebstrap bootstraps this machine's own Debian release
# through the apt sources this machine is configured with (no mirror is named in this file), and
# buildah imports the root filesystem as an image:
#
#   localhost/ddetr-base/build:<suite>    stands in for nvidia/cuda:*-devel-* (Python 3 + headers, g++)
#   localhost/ddetr-base/runtime:<suite>  stands in for nvidia/cuda:*-base-* and python:3.12-slim
#                                         (Python 3 with venv, libgomp1, CA certificates; no compiler)
#
# Neither has CUDA: the trainer's build stage then assembles nvcc from PyPI wheels. Each image
# records the hash of this recipe in a label; an image whose label matches is kept (a no-op).
# Prints `BUILD_BASE=<ref>` and `RUNTIME_BASE=<ref>` as its last lines.
set -euo pipefail

say() { echo "bases: $*" >&2; }
fail() { echo "bases: error: $*" >&2; exit 1; }

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install $tool)"
done
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$suite" ] || fail "cannot tell this machine's Debian release (no VERSION_CODENAME in /etc/os-release)"

# The apt sources of this machine, in the order apt reads them.
sources=()
[ -s /etc/apt/sources.list ] && grep -qE '^[[:space:]]*deb' /etc/apt/sources.list && sources+=(/etc/apt/sources.list)
for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$file" ] && sources+=("$file")
done
[ "${#sources[@]}" -gt 0 ] || fail "no apt sources configured on this machine (/etc/apt/sources.list*)"

# Fixed timestamps, fewer files: the same packages give the same image.
common=(--variant=minbase --format=tar --skip=output/dev
        "--dpkgopt=path-exclude=/usr/share/man/*" "--dpkgopt=path-exclude=/usr/share/doc/*"
        "--dpkgopt=path-include=/usr/share/doc/*/copyright" "--dpkgopt=path-exclude=/usr/share/locale/*"
        "--dpkgopt=path-exclude=/usr/share/info/*"
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log "$1"/var/log/apt/*')
declare -A packages=(
  [build]="python3,python3-venv,python3-dev,g++,ca-certificates"
  [runtime]="python3,python3-venv,libgomp1,ca-certificates"
)
recipe=$( { cat "$0"; echo "$suite"; cat "${sources[@]}"; } | sha256sum | cut -c1-16)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

work=$(mktemp -d "${TMPDIR:-/tmp}/ddetr-bases.XXXXXX")
trap 'rm -rf "$work"' EXIT
for role in build runtime; do
  ref="localhost/ddetr-base/$role:$suite"
  have=$(buildah inspect --type image --format '{{index .ImageAnnotations "org.ddetr.recipe"}}{{index .OCIv1.Config.Labels "org.ddetr.recipe"}}' "$ref" 2>/dev/null || true)
  if [ "$have" = "$recipe" ]; then
    say "$ref is up to date (recipe $recipe)"
    continue
  fi
  say "making $ref: Debian $suite with ${packages[$role]} (mmdebstrap, about a minute)"
  start=$SECONDS
  if ! mmdebstrap --quiet "${common[@]}" --include="${packages[$role]}" "$suite" "$work/$role.tar" "${sources[@]}" \
       >"$work/$role.log" 2>&1; then
    tail -n 20 "$work/$role.log" >&2
    fail "mmdebstrap could not make the $role base from Debian $suite (log above)"
  fi
  container=$(buildah from scratch)
  buildah add --quiet "$container" "$work/$role.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /bin/bash --label "org.ddetr.recipe=$recipe" \
    --label "org.opencontainers.image.description=stand-in base ($role) from Debian $suite packages" "$container"
  buildah commit --quiet --rm "$container" "$ref" >/dev/null || fail "buildah could not commit $ref"
  rm -f "$work/$role.tar"
  say "made $ref in $((SECONDS - start)) s"
done
echo "BUILD_BASE=localhost/ddetr-base/build:$suite"
echo "RUNTIME_BASE=localhost/ddetr-base/runtime:$suite"
