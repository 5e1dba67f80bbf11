"""Soak: steady load for a while (VISIONSERVE_SOAK_S seconds: 15 by default, 60 with
VISIONSERVE_LONG_TESTS=1 as `make test-all` runs it; the long run in docs/benchmarks.md used
600) while new versions are published and old ones removed every few seconds, each one served
before the next is published. The server's RSS, open file descriptors and threads are sampled
every second; growth between the early and the late part of the run, beyond noise, is a leak.

The clock is the subject here: the soak's length and its pace (a swap every 3 s, a sample
every second) are what is tested, not waits for something to happen.

    VISIONSERVE_SOAK_S=600 pytest tests/test_soak.py -m slow -s   # prints the samples
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from conftest import eventually, make_repo, start_server, tensor_image
from visionserve.v1 import visionserve_pb2 as pb

LONG = os.environ.get("VISIONSERVE_LONG_TESTS") == "1"
SOAK_S = float(os.environ.get("VISIONSERVE_SOAK_S") or (60 if LONG else 15))
SWAP_EVERY_S = 3.0
SAMPLE_EVERY_S = 1.0


def sample(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 300)
def test_a_long_run_with_version_swaps_does_not_grow_memory_fds_or_threads(exported_repo,
                                                                          tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5", "mobilenet_v3_small"))
    srv = start_server(repo, tmp_path / "server.log", "--poll-interval-s", "0.5")
    requests = [pb.ClassifyRequest(model="lenet5", images=[tensor_image(
                    np.zeros((32, 32, 1), np.uint8))]),
                pb.ClassifyRequest(model="mobilenet_v3_small", images=[tensor_image(
                    np.zeros((224, 224, 3), np.uint8))] * 2),
                pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=b"not an image")])]
    outcomes: Counter[str] = Counter()
    versions: set[int] = set()
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        n = i
        while not stop.is_set():
            request = requests[n % len(requests)]
            n += 1
            try:
                reply = srv.stub.Classify(request, timeout=60)
                with lock:
                    outcomes["OK"] += 1
                    if reply.model == "lenet5":
                        versions.add(reply.version)
            except grpc.RpcError as err:
                with lock:
                    outcomes[err.code().name] += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    samples: list[dict[str, float]] = []
    published = 1
    try:
        for t in clients:
            t.start()
        model_dir = repo / "lenet5"
        start = next_swap = time.monotonic()
        while (now := time.monotonic()) - start < SOAK_S:  # the soak's length: its subject
            if now >= next_swap:  # publish N+1 (hidden copy, rename), remove N-1
                published += 1
                tmp = model_dir / f".tmp-{published}"
                shutil.copytree(model_dir / str(published - 1), tmp)
                os.rename(tmp, model_dir / str(published))
                if published > 2:
                    shutil.rmtree(model_dir / str(published - 2))
                eventually(lambda v=published: v in versions, f"version {published} served")
                next_swap = time.monotonic() + SWAP_EVERY_S
            samples.append({"t": round(now - start, 1), **sample(srv.process.pid)})
            time.sleep(SAMPLE_EVERY_S)  # the sampling period: the soak's pace, its subject
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
        srv.stop()

    quarter = len(samples) // 4
    early, late = samples[quarter:2 * quarter], samples[-quarter:]

    def med(rows: list[dict[str, float]], key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    growth = {k: med(late, k) - med(early, k) for k in ("rss_mb", "fds", "threads")}
    report = {"seconds": SOAK_S, "versions_published": published, "outcomes": dict(outcomes),
              "growth_late_vs_early_median": growth,
              "first": samples[0], "last": samples[-1],
              "max": {k: max(s[k] for s in samples) for k in ("rss_mb", "fds", "threads")}}
    print(json.dumps(report, indent=1))  # noqa: T201 - the figures for the closing note
    assert set(outcomes) == {"OK", "INVALID_ARGUMENT"}, outcomes  # nothing failed but the bad
    assert set(range(2, published + 1)) <= versions, (versions, published)  # each was served
    # noise: the allocator's working set moves by tens of MB; a leak of one loaded version per
    # swap (a LeNet session, its threads, its file) would add hundreds of MB, a thread or two
    # and a descriptor per swap
    assert growth["rss_mb"] < 80, report
    assert growth["fds"] <= 4, report
    assert growth["threads"] <= 2, report
