"""The serve image, built from our Dockerfile and run as a container runtime would run it.

There is no Docker engine here: Debian's buildah builds the Dockerfile (`--isolation chroot`,
`--format docker` so HEALTHCHECK is kept) on a Debian stand-in for python:3.11-slim that
`.ci/image-base.sh` makes, and the image's own entrypoint, command, environment and user run in
a chroot of its root filesystem mounted READ-ONLY (what `readOnlyRootFilesystem: true` gives a
pod), with a model repository bind-mounted read-only at its VOLUME."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import CACHE, ROOT, Server, encode, eventually, photo
from visionserve.v1 import visionserve_pb2 as pb

pytestmark = pytest.mark.slow
BASE = os.environ.get("VISIONSERVE_IMAGE_BASE", "localhost/visionserve-base:bookworm")
TAG = f"localhost/visionserve-test:serve-{os.getpid()}"


def buildah(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result.stdout.strip()


def limit(kind: int) -> int:
    import resource

    soft, _ = resource.getrlimit(kind)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass
class Image:
    tag: str
    config: dict  # the Docker image config: User, Env, Entrypoint, Cmd, Healthcheck...
    layer_bytes: list[int]
    base_layer_bytes: list[int]
    build_s: float


def inspect(tag: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", tag))


def cannot_build(reason: str) -> None:
    """Skip, except where CI could build the base (.ci/run sets VISIONSERVE_REQUIRE_IMAGE=1):
    there a missing image is a failure, never a quiet skip."""
    (pytest.fail if os.environ.get("VISIONSERVE_REQUIRE_IMAGE") == "1" else pytest.skip)(reason)


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    if shutil.which("buildah") is None or os.geteuid() != 0:
        cannot_build("needs buildah and root (.ci/run installs buildah and debootstrap)")
    if subprocess.run(["buildah", "inspect", "--type", "image", BASE],
                      capture_output=True).returncode != 0:
        cannot_build(f"no base image {BASE}: make it with .ci/image-base.sh (.ci/run does)")
    import resource

    started = time.monotonic()  # build_s: a figure for docs/deploy.md, never asserted on
    # ulimits no higher than ours (buildah's nofile default exceeds what this sandbox grants),
    # nproc no higher than buildah's own default (raising it is refused too)
    nofile, nproc = limit(resource.RLIMIT_NOFILE), min(limit(resource.RLIMIT_NPROC), 32768)
    buildah("build", "--isolation", "chroot", "--format", "docker", "--target", "serve",
            "--build-arg", f"PYTHON_IMAGE={BASE}", "--ulimit", f"nofile={nofile}:{nofile}",
            "--ulimit", f"nproc={nproc}:{nproc}", "-t", TAG, str(ROOT), timeout=1200)
    build_s = time.monotonic() - started  # recorded, never asserted on
    try:
        info, base = inspect(TAG), inspect(BASE)
        yield Image(TAG, info["Docker"]["config"],
                    [layer["size"] for layer in json.loads(info["Manifest"])["layers"]],
                    [layer["size"] for layer in json.loads(base["Manifest"])["layers"]],
                    build_s)
    finally:
        subprocess.run(["buildah", "rmi", "-f", TAG], capture_output=True)


@pytest.fixture(scope="module")
def read_only_root(image: Image, exported_repo: Path) -> Iterator[Path]:
    """The image's root filesystem, read-only, with /proc, /dev and the repository at /models."""
    container = buildah("from", "--quiet", image.tag)
    merged = Path(buildah("mount", container))
    root = Path(tempfile.mkdtemp(prefix="visionserve-image-"))
    mounts: list[Path] = []

    def bind(src: Path, dst: Path, *, read_only: bool) -> None:
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        mounts.append(dst)
        if read_only:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)

    try:
        bind(merged, root, read_only=True)
        bind(Path("/dev"), root / "dev", read_only=False)
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        mounts.append(root / "proc")
        bind(exported_repo, root / "models", read_only=True)
        yield root
    finally:
        for mount in reversed(mounts):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        buildah("umount", container)
        buildah("rm", container)
        root.rmdir()


def in_image(root: Path, image: Image, argv: list[str], env: dict[str, str]) -> list[str]:
    """argv run as the image runs it: its user, only its environment (plus ``env``)."""
    environment = dict(e.split("=", 1) for e in image.config["Env"]) | env
    return ["chroot", f"--userspec={image.config['User']}:{image.config['User']}", str(root),
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]


