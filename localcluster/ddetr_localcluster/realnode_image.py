"""Images for the real node's containerd: the pause (sandbox) image, written as an OCI
archive from the locally built static pause binary, and `ctr images import` of an archive,
skipped when the same archive (path, size, mtime) was imported into this content store and its
images are still there, the removal of the images those imports replaced, and of the layers'
blobs once unpacked."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

PAUSE_IMAGE = "ddetr.local/pause:1"
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin (and so the kubelet) sees


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    _add(tar, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}"


def write_pause_archive(pause_binary: Path, archive: Path) -> Path:
    """An OCI image archive holding only /pause (run as nobody, 65535)."""
    layer_bytes = io.BytesIO()
    with tarfile.open(fileobj=layer_bytes, mode="w", format=tarfile.PAX_FORMAT) as layer:
        _add(layer, "pause", pause_binary.read_bytes(), mode=0o755)
    layer_data = layer_bytes.getvalue()
    with tarfile.open(archive, "w") as tar:
        layer_digest = _blob(tar, layer_data)
        config = {"architecture": "amd64", "os": "linux",
                  "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
                  "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
        config_data = json.dumps(config).encode()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": _blob(tar, config_data), "size": len(config_data)},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                "digest": layer_digest, "size": len(layer_data)}]}
        manifest_data = json.dumps(manifest).encode()
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _blob(tar, manifest_data),
            "size": len(manifest_data), "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": PAUSE_IMAGE,
                            "org.opencontainers.image.ref.name": PAUSE_IMAGE.rsplit(":", 1)[1]}}]}
        _add(tar, "index.json", json.dumps(index).encode())
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    return archive


def run_ctr(ctr: list[str], what: str, *args: str) -> str:
    """`ctr` in the CRI plugin's namespace; its output, or RuntimeError naming `what` with ctr's error."""
    result = subprocess.run([*ctr, "-n", NAMESPACE, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ctr {what}: {result.stderr.strip()[-500:]}")
    return result.stdout


def image_rows(ctr: list[str]) -> list[list[str]]:
    """`ctr images list`'s rows, split into columns: REF TYPE DIGEST ..."""
    listed = run_ctr(ctr, "images list", "images", "list")
    return [line.split() for line in listed.splitlines()[1:] if line.strip()]


def import_archive(ctr: list[str], archive: Path, stamps: Path) -> bool:
    """`ctr images import` the archive unless this store has it already; True if imported."""
    stat = archive.stat()
    stamp = stamps / hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16]
    fingerprint = f"{archive.resolve()} {stat.st_size} {stat.st_mtime_ns}"
    # The stamp alone is not enough: the kubelet's image garbage collection, under disk pressure,
    # removes images it did not pull, and imported ones cannot be pulled again.
    if stamp.exists() and stamp.read_text() == fingerprint and set(archive_refs(archive)) <= stored_refs(ctr):
        return False
    run_ctr(ctr, f"images import {archive}", "images", "import", "--snapshotter", "overlayfs", str(archive))
    stamps.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return True


def remove_replaced(ctr: list[str]) -> list[str]:
    """Remove the images no name points to any more, and return their ids. The CRI plugin also names
    every image by its id (`sha256:...`), so an image replaced by a newer import under the same
    name stays in the store under that id alone: without this each rebuild of the trainer image
    would keep another copy of it (gigabytes) in the cache. Run before the kubelet starts: no
    container uses them then."""
    rows = image_rows(ctr)
    named = {row[2] for row in rows if not row[0].startswith("sha256:")}  # REF TYPE DIGEST ...
    replaced = [row[0] for row in rows if row[0].startswith("sha256:") and row[2] not in named]
    if replaced:
        run_ctr(ctr, "images remove", "images", "remove", "--sync", *replaced)
    return replaced


def discard_layer_blobs(ctr: list[str]) -> None:
    """Let containerd's garbage collector remove the layers' blobs, and wait for it. Once unpacked
    into snapshots they are needed no more (the images are never pushed or exported from here),
    and kept they are a second copy of the trainer image (~6 GB) on a disk the builds and the
    tests share. This also cleans a store that imported before the blobs were discarded."""
    run_ctr(ctr, "content prune references", "content", "prune", "references")


def stored_refs(ctr: list[str]) -> set[str]:
    """The image names the node's containerd holds."""
    return set(run_ctr(ctr, "images list", "images", "list", "--quiet").split())


def archive_refs(archive: Path) -> list[str]:
    """The image names a docker-archive (podman/buildah save) or OCI archive carries."""
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        if "manifest.json" in names:
            return [tag for entry in json.load(tar.extractfile("manifest.json")) for tag in entry.get("RepoTags") or []]
        index = json.load(tar.extractfile("index.json"))
        return [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]
                if "io.containerd.image.name" in (m.get("annotations") or {})]
