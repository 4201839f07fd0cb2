#!/usr/bin/env bash
# Build the operator and trainer images from Dockerfile.operator and Dockerfile.trainer with buildah
# (no Docker engine, no registry), and write each as a docker-archive tarball that `ctr images
# import`, `kind load image-archive` and `podman load` accept.
#
#   bash scripts/build-images.sh                 # both images
#   bash scripts/build-images.sh operator        # one of them
#   KERNELS=cpu bash scripts/build-images.sh     # skip the CUDA kernel (a quick trainer build)
#
# Bases: unless BUILD_BASE / RUNTIME_BASE / PYTHON_BASE name images to use (e.g. the registry's
# nvidia/cuda and python images, already in local storage), scripts/images/bases.sh first makes
# local stand-ins from this machine's Debian packages. TORCH_CUDA_ARCH_LIST (default: the
# Dockerfile's) picks the CUDA archs.
#
# Layers are cached (buildah --layers): a source edit rebuilds only the layers after the source
# copy. Each image carries the sha256 of everything it is built from (the Dockerfile, the files it
# copies, the lock files, the build arguments and the bases' image IDs) in the label
# io.github.ddetr.inputs: when the tagged image and its archive already have the current one, that
# image is not touched at all (a no-op). Progress goes to stderr and to $DDETR_IMAGES_DIR/<image>.log;
# every build appends a JSON line (seconds, outcome, size) to $DDETR_IMAGES_DIR/builds.jsonl.
#
# Last lines on stdout:
#   OPERATOR_IMAGE=<ref>  TRAINER_IMAGE=<ref>  OPERATOR_ARCHIVE=<path>  TRAINER_ARCHIVE=<path>
#
# Environment: DDETR_IMAGES_DIR (archives and logs; default ~/.cache/ddetr-images), OPERATOR_IMAGE,
# TRAINER_IMAGE (the references to tag; default docker.io/library/deformable-detr-{operator,trainer}:
# <version>, the chart's and the examples' defaults as a kubelet resolves them),
# DDETR_IMAGES_CONTEXT (the build context; default this repository).
set -euo pipefail

say() { echo "build-images: $*" >&2; }
fail() { echo "build-images: error: $*" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
context=$(cd "${DDETR_IMAGES_CONTEXT:-$repo}" && pwd)
out=${DDETR_IMAGES_DIR:-$HOME/.cache/ddetr-images}
kernels=${KERNELS:-all}
case "$kernels" in all|cpu) ;; *) fail "KERNELS=$kernels: expected all or cpu" ;; esac
wanted=("$@")
[ "${#wanted[@]}" -gt 0 ] || wanted=(operator trainer)
for name in "${wanted[@]}"; do
  case "$name" in operator|trainer) ;; *) fail "no image named '$name' (operator, trainer)" ;; esac
done
for tool in buildah python3 sha256sum; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (bash scripts/test-deps.d/zz-images.sh installs the image tools)"
done
mkdir -p "$out"
# One build at a time per output folder (two test runs on one machine share the archives).
exec 9>"$out/.lock"
if ! flock --nonblock 9; then
  say "another build-images.sh is writing to $out; waiting for it"
  flock 9
fi

driver=$(bash "$repo/scripts/images/storage-driver.sh") || fail "no usable buildah storage driver (scripts/images/storage-driver.sh)"
export STORAGE_DRIVER=$driver
say "buildah $(buildah --version | awk '{print $3}'), storage driver $driver, isolation chroot, context $context"

version=$(python3 -c "import tomllib, sys; print(tomllib.load(open(sys.argv[1], 'rb'))['project']['version'])" \
          "$context/trainer/pyproject.toml") || fail "cannot read the version from trainer/pyproject.toml"
operator_ref=${OPERATOR_IMAGE:-docker.io/library/deformable-detr-operator:$version}
trainer_ref=${TRAINER_IMAGE:-docker.io/library/deformable-detr-trainer:$version}
source_url=$(git -C "$context" config --get remote.origin.url 2>/dev/null || true)
case "$source_url" in *://*|*@*:*) ;; *) source_url=unknown ;; esac

