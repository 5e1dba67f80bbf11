"""``visionserve bench-store``: a repository in object storage, measured against a real S3 API.

moto's S3 server on loopback plays the store (the ``dev`` extra installs it). For
each of ``--models`` (its newest version in ``--repo``, uploaded as version 1 into a repository
prefix of its own, ``s3://bench/<model>/<model>/1/``):

- **start-up to SERVING**, ``--repeats`` times each (median): from the local folder; from the
  store with an empty cache (listing, download, verification, load, golden check); and from the
  store with the cache warm (a restart: nothing is fetched);
- **publish → served** on ``--servers`` servers sharing the bucket, each with its own cache and
  polling every ``--poll-interval-s``: from the moment the new version's manifest is uploaded
  (its files went first) to each server answering GetModel with it READY;
- **verification's cost**: the sha256 of the version's files in a process of its own (CPU
  seconds, and its peak RSS over the same process that hashes nothing).

Loopback S3 has no network latency or bandwidth limit: a real store adds its transfer time to
the cold start and to publish → served, never to the warm restart.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from rich.console import Console

from visionserve.service.cli.mistakes import CommandError
from visionserve.service.format.repository import version_numbers
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

from .launch import LINKED_REPO, free_port, single_model_repo, start_visionserve

BUCKET = "bench"
MODEL_FILES = ("config.toml", "labels.txt", "config.pbtxt")
HASH = """import hashlib, resource, sys, time
t = time.process_time()
for path in sys.argv[1:]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
print(time.process_time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="resnet50,vit_b_16",
                   help="comma-separated models of --repo (their newest version)")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--servers", type=int, default=3, help="servers sharing the bucket")
    p.add_argument("--repeats", type=int, default=3, help="start-ups per case (median)")
    p.add_argument("--poll-interval-s", type=float, default=1.0,
                   help="the servers' --poll-interval-s in the publish test")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, help="write the results as a markdown table")


