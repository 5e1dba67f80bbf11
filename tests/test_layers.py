"""Import contracts: the core (inference, routing, loading, batching, backends, preprocess,
postprocess, the typed messages and errors) knows no wire. It imports neither gRPC nor any
generated protobuf code, so a third front end (HTTP) reuses it as it is; the servicers in
``service/api`` are the only place where wire and core meet. The serving package never imports
the benchmark or the export stage (test_packaging.py checks the running server too)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = ("inference", "routing", "repository_sync", "loader", "batching", "backends",
        "backends.base", "backends.onnxruntime", "backends.tensorrt", "preprocess", "postprocess",
        "repository", "config", "messages", "errors", "tensor_io", "statistics", "metrics", "logs",
        "states", "control", "lifecycle")
WIRE = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "visionserve.v1",
        "visionserve.inference")
NEVER_IN_SERVICE = ("visionserve.bench", "visionserve.export", "torch", "matplotlib")

IMPORT_WITH_BLOCKED = """
import importlib, sys
blocked = sys.argv[1].split(",")
class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"{name} is blocked: this module must not import it")
sys.meta_path.insert(0, Block())
importlib.import_module(sys.argv[2])
"""


def import_blocking(module: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", IMPORT_WITH_BLOCKED, ",".join(blocked), module],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_wire(module):
    result = import_blocking(f"visionserve.service.{module}", WIRE)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("module", ["server", "cli", "api.kserve", "api.vision"])
def test_the_server_imports_no_benchmark_or_export_stage(module):
    result = import_blocking(f"visionserve.service.{module}", NEVER_IN_SERVICE)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_contract_check_itself_catches_a_wire_import():
    """The blocker works: a module that does import gRPC is caught."""
    result = import_blocking("visionserve.service.api.status", WIRE)
    assert result.returncode != 0 and "grpc is blocked" in result.stderr
