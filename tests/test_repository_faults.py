"""What of the repository's faults only a process or a real engine shows: `visionserve export`
flushes every file and folder before the rename that publishes a model (the export process
under strace), and an ONNX Runtime error naming a host path reaches clients without it (the
real engine's own message).

Bad model folders at start-up and while polling, broken newest versions, links outside the
repository, model control's refusals and the fuzzed scan moved to
tests/inprocess/test_repository_sync_faults.py; calls during start-up to
tests/inprocess/test_startup.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_repo, start_server
from visionserve.v1 import visionserve_pb2 as pb


@pytest.mark.slow  # an export under strace: ~50 s
def test_export_flushes_every_file_and_folder_before_the_rename_that_publishes(tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (.ci/run installs it)")
    trace = tmp_path / "trace"
    result = subprocess.run(
        [strace, "-f", "-e", "trace=fsync,rename,renameat,renameat2", "-o", str(trace),
         sys.executable, "-m", "visionserve.service.cli", "export", "lenet5", "--repo",
         str(tmp_path / "repo"), "--random-weights"],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    calls = [line for line in trace.read_text().splitlines() if "fsync" in line or "rename" in line]
    # a new model: its whole folder, staged hidden, renamed into the repository at once
    publish = next(i for i, line in enumerate(calls) if "rename" in line
                   and re.search(r'/\.staging-[^/"]*/lenet5", [^,]*/repo/lenet5"', line))
    assert sum("fsync(" in line for line in calls[:publish]) >= 4, calls  # files and folders
    assert any("fsync(" in line for line in calls[publish + 1:]), calls  # the model folder


def test_an_engine_reason_never_names_a_host_path_outside_the_repository(exported_repo,
                                                                         tmp_path):
    """ONNX Runtime refuses an initializer stored outside the model's folder, and its message
    names the resolved path on the host; clients see the reason without it."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    onnx_file = repo / "lenet5" / "1" / "model.onnx"
    (onnx_file.parent / "manifest.json").unlink()  # rebuilt by hand below: unverified
    graph = onnx.load(onnx_file)
    convert_model_to_external_data(graph, all_tensors_to_one_file=True, location="w.bin",
                                   size_threshold=1024)  # the weights, not shape constants
    onnx.save(graph, onnx_file)
    elsewhere = tmp_path / "weights-elsewhere.bin"  # outside the repository
    (onnx_file.parent / "w.bin").rename(elsewhere)
    graph = onnx.load(onnx_file, load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../weights-elsewhere.bin"  # leaves the folder: refused
    onnx_file.write_bytes(graph.SerializeToString())
    srv = start_server(repo, tmp_path / "server.log")
    try:
        info = srv.stub.GetModel(pb.GetModelRequest(model="lenet5"), timeout=10)
        assert info.state == pb.MODEL_STATE_FAILED, info
        assert "/tmp" not in info.reason and str(tmp_path) not in info.reason, info.reason
        assert "<a path outside the repository>" in info.reason, info.reason
        assert str(tmp_path) in srv.log()  # the operator's log keeps the full path
    finally:
        srv.stop()