def run_store(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    models = [m for m in args.models.split(",") if m]
    for flag, value in (("--servers", args.servers), ("--repeats", args.repeats)):
        if value < 1:
            raise CommandError(f"{flag} {value}: give at least 1")
    for model in models:  # before moto starts
        if not version_numbers(args.repo / model):
            raise CommandError(f"no version of {model} in {args.repo}; run `visionserve "
                               f"export {model} --repo {args.repo}` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, \
            moto_s3(Path(tmp)) as env:
        for model in models:
            with console.status(f"{model}: start-ups, then publish → served on "
                                f"{args.servers} servers"):
                rows.append(_measure(model, args, Path(tmp) / model, env))
            console.print(_line(rows[-1]))
    text = _markdown(rows, args)
    sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


def _measure(model: str, args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    source = args.repo / model
    version_dir = source / str(max(version_numbers(source)))
    store = _store(env, model)
    _upload(store, source, version_dir, 1)
    local = single_model_repo(args.repo, model, work / "local")
    uri = f"s3://{BUCKET}/{model}"
    starts: dict[str, list[float]] = {"local": [], "store_cold": [], "store_warm": []}
    for i in range(args.repeats):
        starts["local"].append(_start_time(local, work / f"local{i}.log", *LINKED_REPO))
        cache = work / f"cache{i}"
        starts["store_cold"].append(_start_time(uri, work / f"cold{i}.log", "--cache-dir",
                                                str(cache), env=env))
        starts["store_warm"].append(_start_time(uri, work / f"warm{i}.log", "--cache-dir",
                                                str(cache), env=env))
    files = [p for p in version_dir.rglob("*") if p.is_file()]
    cpu_s, rss_kb = _hash_cost(files)
    return {"model": model, "bytes": sum(p.stat().st_size for p in files),
            **{f"{k}_start_s": statistics.median(v) for k, v in starts.items()},
            "starts_s": starts, "sha256_cpu_s": cpu_s, "sha256_rss_mb": rss_kb / 1024,
            "publish_to_served_s": _publish_to_served(store, source, version_dir, uri, args,
                                                      work, env)}


def _start_time(repo: Path | str, log: Path, *extra: str,
                env: dict[str, str] | None = None) -> float:
    """Seconds from launch to SERVING (its models loaded and golden-checked)."""
    started = time.monotonic()
    server = start_visionserve(Path(repo), *extra, env=env, log_path=log, ready_timeout_s=600)
    took = time.monotonic() - started
    server.stop()
    return took


def _publish_to_served(store, source: Path, version_dir: Path, uri: str,
                       args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[float]:
    """Upload version 2 (its files, then its manifest) while ``--servers`` servers poll the
    bucket; seconds from the manifest's upload to each serving it."""
    servers = [start_visionserve(Path(uri), "--cache-dir", str(work / f"fleet{i}"),
                                 "--poll-interval-s", str(args.poll_interval_s), env=env,
                                 log_path=work / f"fleet{i}.log", ready_timeout_s=600)
               for i in range(args.servers)]
    try:
        stubs = [pb_grpc.VisionServiceStub(grpc.insecure_channel(s.target)) for s in servers]
        published = _upload(store, source, version_dir, 2, files_only=True)
        served: dict[int, float] = {}
        deadline = published + 600
        while len(served) < len(stubs) and time.monotonic() < deadline:
            for i, stub in enumerate(stubs):
                if i not in served and _ready(stub, source.name, 2):
                    served[i] = time.monotonic() - published
            time.sleep(0.02)
        if len(served) < len(stubs):
            raise RuntimeError(f"version 2 of {source.name} was not served by every server "
                               f"within 600 s; see {work}/fleet*.log")
        return [served[i] for i in sorted(served)]
    finally:
        for s in servers:
            s.stop()


def _ready(stub, model: str, version: int) -> bool:
    reply = stub.GetModel(pb.GetModelRequest(model=model), timeout=10)
    return any(v.version == version and v.state == pb.MODEL_STATE_READY for v in reply.versions)


def _upload(store, source: Path, version_dir: Path, version: int,
            files_only: bool = False) -> float:
    """Publish ``version_dir`` as ``version`` (the model's own files first unless
    ``files_only``), the manifest last; returns the monotonic time its upload completed."""
    import obstore

    model = source.name
    if not files_only:
        for name in MODEL_FILES:
            if (source / name).exists():
                obstore.put(store, f"{model}/{name}", source / name)
    files = sorted(p for p in version_dir.rglob("*") if p.is_file())
    for path in [p for p in files if p.name != "manifest.json"]:
        obstore.put(store, f"{model}/{version}/{path.relative_to(version_dir).as_posix()}", path)
    obstore.put(store, f"{model}/{version}/manifest.json", version_dir / "manifest.json")
    return time.monotonic()


def _hash_cost(files: list[Path]) -> tuple[float, int]:
    """CPU seconds to sha256 ``files``, and the peak RSS (kB) it adds over a process that
    hashes nothing."""
    def run(paths: list[Path]) -> tuple[float, int]:
        out = subprocess.run([sys.executable, "-c", HASH, *map(str, paths)], check=True,
                             capture_output=True, text=True).stdout.split()
        return float(out[0]), int(out[1])

    cpu, rss = run(files)
    return cpu, rss - run([])[1]


@contextmanager
def moto_s3(work: Path, bucket: str = BUCKET,
            tls: tuple[Path, Path, Path] | None = None) -> Iterator[dict[str, str]]:
    """moto's S3 server on a loopback port with ``bucket`` created; yields the environment that
    points a server or an export at it (credentials by environment, as in production). With
    ``tls`` = (certificate, key, CA bundle): HTTPS, and ``AWS_CA_BUNDLE`` set."""
    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        raise CommandError("bench-store needs moto's S3 server: pip install 'moto[s3,server]' "
                           "(the dev extra has it)")
    port = free_port()
    log = open(work / "moto.log", "wb")
    certs = ["-c", str(tls[0]), "-k", str(tls[1])] if tls else []
    moto = subprocess.Popen([str(moto_server), "-H",
                             "127.0.0.1", "-p", str(port), *certs], stdout=log, stderr=log)
    endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(tls[2])) if tls else None
    try:
        for _ in range(600):  # up to a minute
            try:
                urllib.request.urlopen(f"{endpoint}/", timeout=2, context=context).close()
                break
            except OSError:
                if moto.poll() is not None:
                    raise CommandError(f"moto_server exited; see {work}/moto.log") from None
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"),
                               timeout=10, context=context).close()
        yield {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
               **({"AWS_CA_BUNDLE": str(tls[2])} if tls else {})}
    finally:
        moto.terminate()
        moto.wait(timeout=30)
        log.close()


def _store(env: dict[str, str], model: str):
    from obstore.store import from_url

    return from_url(f"s3://{BUCKET}/{model}", client_options={"allow_http": True},
                    config={"endpoint": env["AWS_ENDPOINT_URL"], "access_key_id": "bench",
                            "secret_access_key": "bench", "region": "us-east-1"})


def _line(row: dict) -> str:
    return (f"{row['model']} ({row['bytes'] / 1e6:.0f} MB): start local "
            f"{row['local_start_s']:.2f} s, store cold {row['store_cold_start_s']:.2f} s, "
            f"store warm {row['store_warm_start_s']:.2f} s; publish → served "
            f"{', '.join(f'{t:.2f}' for t in row['publish_to_served_s'])} s; sha256 "
            f"{row['sha256_cpu_s']:.3f} CPU s, +{row['sha256_rss_mb']:.1f} MB RSS")


def _markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"| model | files | start: local folder | start: store, empty cache | start: "
             f"store, warm cache | publish → served on {args.servers} servers (poll "
             f"{args.poll_interval_s:g} s) | sha256: CPU | sha256: peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bytes'] / 1e6:.0f} MB | {r['local_start_s']:.2f} s "
                     f"| {r['store_cold_start_s']:.2f} s | {r['store_warm_start_s']:.2f} s | "
                     f"{min(r['publish_to_served_s']):.2f}–{max(r['publish_to_served_s']):.2f} s "
                     f"| {r['sha256_cpu_s']:.3f} s | +{r['sha256_rss_mb']:.1f} MB |")
    return "\n".join(lines) + f"\n\nMedians of {args.repeats} start-ups each.\n"