def test_the_image_runs_as_non_root_keeps_its_healthcheck_and_has_no_torch(image,
                                                                            read_only_root):
    config = image.config
    assert config["User"] == "10001"
    assert config["Healthcheck"]["Test"] == ["CMD", "visionserve", "health"]
    assert config["Entrypoint"] == ["visionserve"] and config["Cmd"] == ["serve"]
    assert config["StopSignal"] == "SIGTERM" and "/models" in config["Volumes"]
    probe = subprocess.run(in_image(read_only_root, image, [
        "python", "-c", "import importlib.util as u; print([m for m in ('torch', 'torchvision', "
                        "'onnx', 'matplotlib', 'tritonclient') if u.find_spec(m)])"], {}),
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
    added = sum(image.layer_bytes) - sum(image.base_layer_bytes)
    report = {"base": BASE, "base_mb": round(sum(image.base_layer_bytes) / 1e6, 1),
              "image_mb": round(sum(image.layer_bytes) / 1e6, 1),
              "added_mb": round(added / 1e6, 1), "build_s": round(image.build_s, 1)}
    record(report)


def test_the_image_serves_a_mounted_repository_from_a_read_only_root_and_stops_on_sigterm(
        image, read_only_root, server, tmp_path):
    # port 0 (any free one): the ports it bound are read back from its log, which says them
    # once it serves (no --ready-file: nothing in the image's root may be written)
    env = {"VISIONSERVE_GRPC_PORT": "0", "VISIONSERVE_METRICS_PORT": "0",
           "VISIONSERVE_HTTP_PORT": "0", "VISIONSERVE_HOST": "127.0.0.1"}
    log_path = tmp_path / "image.log"
    started = time.monotonic()  # start_to_serving_s: a figure for docs/deploy.md, not asserted
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            in_image(read_only_root, image, image.config["Entrypoint"] + image.config["Cmd"],
                     env), stdout=log, stderr=subprocess.STDOUT)
    inside = None
    try:
        def serving() -> re.Match | None:
            assert process.poll() is None, log_path.read_text()[-3000:]
            return re.search(r"serving gRPC on \S+:(\d+), HTTP on \S+:(\d+), metrics on "
                             r"http://\S+:(\d+)/metrics", log_path.read_text(errors="replace"))

        ports = eventually(serving, "the image's server to be serving", timeout=120)
        serving_s = time.monotonic() - started  # recorded below, never asserted on
        grpc_port, http_port, metrics_port = (int(p) for p in ports.groups())
        env |= {"VISIONSERVE_GRPC_PORT": str(grpc_port)}  # for the HEALTHCHECK's command
        inside = Server(process, log_path, grpc_port, metrics_port, http_port)
        health = health_pb2_grpc.HealthStub(inside.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        # the HEALTHCHECK, as the runtime runs it: the image's command in the image
        check = subprocess.run(in_image(read_only_root, image,
                                        image.config["Healthcheck"]["Test"][1:], env),
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stderr
        request = pb.ClassifyRequest(model="resnet18", images=[pb.Image(
            encoded=encode(photo("chelsea")))], top_k=5, request_id="same")
        want = server.stub.Classify(request, timeout=60)
        assert inside.stub.Classify(request, timeout=60) == want
        # the REST API of the image: the same photo as the body, the same answer
        post = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v2/models/resnet18/classify?top_k=5",
            data=request.images[0].encoded, method="POST")
        with urllib.request.urlopen(post, timeout=60) as reply:
            classes = json.loads(reply.read())["results"][0]["classes"]
        assert [(c["index"], np.float32(c["score"])) for c in classes] == \
            [(c.index, np.float32(c.score)) for c in want.results[0].classes]
        process.send_signal(15)  # what `docker stop` sends (STOPSIGNAL SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in log_path.read_text()
    finally:
        if inside is not None:
            inside.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()
    record({"start_to_serving_s": round(serving_s, 2)})


def record(figures: dict) -> None:
    """Add figures to tests/.cache/image-report.json (the numbers docs/deploy.md quotes)."""
    path = CACHE / "image-report.json"
    report = (json.loads(path.read_text()) if path.exists() else {}) | figures
    CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(report))
    print("serve image:", json.dumps(report))  # noqa: T201 - the figures docs/deploy.md quotes
