"""A fleet on one machine: replicas of `visionserve serve` sharing one repository, behind real
balancers: HAProxy (Debian's package) with the committed deploy/haproxy/haproxy.cfg for HTTP,
and gRPC's own client-side balancing with the committed deploy/grpc/service_config.json
(round robin, retries on UNAVAILABLE). Short forms: LeNet-5, two or three replicas."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conftest import ROOT, Load, Server, encode, eventually, make_repo, photo, publish, start_server
from visionserve.bench.launch import free_port
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

DEPLOY = ROOT / "deploy"
PNG = encode(photo("camera"), "PNG")
REQUEST = pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=PNG)])


def served_by(server: Server, method: str) -> float:
    """Calls of ``method`` this replica answered (its own metrics)."""
    return server.metric("visionserve_request_duration_seconds_count", method=method)


class HAProxy:
    """HAProxy 2.6 running the committed configuration, with one server line per replica."""

    def __init__(self, replicas: list[Server], folder: Path) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            pytest.skip("haproxy is not installed (.ci/run installs Debian's package)")
        self.port = free_port()
        config = folder / "haproxy.cfg"
        config.write_text((DEPLOY / "haproxy" / "haproxy.cfg").read_text() + "".join(
            f"    server replica-{i} 127.0.0.1:{r.http_port} check\n"
            for i, r in enumerate(replicas)))
        self.log = folder / "haproxy.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "VISIONSERVE_LB_BIND": f"127.0.0.1:{self.port}"})
        eventually(lambda: self.ready() == 200, "HAProxy to route to a ready replica")

    def ready(self) -> int:
        assert self.process.poll() is None, self.log.read_text(errors="replace")[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready",
                                        timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def classify(self) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v2/models/lenet5/classify",
                                         data=PNG, method="POST",
                                         headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@dataclass
class Via:
    """A client of the fleet for ``Load``: its stub over a balanced channel."""

    stub: pb_grpc.VisionServiceStub


def grpc_channel(replicas: list[Server]) -> grpc.Channel:
    """One channel over every replica, configured by the committed service config."""
    config = (DEPLOY / "grpc" / "service_config.json").read_text()
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.grpc_port}" for r in replicas)
    return grpc.insecure_channel(target, options=[("grpc.service_config", config),
                                                  ("grpc.enable_retries", 1)])


@pytest.fixture(scope="module")
def fleet(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("fleet")
    repo = make_repo(exported_repo, folder / "repo", ("lenet5",))
    replicas = [start_server(repo, folder / f"replica{i}.log", "--poll-interval-s", "0.5")
                for i in range(2)]
    balancer = HAProxy(replicas, folder)
    yield {"repo": repo, "replicas": replicas, "haproxy": balancer, "folder": folder}
    balancer.stop()
    for r in replicas:
        r.stop()


def test_both_balancers_spread_calls_over_every_replica(fleet) -> None:
    replicas: list[Server] = fleet["replicas"]
    before = [served_by(r, "http.Classify") for r in replicas]
    for _ in range(20):
        assert fleet["haproxy"].classify() == 200
    after = [served_by(r, "http.Classify") for r in replicas]
    assert sum(after) - sum(before) == 20 and all(a > b for a, b in zip(after, before,
                                                                          strict=True))
    with grpc_channel(replicas) as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        start = [served_by(r, "Classify") for r in replicas]
        # until both connections are up, round robin picks among those that are
        eventually(lambda: stub.Classify(REQUEST, timeout=30) and all(
            served_by(r, "Classify") > s for r, s in zip(replicas, start, strict=True)),
            "a call on every replica")
        before = [served_by(r, "Classify") for r in replicas]
        for _ in range(20):
            stub.Classify(REQUEST, timeout=30)
    after = [served_by(r, "Classify") for r in replicas]
    assert [a - b for a, b in zip(after, before, strict=True)] == [10, 10]  # round robin


def test_a_new_version_reaches_every_replica_and_no_client_goes_back(fleet) -> None:
    replicas: list[Server] = fleet["replicas"]
    with grpc_channel(replicas) as channel:
        load = Load(Via(pb_grpc.VisionServiceStub(channel)), REQUEST, clients=4)
        try:
            publish(fleet["repo"] / "lenet5", 2, fleet["repo"] / "lenet5" / "1")
            for r in replicas:
                eventually(lambda r=r: r.stub.Classify(REQUEST, timeout=30).version == 2,
                           "every replica to serve version 2", timeout=120)
            seen = len(load.replies)
            eventually(lambda: len(load.replies) > seen + 20, "calls after the swap")
        finally:
            load.stop()
    assert load.errors() == []
    # once both replicas serve version 2, no call is answered by version 1 again
    last_old = max(i for i, (_, v, _) in enumerate(load.replies) if v == 1)
    assert all(v == 2 for _, v, _ in load.replies[last_old + 1:])
    assert len(load.replies) - last_old > 20


def test_a_draining_replica_leaves_haproxys_rotation_before_it_refuses(fleet, tmp_path) -> None:
    replicas: list[Server] = fleet["replicas"]
    extra = start_server(fleet["repo"], tmp_path / "draining.log", "--shutdown-delay-s", "30")
    balancer = HAProxy([*replicas, extra], tmp_path)
    try:
        extra.process.send_signal(signal.SIGTERM)  # not ready from now on, still serving
        eventually(lambda: "is DOWN" in balancer.log.read_text(errors="replace"),
                   "HAProxy to take the draining replica out", timeout=60)
        before = served_by(extra, "http.Classify")
        for _ in range(20):
            assert balancer.classify() == 200
        assert served_by(extra, "http.Classify") == before  # none reached it
    finally:
        balancer.stop()
        extra.stop()


def test_a_replica_killed_under_load_loses_no_call_with_the_retry_policy(fleet) -> None:
    """Last: it kills one of the module's replicas."""
    replicas: list[Server] = fleet["replicas"]
    with grpc_channel(replicas) as channel:
        load = Load(Via(pb_grpc.VisionServiceStub(channel)), REQUEST, clients=4)
        try:
            before = served_by(replicas[1], "Classify")
            eventually(lambda: served_by(replicas[1], "Classify") > before + 10, "load on both")
            replicas[1].process.kill()  # SIGKILL: the calls in flight there are cut
            replicas[1].process.wait(timeout=30)
            seen = len(load.replies)
            eventually(lambda: len(load.replies) > seen + 50, "calls after the kill")
        finally:
            load.stop()
    assert load.errors() == []  # calls cut by the kill were retried on the survivor
