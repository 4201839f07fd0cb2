"""Images per second the data loader delivers from S3 through the node cache: prints a table, writes
bench/results/s3_dataset.json.

The S3 endpoint is moto's server in a process of its own on 127.0.0.1 (local HTTP, no network: a real
store adds latency per GET, which the prefetcher's concurrency is there to hide; figures here say
nothing about a remote store's bandwidth). Measured in the same run, interleaved, each round:

- local: the loader (dataset.workers processes) reading the images from local disk (the reference);
- s3 cold: the same loader over s3:// URIs with an empty node cache (prefetch + download + decode);
- s3 warm: again, the cache holding every image (no GET);
- boto3 pool: the baseline a user would script: download every object with boto3 in a thread pool
  to a local folder, then the same loader over it (images/s over both); its download alone is shown too.

Then the prefetcher alone (a sampler walk, no decoding) under tracemalloc: its peak Python memory
against `PrefetchingSampler.bound_bytes`.

    OMP_NUM_THREADS=2 python3 bench/s3_dataset.py [--images 256] [--repeats 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, ratio_spread, spread  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "s3_dataset.json")
BUCKET = "bench-dataset"
POOL_THREADS = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("moto server did not start")


def make_dataset(root: str, count: int) -> dict:
    """`count` 640x480 JPEGs of noise and shapes (~100 KB each, as COCO's are) and their COCO JSON."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    images, annotations = [], []
    for k in range(1, count + 1):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) // 4 + 96
        pixels[100:300, 150:400] = rng.integers(0, 255, 3, dtype=np.uint8)
        name = f"{k:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, "images", name), quality=90)
        images.append({"id": k, "file_name": name, "width": 640, "height": 480})
        annotations.append({"id": k, "image_id": k, "category_id": 1, "bbox": [150, 100, 250, 200],
                            "area": 50000, "iscrowd": 0})
    with open(os.path.join(root, "annotations.json"), "w") as fh:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}, fh)
    return {"image_dir": os.path.join(root, "images"), "json_file": os.path.join(root, "annotations.json")}


def loader_seconds(source: dict, workers: int) -> float:
    """One pass of the evaluation loader over `source` (a fresh process view of the listings)."""
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.data import remote
    from deformable_detr.data.loader import build_dataloader

    remote._listed.clear()
    remote._known.clear()
    spec = spec_from_dict({"dataset": {
        "num_classes": 2, "batch_size": 8, "workers": workers, "pin_memory": False, "val_data_sources": [source],
        "augmentation": {"test_random_resize": 480, "random_resize_max_size": 640, "fixed_padding": False}}})
    start = time.perf_counter()
    loader = build_dataloader(spec, "val")
    for _batch in loader:
        pass
    return time.perf_counter() - start


def pool_download(uris: list[str], folder: str) -> float:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"], region_name="us-east-1")
    os.makedirs(folder, exist_ok=True)

    def get(uri: str) -> None:
        key = uri.split("/", 3)[3]
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        with open(os.path.join(folder, os.path.basename(key)), "wb") as fh:
            fh.write(body)

    start = time.perf_counter()
    with ThreadPoolExecutor(POOL_THREADS) as pool:
        list(pool.map(get, uris))
    return time.perf_counter() - start


def prefetcher_peak(uris: list[str]) -> dict:
    """Peak Python memory while the prefetcher walks a sampler over `uris` (nothing decoded), against its bound."""
    from deformable_detr.data.prefetch import PrefetchingSampler

    sampler = PrefetchingSampler(range(len(uris)), lambda index: uris[index])
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    for _index in sampler:
        time.sleep(0.002)  # a consumer slower than the downloads: the queue stays full
    sampler._pool.shutdown(wait=True)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak_bytes": peak - base, "bound_bytes": sampler.bound_bytes, "threads": sampler.threads,
            "depth": sampler.depth, "seconds": time.perf_counter() - start, "images": len(uris)}


