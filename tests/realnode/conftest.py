"""One local cluster with a real node (kubelet, containerd, kube-proxy, CoreDNS; see
localcluster/ddetr_localcluster/realnode.py) for the session, with the project's images
imported. It skips with the reason where a needed tool cannot be built or installed."""
from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "images"))
import imagetools  # noqa: E402

_cluster = None


def image_archives() -> dict[str, Path]:
    """The images of this tree, from scripts/build-images.sh: a no-op when the test set-up
    (scripts/test-deps.d/zz-images.sh) built them already; the operator here runs from the
    source, so the trainer image it renders pods for must match the source too."""
    missing = imagetools.tools_missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/test-deps.d/zz-images.sh installs the image tools)")
    built = imagetools.build(env={"KERNELS": "all"})
    if built.returncode != 0:
        pytest.fail(f"scripts/build-images.sh failed (exit {built.returncode}):\n{built.stderr[-4000:]}")
    outputs = imagetools.parse_outputs(built.stdout)
    return {"operator": Path(outputs["OPERATOR_ARCHIVE"]), "trainer": Path(outputs["TRAINER_ARCHIVE"])}


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory):
    global _cluster
    from ddetr_localcluster import realnode
    from ddetr_localcluster.controlplane import LocalCluster, control_plane_bin
    from ddetr_localcluster.realnode_cleanup import leftovers
    from ddetr_localcluster.realnode_image import archive_refs
    if os.geteuid() != 0:
        pytest.skip("the real node needs root (kubelet, containerd, network namespaces)")
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: kubelet, containerd and CoreDNS are built from Go modules")
    bin_dir, reason = control_plane_bin(real_node=True)
    if bin_dir is None:
        pytest.skip(reason)
    runtime, reason = realnode.runtime_bin()
    if runtime is None:
        pytest.skip(reason)
    archives = image_archives()
    cluster = LocalCluster(tmp_path_factory.mktemp("real-node-cluster"), bin_dir, kwok_nodes=0, pod_runner=False,
                           real_node=True, runtime_bin=runtime, image_archives=list(archives.values()))
    cluster.images = {name: archive_refs(archive)[0] for name, archive in archives.items()}
    _cluster = cluster
    cluster.start()
    try:
        yield cluster
    finally:
        _cluster = None
        cluster.stop()
        left = leftovers(cluster.state)
        assert not left, f"the real node left behind: {left}"


@pytest.fixture()
def namespace(real_cluster):
    name = f"ddetr-rn-{uuid.uuid4().hex[:6]}"
    real_cluster.create_namespace(name)
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the last lines of every component's log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _cluster is not None:
        report.sections.append(("real-node cluster logs", _cluster.log_tails()))
