"""Cost of artifacts on the training loop: prints a table, writes bench/results/artifacts.json.

1. Background upload: how long `ArtifactSync.publish_checkpoint` holds the caller, against
   the reference of uploading the same checkpoint synchronously (`storage.upload_file`),
   both to moto's S3 server on 127.0.0.1 over HTTP (multipart, 16 MiB parts).
2. Encryption (`-k`): `checkpoint_io.save_object`/`load_object` of the same state with a
   key, against the same calls without one (the reference), to a local file.

    OMP_NUM_THREADS=2 python3 bench/artifacts.py [--megabytes 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "artifacts.json")
MiB = 1024 * 1024


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_upload(folder: str, megabytes: int, repeats: int) -> dict:
    from moto.server import ThreadedMotoServer

    from deformable_detr.runtime import storage
    from deformable_detr.runtime.artifacts import ArtifactSync

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      S3_ENDPOINT_URL=f"http://{host}:{port}")
    storage.s3_client().create_bucket(Bucket="bench-artifacts")
    remote = "s3://bench-artifacts/run/train"
    local = os.path.join(folder, "model_epoch_000.pth")
    with open(local, "wb") as fh:
        fh.write(os.urandom(megabytes * MiB))
    try:
        synchronous = _median_seconds(
            lambda: storage.upload_file(local, f"{remote}/sync.pth", part_size=16 * MiB), repeats)
        call_seconds, drained_seconds = [], []
        for _ in range(repeats):
            sync = ArtifactSync(folder, remote, part_size=16 * MiB)
            start = time.perf_counter()
            sync.publish_checkpoint("model_epoch_000.pth")
            call_seconds.append(time.perf_counter() - start)
            sync.close()
            drained_seconds.append(time.perf_counter() - start)
        assert storage.exists(f"{remote}/dd_model_latest.pth")
    finally:
        server.stop()
    call = statistics.median(call_seconds)
    return {"megabytes": megabytes, "synchronous_upload_s": synchronous,
            "publish_checkpoint_call_s": call, "background_upload_done_s": statistics.median(drained_seconds),
            "caller_blocked_ratio": call / synchronous}


def bench_encryption(folder: str, megabytes: int, repeats: int) -> dict:
    from deformable_detr.runtime.checkpoint_io import load_object, save_object

    state = {"model": {"weights": torch.randn(megabytes * MiB // 4)}}
    path = os.path.join(folder, "state.pth")
    result = {"megabytes": megabytes}
    for label, key in (("plain", None), ("encrypted", "bench-key")):
        result[f"{label}_save_s"] = _median_seconds(lambda: save_object(state, path, key=key), repeats)
        result[f"{label}_load_s"] = _median_seconds(lambda: load_object(path, key=key), repeats)
    result["save_ratio"] = result["encrypted_save_s"] / result["plain_save_s"]
    result["load_ratio"] = result["encrypted_load_s"] / result["plain_load_s"]
    result["encrypted_save_mb_per_s"] = megabytes / result["encrypted_save_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=128, help="checkpoint size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as folder:
        upload = bench_upload(folder, args.megabytes, args.repeats)
        encryption = bench_encryption(folder, args.megabytes, args.repeats)
    rows = [
        ("S3 upload, synchronous (reference)", f"{upload['synchronous_upload_s']:.3f} s", "1.00"),
        ("publish_checkpoint: caller blocked", f"{upload['publish_checkpoint_call_s'] * 1e3:.3f} ms",
         f"{upload['caller_blocked_ratio']:.5f}"),
        ("publish_checkpoint: upload + latest done", f"{upload['background_upload_done_s']:.3f} s",
         f"{upload['background_upload_done_s'] / upload['synchronous_upload_s']:.2f}"),
        ("save_object, no key (reference)", f"{encryption['plain_save_s']:.3f} s", "1.00"),
        ("save_object, with key", f"{encryption['encrypted_save_s']:.3f} s", f"{encryption['save_ratio']:.2f}"),
        ("load_object, no key (reference)", f"{encryption['plain_load_s']:.3f} s", "1.00"),
        ("load_object, with key", f"{encryption['encrypted_load_s']:.3f} s", f"{encryption['load_ratio']:.2f}"),
    ]
    print(f"{args.megabytes} MiB checkpoint, median of {args.repeats}")
    print(f"{'measurement':44s} {'time':>12s} {'ratio':>9s}")
    for name, value, ratio in rows:
        print(f"{name:44s} {value:>12s} {ratio:>9s}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    from deformable_detr.runtime.files import write_text_atomic

    write_text_atomic(RESULTS, json.dumps({"upload": upload, "encryption": encryption,
                                           "threads": torch.get_num_threads()}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
