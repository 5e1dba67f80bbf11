"""The floor plan, enforced. Each folder of ``service/`` is one layer of docs/architecture.md and
imports only its own layer and the layers below it; the modules at ``service/``'s root are the
vocabulary every layer shares. Everything here is read from the tree: a module added to a
folder is checked without anyone adding it to a list, and a new folder fails until it is given
its place in ``LAYERS``.

Beyond the order: the engine, the models and the core (and the vocabulary) import neither gRPC,
nor protobuf, nor aiohttp, so a front end is a thin layer over them; the HTTP front end is a
peer of the gRPC one, not its client; no module of the server imports the benchmark, the export
stage or PyTorch; no module (of the service, the export stage or the benchmark) is over 400
lines, no function over 60 without saying why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SERVICE = ROOT / "service"
PACKAGE = "visionserve.service"

# bottom to top; "" is the root's vocabulary (errors, states, logs, metrics, lifecycle, limits…)
LAYERS = ("", "format", "engine", "models", "core", "api", "process", "cli")
NO_WIRE_LAYERS = ("", "engine", "models", "core")
WIRE = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "aiohttp",
        "visionserve.v1", "visionserve.inference")
NEVER_IN_SERVICE = ("visionserve.bench", "visionserve.export", "torch", "matplotlib")


def modules() -> dict[str, Path]:
    """Every module of service/ by dotted name relative to the package ("engine.batching",
    "api.grpc.kserve", "models" for a package's __init__), read from the tree."""
    found = {}
    for path in SERVICE.rglob("*.py"):
        if "__pycache__" in path.parts or path.name == "__main__.py":
            continue
        parts = path.relative_to(SERVICE).with_suffix("").parts
        found[".".join(parts).removesuffix("__init__").rstrip(".")] = path
    return found


def layer_of(module: str) -> str:
    first = module.split(".")[0]
    return first if (SERVICE / first).is_dir() else ""


def imports_of(module: str, path: Path, package: str, known) -> set[str]:
    """The modules of ``package`` that ``module`` imports, anywhere in it (lazy imports too),
    relative to the package: ``from ..engine.batching import X`` → "engine.batching"."""
    here = module.split(".") if module else []
    base = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[:len(base) - (node.level - 1)] +
                                  (node.module.split(".") if node.module else []))
            elif (node.module or "").startswith(package + "."):
                target = node.module.removeprefix(package + ".")
            else:
                continue
            found |= {f"{target}.{a.name}".lstrip(".") if f"{target}.{a.name}".lstrip(".")
                      in known else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix(package + ".") for a in node.names
                      if a.name.startswith(package + ".")}
    return found


def imported(module: str, path: Path) -> set[str]:
    return imports_of(module, path, PACKAGE, MODULES)

MODULES = modules()


def test_every_folder_of_the_service_is_a_layer_and_the_plan_holds_its_shape():
    folders = {p.name for p in SERVICE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {""}, f"give a new folder its place in LAYERS: {folders}"
    root = [m for m in MODULES if layer_of(m) == "" and m]
    assert 5 <= len(root) <= 12, root  # the vocabulary stays small: the rest lives in rooms
    assert {"errors", "states", "logs", "metrics", "lifecycle", "limits"} <= set(root)
    assert all(m in MODULES for m in ("engine.batching", "models.routing", "core.inference",
                                      "api.grpc.kserve", "api.http.rest", "process.server"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_layer_and_those_below(module):
    rank = LAYERS.index(layer_of(module))
    above = sorted(t for t in imported(module, MODULES[module])
                   if LAYERS.index(layer_of(t)) > rank)
    assert not above, f"{module} ({layer_of(module) or 'root'}) imports a layer above it: {above}"


def external_imports(path: Path) -> set[str]:
    """The top modules of the packages outside the service that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("api.http")))
def test_the_http_front_end_is_a_peer_of_the_grpc_one(module):
    """REST builds typed calls itself and encodes the typed views itself: it imports neither
    the gRPC servicers nor gRPC nor the KServe protobuf modules."""
    assert not {t for t in imported(module, MODULES[module]) if t.startswith("api.grpc")}
    wire = {m for m in external_imports(MODULES[module])
            if m.split(".")[0] in ("grpc", "grpc_health", "google")
            or m.startswith(("visionserve.inference", "visionserve.v1"))}
    assert not wire, f"{module} imports {wire}"


def test_the_import_reader_sees_relative_absolute_and_lazy_imports():
    """The check above can fail: the server's own module imports every layer."""
    seen = imported("process.server", MODULES["process.server"])
    assert {"api.grpc.kserve", "core.inference", "models.routing", "engine.decode_pool",
            "metrics"} <= seen
    assert "models.golden" in imported("process.server", MODULES["process.server"])
    assert "engine.backends.base" in imported("models.golden", MODULES["models.golden"])
    assert "grpc" in external_imports(MODULES["api.grpc.kserve"])
    assert "visionserve.inference" in external_imports(MODULES["api.grpc.kserve"])


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
    return subprocess.run([sys.executable, "-c", IMPORT_WITH_BLOCKED, ",".join(blocked),
                           f"{PACKAGE}.{module}".rstrip(".")],
                          capture_output=True, text=True, timeout=120)


NO_WIRE = sorted(m for m in MODULES if layer_of(m) in NO_WIRE_LAYERS and m)


@pytest.mark.parametrize("module", NO_WIRE)
def test_the_engine_models_and_core_import_no_wire(module):
    result = import_blocking(module, WIRE)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_wire_check_itself_catches_a_wire_import():
    assert {"engine.batching", "models.routing", "core.inference", "errors"} <= set(NO_WIRE)
    result = import_blocking("api.grpc.status", WIRE)
    assert result.returncode != 0 and "grpc is blocked" in result.stderr


@pytest.mark.parametrize("module", ["process.server", "cli", "api.grpc.kserve", "api.http.rest"])
def test_the_server_imports_no_benchmark_or_export_stage(module):
    result = import_blocking(module, NEVER_IN_SERVICE)
    assert result.returncode == 0, result.stderr[-2000:]


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


CODE = {f"{folder}/{p.relative_to(ROOT / folder)}": p for folder in ("service", "export", "bench")
        for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}


def test_no_module_is_over_400_lines():
    sizes = {name: len(p.read_text().splitlines()) for name, p in CODE.items()}
    assert len(sizes) > 100 and {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_60_lines_without_saying_why():
    """A longer function's docstring says "Long because …"."""
    long = {}
    for name, path in CODE.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES \
                    and "Long because" not in (ast.get_docstring(node) or ""):
                long[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports (lazy imports included)."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix("__init__")
             .rstrip("."): p for p in root.rglob("*.py")
             if "__pycache__" not in p.parts and p.name != "__main__.py"}
    graph = {}
    for module, path in paths.items():
        targets = imports_of(module, path, package, paths)
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


@pytest.mark.parametrize(("folder", "package"), [("service", PACKAGE),
                                                 ("export", "visionserve.export"),
                                                 ("bench", "visionserve.bench")])
def test_no_import_cycles(folder, package):
    graph = import_graph(ROOT / folder, package)
    assert len(graph) > 5 and cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