# Bases: given, or the local stand-ins.
if [ -n "${BUILD_BASE:-}${RUNTIME_BASE:-}${PYTHON_BASE:-}" ]; then
  [ -n "${BUILD_BASE:-}" ] && [ -n "${RUNTIME_BASE:-}" ] && [ -n "${PYTHON_BASE:-}" ] || \
    fail "set all of BUILD_BASE, RUNTIME_BASE and PYTHON_BASE, or none (then local stand-ins are made)"
  build_base=$BUILD_BASE runtime_base=$RUNTIME_BASE python_base=$PYTHON_BASE
else
  bases=$(bash "$repo/scripts/images/bases.sh") || fail "could not make the local base images (scripts/images/bases.sh, message above)"
  build_base=$(sed -n 's/^BUILD_BASE=//p' <<<"$bases")
  runtime_base=$(sed -n 's/^RUNTIME_BASE=//p' <<<"$bases")
  python_base=$runtime_base
fi
image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }
for base in "$build_base" "$runtime_base" "$python_base"; do
  image_id "$base" >/dev/null || fail "base image $base is not in local storage (buildah pull it, or leave the *_BASE variables unset)"
done

# pip inside the build reaches PyPI as pip here does: a CA bundle this machine's pip is configured
# with (PIP_CERT or pip's config) goes to the Dockerfiles' pip steps as build secrets (pip.conf and
# pip-ca.pem: mounted for that step only, never in a layer; without them pip uses its own CAs).
secrets=()
host_ca=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$host_ca" ] && [ -f "$host_ca" ]; then
  printf '[global]\ncert = /etc/pip-ca.pem\n' >"$out/pip.conf"
  secrets+=(--secret "id=pip.conf,src=$out/pip.conf" --secret "id=pip-ca.pem,src=$host_ca")
fi

