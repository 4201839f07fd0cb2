"""validate_job raises nothing but JobSpecError; gangs are whole; hostPath only where the admin allows it."""
from __future__ import annotations

import copy
import itertools

import pytest

from ddetr_operator import render
from ddetr_operator.api import resolve
from ddetr_operator.decide import Observed, reconcile
from ddetr_operator.validate import JobSpecError, Policy, host_path_allowed, validate_job

from conftest import BASE_JOB, NOW

ODD_VALUES = [None, "", "x", -1, 0, 1.5, True, [], [None], ["x"], {}, {"a": None}, {"name": 3}]
FIELDS = ["image", "task", "nodes", "gpusPerNode", "masterPort", "metricsPort", "terminationGracePeriodSeconds",
          "shmSize", "resources", "env", "nodeSelector", "tolerations", "affinity", "volumes", "artifacts",
          "encryptionKeySecret", "runPolicy", "gangScheduling", "experiment", "imagePullSecrets",
          "podSecurityContext", "securityContext", "serviceAccountName"]
NESTED = {
    "runPolicy": ["backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "cleanPodPolicy", "suspend"],
    "gangScheduling": ["scheduler", "minAvailable", "scheduleTimeoutSeconds"],
    "artifacts": ["uri", "endpoint", "credentialsSecret"],
    "resources": ["limits", "requests"],
    "experiment": ["train", "model", "dataset", "results_dir"],
}


def odd_specs():
    yield None
    yield "a string"
    yield []
    for field, value in itertools.product(FIELDS, ODD_VALUES):
        spec = copy.deepcopy(BASE_JOB["spec"])
        spec[field] = value
        yield spec
    for (parent, fields), value in itertools.product(NESTED.items(), ODD_VALUES):
        for field in fields:
            spec = copy.deepcopy(BASE_JOB["spec"])
            spec[parent] = {**(spec.get(parent) or {}), field: value}
            if parent == "gangScheduling" and field != "scheduler":
                spec[parent]["scheduler"] = "volcano"
            yield spec
    for volume in ({"name": "v"}, {"name": "v", "mountPath": "/d", "hostPath": None},
                   {"name": "v", "mountPath": "/d", "persistentVolumeClaim": {"claimName": None}},
                   {"name": "v", "mountPath": "/d", "hostPath": {"path": 5}}):
        yield {**copy.deepcopy(BASE_JOB["spec"]), "volumes": [volume]}


@pytest.mark.parametrize("spec", list(odd_specs()), ids=lambda s: repr(s)[-60:])
def test_odd_specs_fail_the_job_cleanly_never_the_pass(spec):
    try:
        experiment = validate_job("demo", spec)
    except JobSpecError as err:
        assert str(err).startswith(("spec", "metadata")), str(err)
        experiment = None
    job = {**copy.deepcopy(BASE_JOB), "spec": spec}
    decision = reconcile(job, Observed(), NOW)  # must not raise either
    if experiment is None:
        assert decision.status["phase"] == "Failed" and decision.actions == []
        assert next(c for c in decision.status["conditions"] if c["type"] == "Failed")["reason"] == "InvalidSpec"
    else:  # accepted specs render
        assert render.render_worker_job(resolve(job), 0)["kind"] == "Job"


@pytest.mark.parametrize("name", [None, 5, "", "A", "9lives", "x" * 41, "has.dot"])
def test_odd_names_are_refused_by_name(name):
    with pytest.raises(JobSpecError, match="^metadata.name"):
        validate_job(name, BASE_JOB["spec"])


@pytest.mark.parametrize("nodes", [0, -2, "2", 1.0, None])
def test_nodes_that_are_not_a_positive_integer_name_the_field(nodes):
    spec = {**BASE_JOB["spec"], "nodes": nodes, "gangScheduling": {"scheduler": "volcano"}}
    with pytest.raises(JobSpecError, match="^spec.nodes"):
        validate_job("demo", spec)


def test_gang_min_available_must_be_the_whole_gang(make_job):
    job = make_job(nodes=4, gangScheduling={"scheduler": "volcano", "minAvailable": 2})
    with pytest.raises(JobSpecError, match=r"spec.gangScheduling.minAvailable: 2 .* must equal spec.nodes \(4\)"):
        validate_job("demo", job["spec"])
    job = make_job(nodes=4, gangScheduling={"scheduler": "volcano", "minAvailable": 4})
    validate_job("demo", job["spec"])
    assert render.render_podgroup(resolve(job))["spec"]["minMember"] == 4
    job = make_job(nodes=3, gangScheduling={"scheduler": "scheduler-plugins"})
    assert render.render_podgroup(resolve(job))["spec"]["minMember"] == 3


def _with_host_path(make_job, path: str) -> dict:
    return make_job(volumes=[{"name": "data", "mountPath": "/data", "hostPath": {"path": path}}])["spec"]


def test_host_path_is_refused_by_default_naming_the_path_and_the_setting(make_job):
    with pytest.raises(JobSpecError) as err:
        validate_job("demo", _with_host_path(make_job, "/var/lib/kubelet"))
    message = str(err.value)
    assert message.startswith("spec.volumes[0].hostPath.path: '/var/lib/kubelet' is not accepted")
    assert "trainer.allowedHostPaths" in message and "allows no hostPath volumes" in message


def test_host_path_under_an_allowed_prefix_is_accepted(make_job):
    policy = Policy(allowed_host_paths=("/mnt/datasets",))
    validate_job("demo", _with_host_path(make_job, "/mnt/datasets/coco"), policy)
    validate_job("demo", _with_host_path(make_job, "/mnt/datasets"), policy)
    with pytest.raises(JobSpecError, match="only under /mnt/datasets"):
        validate_job("demo", _with_host_path(make_job, "/mnt/datasets-private"), policy)


@pytest.mark.parametrize("path, allowed", [
    ("/mnt/data/x", True), ("/mnt/data", True), ("/mnt/data/", True), ("/mnt/database", False),
    ("/mnt/data/../../etc", False), ("relative/mnt/data", False), ("/etc", False), ("/", False),
])
def test_host_path_prefixes_match_whole_path_components(path, allowed):
    assert host_path_allowed(path, ["/mnt/data/"]) is allowed


def test_a_refused_host_path_fails_the_job_before_any_pod(make_job):
    job = make_job(volumes=[{"name": "root", "mountPath": "/host", "hostPath": {"path": "/"}}])
    decision = reconcile(job, Observed(), NOW)
    assert decision.actions == [] and decision.status["phase"] == "Failed"
    allowed = reconcile(job, Observed(), NOW, Policy(allowed_host_paths=("/",)))
    assert allowed.status["phase"] == "Pending"
