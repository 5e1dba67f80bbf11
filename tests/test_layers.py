"""Import contracts: the core (inference, routing, loading, batching, backends, preprocess,
postprocess, the typed messages and errors) knows no wire. It imports neither gRPC nor any
generated protobuf code, so a third front end (HTTP) reuses it as it is; the servicers in
``service/api`` are the only place where wire and core meet. The serving package never imports
the benchmark or the export stage (test_packaging.py checks the running server too)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

SERVICE = ROOT / "service"


def service_modules() -> list[str]:
    """Every module and package of service/ ("backends", "api.rest"), read from the tree: a
    module added there is checked without anyone adding it to a list here."""
    return sorted(".".join(p.relative_to(SERVICE).with_suffix("").parts).removesuffix(".__init__")
                  for p in SERVICE.rglob("*.py") if "__pycache__" not in p.parts
                  and p != SERVICE / "__init__.py")


# The modules outside service/api that may meet the wire: the server that wires the front ends
# up, the CLI and its client commands, TLS/token security, the terminal renderer of replies and
# Triton's config writer. Every other module of service/ is the core. A new module that imports
# gRPC or generated code fails below until it is named here (or moves into service/api).
WIRE_SIDE = ("server", "cli", "client", "client_commands", "auth", "tls", "terminal",
             "triton_config", "http_listener", "metrics_http")
CORE = tuple(m for m in service_modules()
             if m != "api" and not m.startswith("api.") and m not in WIRE_SIDE)
FRONT_ENDS = tuple(m for m in service_modules() if m.startswith("api."))
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


def test_the_module_lists_are_read_from_the_tree():
    """The lists the tests below run over are not empty, name only modules that exist, and
    hold the core modules the docstring names."""
    assert set(WIRE_SIDE) <= set(service_modules()), set(WIRE_SIDE) - set(service_modules())
    assert {"inference", "routing", "loader", "batching", "backends", "backends.base",
            "preprocess", "postprocess", "messages", "errors"} <= set(CORE)
    assert {"api.kserve", "api.vision", "api.rest"} <= set(FRONT_ENDS)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_wire(module):
    result = import_blocking(f"visionserve.service.{module}", WIRE)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("module", ["server", "cli", *FRONT_ENDS])
def test_the_server_imports_no_benchmark_or_export_stage(module):
    result = import_blocking(f"visionserve.service.{module}", NEVER_IN_SERVICE)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_contract_check_itself_catches_a_wire_import():
    """The blocker works: a module that does import gRPC is caught."""
    result = import_blocking("visionserve.service.api.status", WIRE)
    assert result.returncode != 0 and "grpc is blocked" in result.stderr