# What an image is built from, file by file (the .dockerignore keeps caches and build outputs out).
inputs_of() {
  case "$1" in
    operator) echo Dockerfile.operator locks/operator.txt trainer/pyproject.toml trainer/README.md trainer/deformable_detr \
                   operator/pyproject.toml operator/ddetr_operator ;;
    trainer) echo Dockerfile.trainer locks/trainer.txt locks/trainer-cuda-build.txt scripts/cuda-home-from-pypi.sh \
                  trainer/pyproject.toml trainer/README.md trainer/deformable_detr ;;
  esac
}
digest_files() {  # sha256 over the paths and contents of the given files and folders
  (cd "$context" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' ! -name '*.so' \
     -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64
}
revision_of() {  # the commit that last changed the image's inputs (+dirty when they differ from it)
  local paths rev
  read -ra paths <<<"$(inputs_of "$1")"
  rev=$(git -C "$context" log -1 --format=%H -- "${paths[@]}" 2>/dev/null || true)
  [ -n "$rev" ] || { echo unknown; return; }
  if [ -n "$(git -C "$context" status --porcelain -- "${paths[@]}" 2>/dev/null)" ]; then rev="$rev-dirty"; fi
  echo "$rev"
}

lines=()
build_one() {
  local name=$1 ref dockerfile archive key bases_ids revision start seconds size files log previous args=()
  local -a paths
  if [ "$name" = operator ]; then
    ref=$operator_ref; dockerfile=Dockerfile.operator
    args=(--build-arg "PYTHON_BASE=$python_base")
  else
    ref=$trainer_ref; dockerfile=Dockerfile.trainer
    args=(--build-arg "BUILD_BASE=$build_base" --build-arg "RUNTIME_BASE=$runtime_base" --build-arg "KERNELS=$kernels")
    [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] || args+=(--build-arg "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST")
  fi
  archive="$out/$name.tar"
  log="$out/$name.log"
  revision=$(revision_of "$name")
  args+=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source_url")
  read -ra paths <<<"$(inputs_of "$name")"
  for path in "${paths[@]}"; do [ -e "$context/$path" ] || fail "$name: $path is not in $context"; done
  files=$(digest_files "${paths[@]}")
  if [ "$name" = operator ]; then bases_ids=$(image_id "$python_base"); else bases_ids="$(image_id "$build_base") $(image_id "$runtime_base")"; fi
  key=$(printf '%s\n' "$files" "${args[@]}" "$bases_ids" "$ref" | sha256sum | cut -c1-64)
  if [ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "io.github.ddetr.inputs"}}' "$ref" 2>/dev/null || true)" = "$key" ] \
     && [ -f "$archive" ] && [ "$(cat "$archive.inputs" 2>/dev/null)" = "$key" ]; then
    say "$name: $ref is up to date (inputs ${key:0:12}); nothing to do"
    record "$name" "$ref" "$key" 0 up-to-date "$archive"
  else
    say "$name: building $ref from $dockerfile (inputs ${key:0:12}, log $log)"
    start=$SECONDS
    previous=$(image_id "$ref" || true)
    # The build's own output streams to stderr (and the log); a failure names the step.
    if ! buildah bud --layers --isolation chroot --format docker --force-rm ${secrets[@]+"${secrets[@]}"} "${args[@]}" \
           --label "io.github.ddetr.inputs=$key" --file "$context/$dockerfile" --tag "$ref" "$context" 2>&1 \
         | tee "$log" >&2; then
      step=$(grep -E '^Error: ' "$log" | tail -n 1 | cut -c1-400 || true)
      [ -n "$step" ] || step=$(grep -E 'STEP [0-9]+/[0-9]+:' "$log" | tail -n 1 | cut -c1-400 || true)
      fail "$name: buildah could not build $dockerfile: ${step:-no step ran} (full log: $log)"
    fi
    say "$name: built in $((SECONDS - start)) s; writing $archive"
    # The image this one replaces under $ref, untagged now, is no layer cache of any later build: remove
    # it (buildah refuses while another name or a container still uses it). So is the stale archive,
    # removed before the new one is written: a trainer image is ~6 GB, and these add up on a disk.
    if [ -n "$previous" ] && [ "$previous" != "$(image_id "$ref")" ]; then
      buildah rmi "$previous" >/dev/null 2>&1 && say "$name: removed the image it replaces (${previous:0:12})" || true
    fi
    rm -f "$archive.inputs" "$archive"
    buildah push --quiet --format v2s2 "$ref" "docker-archive:$archive.partial:$ref" >/dev/null \
      || fail "$name: buildah could not write the archive $archive"
    mv "$archive.partial" "$archive"
    echo "$key" >"$archive.inputs"
    seconds=$((SECONDS - start))
    say "$name: done in $seconds s"
    record "$name" "$ref" "$key" "$seconds" built "$archive"
  fi
  lines+=("$(tr '[:lower:]' '[:upper:]' <<<"$name")_IMAGE=$ref" "$(tr '[:lower:]' '[:upper:]' <<<"$name")_ARCHIVE=$archive")
}
record() {  # one JSON line per image per run: what was built, how long it took, how big it is
  local size archive_size
  size=$(podman image inspect --format '{{.Size}}' "$2" 2>/dev/null || echo null)
  archive_size=$(stat -c %s "$6")
  printf '{"time": "%s", "image": "%s", "ref": "%s", "inputs": "%s", "outcome": "%s", "seconds": %s, "kernels": "%s", "storage_driver": "%s", "image_bytes": %s, "archive_bytes": %s}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" "$3" "$5" "$4" "$kernels" "$driver" "$size" "$archive_size" >>"$out/builds.jsonl"
}

for name in "${wanted[@]}"; do
  build_one "$name"
done
# The four lines, images first (those not built this run are left out).
printf '%s\n' "${lines[@]}" | grep '_IMAGE=' || true
printf '%s\n' "${lines[@]}" | grep '_ARCHIVE=' || true
