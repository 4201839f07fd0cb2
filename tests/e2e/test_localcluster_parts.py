"""The local control plane's own parts that need no cluster: the pod runner's env expansion
and field references, the generated replace block of the Go module, and KWOK's stages."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

from ddetr_localcluster import pod_runner  # noqa: E402


def test_dollar_paren_expansion_follows_kubernetes():
    env = {"A": "1", "KEY": "s3cr3t"}
    assert pod_runner.expand("-k $(KEY) x$(A)y", env) == "-k s3cr3t x1y"
    assert pod_runner.expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert pod_runner.expand("$$(A) is escaped", env) == "$(A) is escaped"
    assert pod_runner.expand("$A and ${A} are the shell's", env) == "$A and ${A} are the shell's"


def test_field_references_of_an_indexed_job_pod():
    pod = {"metadata": {"name": "j-a0-1-x", "namespace": "ns", "uid": "u",
                        "annotations": {"batch.kubernetes.io/job-completion-index": "1"}, "labels": {"l": "v"}},
           "spec": {"nodeName": "ddetr-runner"}, "status": {"podIP": "10.213.0.5"}}
    assert pod_runner.field_value(pod, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "1"
    assert pod_runner.field_value(pod, "metadata.labels['l']") == "v"
    assert pod_runner.field_value(pod, "status.podIP") == "10.213.0.5"
    with pytest.raises(pod_runner.PodConfigError, match="not supported"):
        pod_runner.field_value(pod, "status.qosClass")


def test_termination_message_is_the_logs_tail_like_kubelet(tmp_path):
    log = tmp_path / "container.log"
    log.write_text("".join(f"line {i}\n" for i in range(500)))
    tail = pod_runner.log_tail(log)
    assert tail.endswith("line 499") and len(tail.encode()) <= 2048 and len(tail.splitlines()) <= 80


def test_go_module_replaces_every_staging_module_of_kubernetes():
    """The replace block in localcluster/go.mod is what gen-replaces.sh makes of k8s.io/kubernetes's go.mod."""
    gomod = (REPO / "localcluster" / "go.mod").read_text()
    replaces = [line.split() for line in gomod.splitlines() if "=>" in line]
    assert len(replaces) >= 30
    for module, arrow, target, version in replaces:
        assert arrow == "=>" and module == target and version.startswith("v0.37.")
    required = next(line.split()[1] for line in gomod.splitlines() if line.strip().startswith("k8s.io/kubernetes "))
    assert required.startswith("v1.37.") and all(r[3] == "v0" + required[2:] for r in replaces)


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed")
def test_gen_replaces_reproduces_the_committed_block():
    gomod = (REPO / "localcluster" / "go.mod").read_text()
    result = subprocess.run(["bash", str(REPO / "localcluster" / "gen-replaces.sh"), "v1.37.2"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"the Go module proxy did not answer: {result.stderr.strip()[-200:]}")
    generated = [line.strip() for line in result.stdout.splitlines() if "=>" in line]
    committed = [line.strip() for line in gomod.splitlines() if "=>" in line]
    assert generated == committed


def test_kwok_stages_cover_running_exit_disruption_and_delete():
    stages = list(yaml.safe_load_all((REPO / "localcluster" / "ddetr_localcluster" / "kwok-stages.yaml").read_text()))
    names = {s["metadata"]["name"] for s in stages}
    assert names == {"ddetr-node-initialize", "ddetr-pod-running", "ddetr-pod-exit", "ddetr-pod-disruption",
                     "ddetr-pod-delete"}
    text = yaml.safe_dump_all(stages)
    for annotation in ("ddetr.dev/simulated-exit-code", "ddetr.dev/simulated-disruption",
                       "ddetr.dev/simulated-message"):
        assert annotation in text
