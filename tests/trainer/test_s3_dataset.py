"""Datasets read from S3 through the node-local object cache, against moto's S3 app served on 127.0.0.1.

The server here is moto's WSGI app behind a middleware that records every request (method, path), so a
test can count the GETs a run made; a TCP proxy in front of it (test_s3.CuttingProxy) stops the endpoint
mid-run for real (connections dropped, new ones refused).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pytest
import torch
from werkzeug.serving import make_server

from deformable_detr import exit_codes
from deformable_detr.cli import main
from deformable_detr.data import remote
from deformable_detr.runtime import object_cache, storage
from deformable_detr.runtime.checkpoint import LATEST_NAME, load_checkpoint
from test_s3 import CuttingProxy
from test_train import tiny_train_spec


class StoppingProxy(CuttingProxy):
    """CuttingProxy whose stop also stops the listening socket: on Linux, closing it while another thread
    waits in accept() leaves it listening, and later connections hang in its backlog (a read timeout,
    not a refused connection)."""

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        super().stop()


class CountingS3:
    """moto's S3 app on 127.0.0.1 with a log of (method, path) per request; `on_request` may watch them."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str]] = []
        self.on_request = None
        self.server = make_server("127.0.0.1", 0, self._handle, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, environ, start_response):
        entry = (environ["REQUEST_METHOD"], environ["PATH_INFO"])
        self.requests.append(entry)
        if self.on_request is not None:
            self.on_request(entry)
        return self.app(environ, start_response)

    def object_gets(self, bucket: str, suffix: str = "") -> list[str]:
        """Paths of the GetObject calls on `bucket` (listings are GETs of the bucket itself: not counted)."""
        return [path for method, path in self.requests
                if method == "GET" and path.startswith(f"/{bucket}/") and path.endswith(suffix)]


@pytest.fixture(scope="module")
def counting_s3():
    from moto import settings

    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    server = CountingS3()
    yield server
    server.server.shutdown()


@pytest.fixture
def s3_env(counting_s3, fake_s3_credentials, monkeypatch, tmp_path):
    """Storage pointed at the counting server, a fresh node cache; returns a function making a bucket."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("S3_ENDPOINT_URL", counting_s3.url)
    monkeypatch.setenv(object_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "_listed", {})
    monkeypatch.setattr(remote, "_known", {})
    counting_s3.requests.clear()
    counting_s3.on_request = None
    yield counting_s3
    counting_s3.on_request = None


def _upload_folder(local: str, uri: str) -> None:
    for root, _dirs, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            storage.upload_file(path, storage.join(uri, os.path.relpath(path, local)))


@pytest.fixture
def s3_coco(s3_env, tiny_coco):
    """tiny_coco's train and val splits in a fresh bucket: (bucket name, sources as s3:// URIs)."""
    name = f"ds-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    sources = {}
    for split in ("train", "val"):
        _upload_folder(tiny_coco[split]["image_dir"], f"s3://{name}/{split}/images")
        storage.upload_file(tiny_coco[split]["json_file"], f"s3://{name}/{split}/annotations.json")
        sources[split] = {"image_dir": f"s3://{name}/{split}/images",
                          "json_file": f"s3://{name}/{split}/annotations.json"}
    s3_env.requests.clear()
    return name, sources


def _s3_spec(tiny_coco, sources, results, workers: int = 0) -> dict:
    spec = tiny_train_spec(tiny_coco, results, batch_size=2, num_epochs=2)
    spec["dataset"].update(train_data_sources=[sources["train"]], val_data_sources=[sources["val"]], workers=workers)
    return spec


def _weights(results) -> dict:
    return load_checkpoint(str(results / "train" / LATEST_NAME))["model"]


