"""The engine-utilization signal (docs/metrics.md): busy instance-seconds over a sliding window,
computed on a clock the test moves by hand, then the series a running server exports."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import edit_config, eventually, tensor_image
from visionserve.service.utilization import BusyTime
from visionserve.v1 import visionserve_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_utilization_is_the_busy_fraction_of_the_window_over_every_instance(clock):
    busy = BusyTime(instances=2, window_s=10.0, clock=clock)
    clock.now += 10
    assert busy.busy_over_window() == (0.0, 20.0)  # idle
    busy.set_busy(1)
    clock.now += 10
    assert busy.busy_over_window() == (10.0, 20.0)  # one of two instances all the time: 0.5
    busy.set_busy(2)
    clock.now += 10
    assert busy.busy_over_window() == (20.0, 20.0)  # saturated: 1.0
    busy.set_busy(0)
    clock.now += 2.5
    assert busy.busy_over_window() == (15.0, 20.0)  # the window slides over the idle time
    assert busy.busy_seconds() == 30.0  # the integral keeps everything


def test_a_batch_still_computing_counts_and_a_young_version_is_measured_over_its_age(clock):
    busy = BusyTime(instances=1, window_s=10.0, clock=clock)
    clock.now += 1
    busy.set_busy(1)
    clock.now += 3  # a long batch, not finished yet
    assert busy.busy_over_window() == (3.0, 4.0)  # 4 s old: 0.75, not 3/10
    clock.now += 100
    busy.set_busy(0)
    assert busy.busy_over_window() == (10.0, 10.0)
    clock.now += 100
    assert busy.busy_over_window() == (0.0, 10.0)
    assert busy.busy_seconds() == 103.0


def test_many_short_batches_add_up_and_old_ones_leave_the_window(clock):
    busy = BusyTime(instances=1, window_s=10.0, clock=clock)
    for _ in range(1000):  # 1000 batches of 4 ms every 10 ms
        busy.set_busy(1)
        clock.now += 0.004
        busy.set_busy(0)
        clock.now += 0.006
    used, available = busy.busy_over_window()
    assert available == pytest.approx(10.0) and used == pytest.approx(4.0)
    assert busy.busy_seconds() == pytest.approx(4.0)


def test_a_server_exports_utilization_per_version_and_for_the_whole_server(server_factory):
    srv = server_factory(("resnet18",))
    text = srv.metrics_text()
    assert 'visionserve_engine_utilization{model="resnet18",version="1"} 0.0' in text
    assert "\nvisionserve_engine_utilization 0.0" in text  # the whole server, no labels
    srv.engines.hold("resnet18")
    reply = srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[
        tensor_image(np.zeros((224, 224, 3), np.uint8))]), timeout=60)
    eventually(lambda: srv.engines.waiting("resnet18") == 1, "the batch inside the engine")
    first = srv.metric("visionserve_engine_busy_seconds_total", model="resnet18")
    second = eventually(lambda: (v := srv.metric("visionserve_engine_busy_seconds_total",
                                                 model="resnet18")) > first and v,
                        "busy time to grow while the batch computes")
    assert 0 < srv.metric("visionserve_engine_utilization", model="resnet18") <= 1.0
    srv.engines.release("resnet18")
    reply.result()
    eventually(lambda: srv.metric("visionserve_engine_busy_seconds_total", model="resnet18")
               > second, "the batch's whole time to count")


GRPCURL = Path(sys.executable).parent / "grpcurl"


def orca_report(srv) -> dict[int, float] | None:
    """The OrcaLoadReport in the trailers of a GetModel call, as grpcurl (Go's gRPC client)
    prints them: {field number: double}; None without one. (grpcio's own client hands this key
    to its load balancer, never to the application.)"""
    out = subprocess.run([str(GRPCURL), "-plaintext", "-v", "-d", '{"model": "resnet18"}',
                          f"127.0.0.1:{srv.grpc_port}", "visionserve.v1.VisionService/GetModel"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = re.search(r"^endpoint-load-metrics-bin: (\S+)$", out.stdout, re.M)
    if found is None:
        return None
    data = base64.b64decode(found[1] + "=" * (-len(found[1]) % 4))
    fields = {}
    while data:
        tag, value = struct.unpack_from("<Bd", data)
        assert tag & 7 == 1, tag  # doubles only
        fields[tag >> 3] = value
        data = data[9:]
    return fields


def test_orca_load_reports_carry_the_servers_utilization_on_every_unary_reply(server_factory):
    assert orca_report(server_factory(("resnet18",))) is None  # opt-in
    srv = server_factory(("resnet18",), None, "--orca-load-reports")
    assert set(orca_report(srv) or {}) == {6, 9}  # rps_fractional, application_utilization
    srv.engines.hold("resnet18")  # a batch computes (held) for a while: the server is busy
    busy = srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[
        tensor_image(np.zeros((224, 224, 3), np.uint8))]), timeout=60)
    eventually(lambda: srv.engines.waiting("resnet18") == 1, "the batch inside the engine")
    report = eventually(lambda: (r := orca_report(srv)) and r[9] > 0 and r,
                        "a report with the busy engine's utilization", interval=0.3)
    assert 0 < report[9] <= 1.0 and report[6] > 0  # a utilization, and calls per second
    srv.engines.release("resnet18")
    busy.result()


def test_a_version_reloaded_in_place_keeps_its_series_and_an_unloaded_one_loses_them(
        server_factory):
    srv = server_factory(("resnet18",), None, "--poll-interval-s", "0.1")
    series = 'visionserve_engine_utilization{model="resnet18",version="1"}'
    assert series in srv.metrics_text()
    loads = srv.engines.loaded.count(("resnet18", 1))
    edit_config(srv.repo / "resnet18", {"max_batch_size": 8})  # reloads version 1 in place
    eventually(lambda: srv.engines.loaded.count(("resnet18", 1)) > loads
               and ("resnet18", 1) in srv.engines.closed, "version 1 reloaded, the old released")
    assert series in srv.metrics_text()  # the old engine's release left the new one's series
    shutil.rmtree(srv.repo / "resnet18")
    eventually(lambda: series not in srv.metrics_text(), "the removed model's series to go")
