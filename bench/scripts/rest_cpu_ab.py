"""Server CPU per REST request, this checkout against another (a worktree of an earlier
commit), alternated: the measure a shared machine disturbs least (docs/security.md).

    python bench/scripts/rest_cpu_ab.py --repo R --model lenet5 --baseline-checkout /tmp/prev

Both servers run at once; 16 clients send binary-data infer requests (one 1×1×32×32 FP32
tensor, as tritonclient.http does) to one, then the other, ``--rounds`` times; each server's
user + system time over a round (``/proc/<pid>/stat``) ÷ the requests it answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from visionserve.bench.launch import checkout_env, start_visionserve


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, model: str, clients: int, seconds: float) -> int:
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 32, 32],
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4096}}]}).encode()
    body, done = header + bytes(4096), 0
    headers = {"Inference-Header-Content-Length": str(len(header)),
               "Content-Type": "application/octet-stream"}
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with session.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                        data=body, headers=headers) as reply:
                    await reply.read()
                    assert reply.status == 200, reply.status
                done += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--model", default="lenet5", help="a model taking 1×32×32 FP32")
    p.add_argument("--baseline-checkout", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--clients", type=int, default=16)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rest-cpu-ab-"))
    servers = {"after": start_visionserve(args.repo, "--model-control", "none"),
               "before": start_visionserve(args.repo, "--model-control", "none",
                                           env=checkout_env(args.baseline_checkout, work))}
    per_request: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, server in servers.items():
                start = cpu_s(server.process.pid)
                done = asyncio.run(load(server.http_port, args.model, args.clients,
                                        args.seconds))
                used = cpu_s(server.process.pid) - start
                per_request[name].append(used / done * 1e6)
                sys.stdout.write(f"{name}: {done / args.seconds:.0f} req/s, "
                                 f"{per_request[name][-1]:.0f} µs CPU/request\n")
                sys.stdout.flush()
    finally:
        for server in servers.values():
            server.stop()
    for name, values in per_request.items():
        sys.stdout.write(f"{name}: median {statistics.median(values):.0f} µs CPU/request "
                         f"({', '.join(f'{v:.0f}' for v in sorted(values))})\n")


if __name__ == "__main__":
    main()