def main() -> None:
    load = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("deformable_detr").setLevel(logging.WARNING)
    work = tempfile.mkdtemp(prefix="bench-s3-dataset-")
    server, endpoint = start_moto()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          S3_ENDPOINT_URL=endpoint, DDETR_CACHE_DIR=os.path.join(work, "cache"))
        from deformable_detr.runtime import storage

        local = make_dataset(os.path.join(work, "local"), args.images)
        storage.s3_client().create_bucket(Bucket=BUCKET)
        names = sorted(os.listdir(local["image_dir"]))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: storage.upload_file(os.path.join(local["image_dir"], n),
                                                        f"s3://{BUCKET}/images/{n}"), names))
        storage.upload_file(local["json_file"], f"s3://{BUCKET}/annotations.json")
        s3 = {"image_dir": f"s3://{BUCKET}/images", "json_file": f"s3://{BUCKET}/annotations.json"}
        uris = [f"s3://{BUCKET}/images/{n}" for n in names]
        image_bytes = sum(os.path.getsize(os.path.join(local["image_dir"], n)) for n in names)

        loader_seconds(local, args.workers)  # warm-up: imports, page cache
        rounds: dict[str, list[float]] = {k: [] for k in ("local", "s3_cold", "s3_warm", "pool_total",
                                                           "pool_download")}
        for _ in range(args.repeats):
            shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
            rounds["local"].append(loader_seconds(local, args.workers))
            rounds["s3_cold"].append(loader_seconds(s3, args.workers))
            rounds["s3_warm"].append(loader_seconds(s3, args.workers))
            copy = os.path.join(work, "copy")
            shutil.rmtree(copy, ignore_errors=True)
            download = pool_download(uris, os.path.join(copy, "images"))
            shutil.copy(local["json_file"], os.path.join(copy, "annotations.json"))
            total = download + loader_seconds({"image_dir": os.path.join(copy, "images"),
                                               "json_file": os.path.join(copy, "annotations.json")}, args.workers)
            rounds["pool_download"].append(download)
            rounds["pool_total"].append(total)
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
        memory = prefetcher_peak(uris)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    rates = {name: spread([args.images / s for s in seconds]) for name, seconds in rounds.items()}
    result = {
        "what": "images/s the evaluation loader delivers (decode + resize to 480, batch 8), S3 = moto server on "
                "127.0.0.1 in its own process (local HTTP, not a remote store)",
        "images": args.images, "mean_image_bytes": image_bytes // args.images, "workers": args.workers,
        "repeats": args.repeats, "pool_threads": POOL_THREADS, "images_per_second": rates,
        "warm_over_local": ratio_spread(rounds["local"], rounds["s3_warm"]),
        "cold_over_pool_total": ratio_spread(rounds["pool_total"], rounds["s3_cold"]),
        "prefetcher_memory": memory, "machine": machine(load)}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{args.images} images of ~{image_bytes // args.images // 1024} KB, {args.workers} loader workers, "
          f"{args.repeats} rounds; S3 = moto on 127.0.0.1 (local)")
    print(f"{'images/s':<34}{'median':>9}{'min':>9}{'max':>9}")
    shown = {"local disk (reference)": "local", "s3 cold cache": "s3_cold", "s3 warm cache": "s3_warm",
             f"boto3 pool ({POOL_THREADS}) + local loader": "pool_total", "  its download alone": "pool_download"}
    for label, key in shown.items():
        r = rates[key]
        print(f"{label:<34}{r['median']:>9.1f}{r['min']:>9.1f}{r['max']:>9.1f}")
    w, c = result["warm_over_local"], result["cold_over_pool_total"]
    print(f"warm / local rate: {w['median']:.3f} ({w['min']:.3f}..{w['max']:.3f}); "
          f"cold / boto3-pool-then-load rate: {c['median']:.3f} ({c['min']:.3f}..{c['max']:.3f})")
    print(f"prefetcher peak Python memory {memory['peak_bytes'] / 2**20:.1f} MiB, bound "
          f"{memory['bound_bytes'] / 2**20:.1f} MiB ({memory['threads']} threads x 1 MiB chunks, {memory['depth']} ahead)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