def test_training_from_s3_gives_the_weights_of_local_files_and_a_rerun_gets_nothing_cached(
        tiny_coco, s3_env, s3_coco, tmp_path, write_spec):
    bucket, sources = s3_coco
    local = tiny_train_spec(tiny_coco, tmp_path / "local", batch_size=2, num_epochs=2)
    assert main(["train", "-e", write_spec(local, "local.yaml")]) == 0

    # Loader workers (forked) and the prefetch threads share the cache through its file locks.
    assert main(["train", "-e", write_spec(_s3_spec(tiny_coco, sources, tmp_path / "s3", workers=2), "s3.yaml")]) == 0
    reference, from_s3 = _weights(tmp_path / "local"), _weights(tmp_path / "s3")
    assert reference.keys() == from_s3.keys()
    assert all(torch.equal(reference[k], from_s3[k]) for k in reference)
    # One GET per object (8 + 4 images, 2 JSON files), however many epochs, workers and prefetch threads read it.
    gets = s3_env.object_gets(bucket)
    assert len(gets) == len(set(gets)) == 8 + 4 + 2, gets

    s3_env.requests.clear()
    assert main(["train", "-e", write_spec(_s3_spec(tiny_coco, sources, tmp_path / "again"), "again.yaml")]) == 0
    assert s3_env.object_gets(bucket) == []  # the node cache held every object: listings and HEADs only
    assert all(torch.equal(reference[k], v) for k, v in _weights(tmp_path / "again").items())


