"""Publish a new version while 16 clients hammer the server; report what the swap cost.

    .venv/bin/python bench/scripts/swap_under_load.py --model resnet18 --repo model_repo \
        [--clients 16] [--poll-interval-s 5] [--before-s 8] [--after-s 12]

Copies the model's newest version into a scratch repository, starts `visionserve serve` in poll
mode on it, runs closed-loop Classify clients, publishes version N+1 (hidden copy + rename, as
`visionserve export` does) and prints: time from the rename to the first reply from the new
version, errors, and latency percentiles in steady state vs in the window around the swap.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from visionserve.bench.launch import start_visionserve
from visionserve.service.cli.client import numpy_to_image
from visionserve.service.format.repository import version_numbers
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--poll-interval-s", type=float, default=5.0)
    parser.add_argument("--before-s", type=float, default=8.0)
    parser.add_argument("--after-s", type=float, default=12.0)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="swap-"))
    src = args.repo / args.model
    newest = max(version_numbers(src))
    dst = scratch / "repo" / args.model
    dst.mkdir(parents=True)
    for name in ("config.toml", "labels.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    shutil.copytree(src / str(newest), dst / "1")
    server = start_visionserve(scratch / "repo", "--poll-interval-s", str(args.poll_interval_s),
                               log_path=scratch / "server.log")
    try:
        result = asyncio.run(drive(server.target, args, dst, scratch))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    sys.stdout.write(result + "\n")


async def drive(target: str, args: argparse.Namespace, model_dir: Path,
                scratch: Path) -> str:
    channel = grpc.aio.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.VisionServiceStub(channel)
    x = np.random.default_rng(0).standard_normal((3, 224, 224), dtype=np.float32)
    request = pb.ClassifyRequest(model=args.model, images=[numpy_to_image(x)])
    records: list[tuple[float, float, int, str]] = []  # (sent, latency, version, error)
    stop_at = time.monotonic() + args.before_s + args.after_s

    async def client() -> None:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                reply = await stub.Classify(request, timeout=60)
                records.append((t0, time.monotonic() - t0, reply.version, ""))
            except grpc.RpcError as err:
                records.append((t0, time.monotonic() - t0, 0, err.code().name))

    clients = [asyncio.create_task(client()) for _ in range(args.clients)]
    await asyncio.sleep(args.before_s)
    tmp = model_dir / ".tmp-2"
    await asyncio.to_thread(shutil.copytree, model_dir / "1", tmp)
    published = time.monotonic()
    os.rename(tmp, model_dir / "2")
    await asyncio.gather(*clients)
    await channel.close()

    first_v2 = min((t + lat for t, lat, v, _ in records if v == 2), default=float("nan"))
    steady = [lat for t, lat, v, e in records if t < published - 1 and not e]
    window = [lat for t, lat, v, e in records
              if published - 1 <= t <= first_v2 + 1 and not e]
    errors = [e for *_, e in records if e]

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")

    return (f"{args.model}, {args.clients} clients, poll every {args.poll_interval_s} s\n"
            f"publish → first reply from v2: {first_v2 - published:.2f} s\n"
            f"requests: {len(records)}, errors: {len(errors)} {sorted(set(errors))}\n"
            f"steady state: n={len(steady)} p50 {pct(steady, 50):.1f} ms p99 "
            f"{pct(steady, 99):.1f} ms\n"
            f"swap window (publish-1 s .. first v2 reply+1 s): n={len(window)} p50 "
            f"{pct(window, 50):.1f} ms p99 {pct(window, 99):.1f} ms")


if __name__ == "__main__":
    main()