def _direct_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.mark.parametrize("damage", ["same size, other bytes", "truncated"])
def test_a_damaged_cached_copy_is_detected_and_fetched_again(s3_env, s3_coco, damage, monkeypatch):
    bucket, sources = s3_coco
    uri = f"{sources['train']['image_dir']}/00001.jpg"
    original = storage.read_bytes(uri)
    s3_env.requests.clear()
    cached = remote.local_copy(uri)
    assert open(cached, "rb").read() == original and len(s3_env.object_gets(bucket)) == 1
    assert remote.local_copy(uri) == cached and len(s3_env.object_gets(bucket)) == 1  # a hit: no GET

    with open(cached, "r+b") as fh:
        if damage == "truncated":
            fh.truncate(len(original) - 10)
        else:
            fh.seek(len(original) // 2)
            fh.write(bytes(b ^ 0xFF for b in original[len(original) // 2:len(original) // 2 + 16]))
    monkeypatch.setattr(object_cache, "_cache", None)  # another process: it has not checked this copy yet
    assert open(remote.local_copy(uri), "rb").read() == original
    assert len(s3_env.object_gets(bucket)) == 2


def test_the_cache_evicts_the_least_recently_used_past_its_size(s3_env, s3_coco, monkeypatch):
    bucket, sources = s3_coco
    uris = [f"{sources['train']['image_dir']}/{k:05d}.jpg" for k in range(1, 9)]
    sizes = [remote.info(uri).size for uri in uris]
    monkeypatch.setenv(object_cache.CACHE_SIZE_ENV, str(sum(sizes[:4])))
    stale = os.path.join(object_cache.node_cache().root, "ab", "ab12.999.1.tmp")  # a killed process's download
    os.makedirs(os.path.dirname(stale))
    with open(stale, "wb") as fh:
        fh.write(b"partial")
    os.utime(stale, (0, 0))
    paths = [remote.local_copy(uri) for uri in uris]
    kept = [os.path.exists(path) for path in paths]
    assert kept[-1] and not kept[0] and sum(os.path.getsize(p) for p, k in zip(paths, kept) if k) <= sum(sizes[:4])
    assert not os.path.exists(stale)


def _cli_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("workers", [0, 2])  # 2: raised in a loader worker, re-raised by the loader
def test_an_image_deleted_mid_run_is_one_line_naming_it(tiny_coco, s3_env, s3_coco, tmp_path, write_spec, capsys,
                                                        workers):
    bucket, sources = s3_coco
    gone = f"{sources['train']['image_dir']}/00005.jpg"
    client = _direct_client(s3_env.url)

    def delete_after_the_annotations(request) -> None:  # the listing said it was there
        if request == ("GET", f"/{bucket}/train/annotations.json"):
            client.delete_object(Bucket=bucket, Key="train/images/00005.jpg")

    s3_env.on_request = delete_after_the_annotations
    code = main(["train", "-e", write_spec(_s3_spec(tiny_coco, sources, tmp_path / "r", workers))])
    assert code == exit_codes.BAD_INPUT.code
    assert _cli_error(capsys).endswith(f"file not found: {gone}")


def test_a_missing_bucket_is_one_line(tiny_coco, s3_env, s3_coco, tmp_path, write_spec, capsys):
    _bucket, sources = s3_coco
    sources = dict(sources, train={"image_dir": "s3://no-such-bucket-31/images", "json_file": "s3://no-such-bucket-31/a.json"})
    assert main(["train", "-e", write_spec(_s3_spec(tiny_coco, sources, tmp_path / "r"))]) == exit_codes.BAD_INPUT.code
    assert "bucket 'no-such-bucket-31' does not exist" in _cli_error(capsys)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_endpoint_stopped_mid_epoch_exits_retryable_and_the_restart_finishes(
        tiny_coco, s3_env, s3_coco, tmp_path, write_spec, capsys, monkeypatch, workers):
    bucket, sources = s3_coco
    proxy = StoppingProxy(s3_env.url)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
    images = []

    def stop_after_three_images(request) -> None:
        method, path = request
        if method == "GET" and "/images/" in path:
            images.append(path)
            if len(images) == 3:
                threading.Thread(target=proxy.stop, daemon=True).start()

    s3_env.on_request = stop_after_three_images
    spec = write_spec(_s3_spec(tiny_coco, sources, tmp_path / "r", workers))
    assert main(["train", "-e", spec]) == exit_codes.STORAGE_UNAVAILABLE.code
    assert "cannot reach the S3 endpoint" in _cli_error(capsys)

    # The endpoint is back: the restart (the operator's, after a retryable exit) finishes, reusing the cache.
    s3_env.on_request = None
    s3_env.requests.clear()
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env.url)
    assert main(["train", "-e", spec]) == 0
    assert not [path for path in s3_env.object_gets(bucket) if path.endswith(".json")]  # cached before the cut


def test_convert_from_an_s3_prefix_writes_the_json_of_the_same_local_folders(s3_env, tmp_path, monkeypatch):
    from test_convert import make_kitti_source

    root = tmp_path / "kitti"
    for name in ("a", "b"):
        make_kitti_source(root, name)
    (root / "sources.txt").write_text("a\nb\n")
    bucket = f"kitti-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    _upload_folder(str(root), f"s3://{bucket}/kitti")

    def convert(input_source: str, results) -> dict:
        spec = tmp_path / f"{results}.yaml"
        spec.write_text(json.dumps({"convert": {"input_source": input_source, "num_shards": 2, "val_split": 40,
                                                "num_partitions": 2, "partition_mode": "random"}}))
        assert main(["convert", "-e", str(spec), "-r", str(tmp_path / results)]) == 0
        out = tmp_path / results / "convert"
        return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*"))
                if p.is_file() and (p.suffix == ".json" and "shard" in p.name or p.name == "stats.txt")}

    from_s3 = convert(f"s3://{bucket}/kitti/sources.txt", "s3")
    # S3 lists a folder in key order; a local folder's order is the file system's: compared in key order.
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": sorted(listdir(path)))
    from_local = convert(str(root / "sources.txt"), "local")
    assert len(from_local) == 2 * 2 * 2 + 1 and from_s3 == from_local


def test_inference_and_evaluate_from_s3_write_what_local_files_give(tiny_coco, s3_env, s3_coco, tmp_path, write_spec,
                                                                     perturbed_checkpoint):
    from test_evaluate_s3 import TINY_MODEL

    bucket, sources = s3_coco
    _model, checkpoint = perturbed_checkpoint({"model": TINY_MODEL, "dataset": {"num_classes": 4}})
    storage.upload_file(checkpoint, f"s3://{bucket}/models/model.pth")
    classmap = tmp_path / "classmap.txt"
    classmap.write_text("car\nperson\nbicycle\n")
    storage.upload_file(str(classmap), f"s3://{bucket}/classmap.txt")
    augmentation = {"test_random_resize": 64, "random_resize_max_size": 64, "fixed_padding": False}

    def run(task: str, results: str, image_dir: str, classmap_path: str, test_source: dict, model: str) -> dict:
        spec = {"model": TINY_MODEL, "dataset": {
            "num_classes": 4, "batch_size": 2, "workers": 0, "pin_memory": False, "augmentation": augmentation,
            "infer_data_sources": {"image_dir": [image_dir], "classmap": classmap_path},
            "test_data_sources": test_source},
            "inference": {"checkpoint": model, "conf_threshold": 0.0}, "evaluate": {"checkpoint": model}}
        assert main([task, "-e", write_spec(spec, f"{results}.yaml"), "-r", str(tmp_path / results)]) == 0
        out = tmp_path / results / task
        written = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                   if p.is_file() and (p.suffix == ".txt" or p.name == "detections.json")}
        if task == "evaluate":  # the figures; the checkpoint it names is the one given
            written["results.json"] = {k: v for k, v in json.loads((out / "results.json").read_text()).items()
                                       if k != "checkpoint"}
        return written

    for task in ("inference", "evaluate"):
        local = run(task, f"local-{task}", tiny_coco["val"]["image_dir"], str(classmap), tiny_coco["val"], checkpoint)
        from_s3 = run(task, f"s3-{task}", sources["val"]["image_dir"], f"s3://{bucket}/classmap.txt", sources["val"],
                      f"s3://{bucket}/models/model.pth")
        assert local and from_s3 == local, task


def test_each_rank_fetches_only_the_images_its_sampler_gives_it(tiny_coco, s3_env, s3_coco, tmp_path):
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.data.loader import build_dataloader

    bucket, sources = s3_coco
    spec = spec_from_dict(_s3_spec(tiny_coco, sources, tmp_path / "r"))
    fetched = []
    for rank in (0, 1):
        s3_env.requests.clear()
        loader = build_dataloader(spec, "train", rank=rank, world_size=2)
        loader.sampler.set_epoch(0)
        given = {loader.dataset.store.record(int(index)).path.rsplit("/", 1)[1] for index in loader.sampler}
        for _batch in loader:
            pass
        images = {path.rsplit("/", 1)[1] for path in s3_env.object_gets(bucket) if "/train/images/" in path}
        assert images == given and len(given) == 4  # 8 images over 2 ranks
        fetched.append(images)
    assert not fetched[0] & fetched[1]


def test_fine_tuning_from_s3_weights_gives_the_weights_of_local_ones(tiny_coco, s3_env, s3_coco, tmp_path, write_spec,
                                                                     perturbed_checkpoint):
    from test_train import TINY_MODEL

    bucket, _sources = s3_coco
    _model, checkpoint = perturbed_checkpoint({"model": TINY_MODEL, "dataset": {"num_classes": 4}}, seed=3)
    storage.upload_file(checkpoint, f"s3://{bucket}/models/pretrained.pth")
    results = {}
    for where, path in (("local", checkpoint), ("s3", f"s3://{bucket}/models/pretrained.pth")):
        spec = tiny_train_spec(tiny_coco, tmp_path / where, batch_size=4, num_epochs=1, pretrained_model_path=path)
        assert main(["train", "-e", write_spec(spec, f"{where}.yaml")]) == 0
        results[where] = _weights(tmp_path / where)
    assert all(torch.equal(results["local"][k], results["s3"][k]) for k in results["local"])
    assert s3_env.object_gets(bucket, "/pretrained.pth") == [f"/{bucket}/models/pretrained.pth"]


def test_the_endpoint_stopped_in_the_second_epoch_exits_retryable_and_the_restart_resumes_exactly(
        tiny_coco, s3_env, s3_coco, tmp_path, write_spec, capsys, monkeypatch):
    bucket, sources = s3_coco
    local = tiny_train_spec(tiny_coco, tmp_path / "local", batch_size=2, num_epochs=2)
    assert main(["train", "-e", write_spec(local, "local.yaml")]) == 0

    # A cache too small for the training images: the second epoch must fetch them again.
    image_size = max(os.path.getsize(os.path.join(tiny_coco["train"]["image_dir"], n))
                     for n in os.listdir(tiny_coco["train"]["image_dir"]))
    monkeypatch.setenv(object_cache.CACHE_SIZE_ENV, str(3 * image_size))
    proxy = StoppingProxy(s3_env.url)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
    latest = tmp_path / "s3" / "train" / LATEST_NAME

    def stop_once_the_first_epoch_is_saved() -> None:
        while not proxy.cut.is_set():
            if latest.exists():
                proxy.stop()
            time.sleep(0.005)

    threading.Thread(target=stop_once_the_first_epoch_is_saved, daemon=True).start()
    spec = write_spec(_s3_spec(tiny_coco, sources, tmp_path / "s3"), "s3.yaml")
    assert main(["train", "-e", spec]) == exit_codes.STORAGE_UNAVAILABLE.code
    assert "cannot reach the S3 endpoint" in _cli_error(capsys)

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_env.url)  # back: the restart resumes from the first epoch's checkpoint
    assert main(["train", "-e", spec]) == 0
    reference, resumed = _weights(tmp_path / "local"), _weights(tmp_path / "s3")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
