"""What ships: the wheel holds every module of the source tree, the serving path imports nothing
of the benchmark or the export stage, and the serve image's lock is exact, hashed and inside the
ranges pyproject.toml allows. (The wheel installed and served in a fresh venv, and the image built
and run, are the slow tests of test_wheel_install.py and test_serve_image.py.)"""

from __future__ import annotations

import re
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import LOCK, ROOT, TEST_MODELS, encode, locked_versions, photo, run_cli, start_server
from visionserve.v1 import visionserve_pb2 as pb

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOT_MODULES = ("bench/scripts",)  # scripts run from a checkout, not importable


def source_files(tree: Path) -> set[str]:
    """Every module and data file of every folder that pyproject.toml maps to a package, as the
    path it must have inside the wheel; subfolders included, whether listed or not."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    data = setuptools.get("package-data", {})
    expected = set()
    for package, folder in setuptools["package-dir"].items():
        root = tree / folder
        for path in root.rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts or \
                    any(path.is_relative_to(tree / d) for d in NOT_MODULES):
                continue
            patterns = ["*.py", *data.get(package, []),
                        *(sub.removeprefix(package + ".").replace(".", "/") + "/" + pattern
                          for sub, listed in data.items() if sub.startswith(package + ".")
                          for pattern in listed)]  # a data-only subpackage (golden_images)
            if any(path.match(p) for p in patterns):
                inside = path.relative_to(root).as_posix()
                expected.add(package.replace(".", "/") + "/" + inside)
    return expected


def test_the_wheel_holds_every_module_of_the_source_tree(built_wheel, source_copy):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    modules = {n for n in names if not n.startswith("visionserve-")}  # minus .dist-info
    expected = source_files(source_copy)
    assert expected - modules == set(), "in the source tree but not in the wheel"
    assert modules - expected == set(), "in the wheel but not in the source tree"
    for must in ("visionserve/service/process/server.py", "visionserve/bench/cli.py",
                 "visionserve/v1/visionserve.proto", "visionserve/inference/grpc_service_pb2.py"):
        assert must in modules
    assert not any(n.startswith(("tests/", "visionserve/bench/scripts")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "visionserve = visionserve.service.cli:main" in \
        zipfile.ZipFile(built_wheel).read(entry_points).decode()


def test_version_flag_prints_the_installed_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"visionserve {PYPROJECT['project']['version']}"
    assert version("visionserve") == PYPROJECT["project"]["version"]


def test_serving_imports_no_benchmark_export_stage_or_plotting(exported_repo, tmp_path):
    """Every module the server imports, from start to a Classify, an Embed and a KServe call,
    as `python -X importtime` lists them."""
    from tritonclient.grpc import service_pb2 as kpb  # never our KServe stubs in tests
    from tritonclient.grpc import service_pb2_grpc as kpb_grpc

    srv = start_server(exported_repo, tmp_path / "server.log", python_args=("-X", "importtime"))
    try:
        image = pb.Image(encoded=encode(photo("chelsea")))
        srv.stub.Classify(pb.ClassifyRequest(model="resnet18", images=[image]), timeout=60)
        srv.stub.Embed(pb.EmbedRequest(model="resnet18", images=[image]), timeout=60)
        kpb_grpc.GRPCInferenceServiceStub(srv.channel).ModelMetadata(
            kpb.ModelMetadataRequest(name="lenet5"), timeout=60)
    finally:
        assert srv.stop() == 0
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", srv.log(), re.M))
    assert "visionserve.service.process.server" in imported and "onnxruntime" in imported
    for forbidden in ("torch", "torchvision", "onnx", "timm", "matplotlib", "tritonclient",
                      "skimage", "cv2", "simplejpeg", "visionserve.bench", "visionserve.export"):
        assert forbidden not in imported, f"serving imported {forbidden}"
    assert set(TEST_MODELS) <= set(re.findall(r"models ready: ([\w, ]+)", srv.log())[0]
                                   .split(", "))


def test_the_serve_lock_pins_every_serving_dependency_inside_its_declared_range():
    declared = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    extras = PYPROJECT["project"]["optional-dependencies"]
    for lock, swap, extra in ((LOCK, {}, []),
                              (LOCK.with_name("gpu.txt"), {"onnxruntime": "onnxruntime-gpu"}, []),
                              (LOCK.with_name("openvino.txt"), {}, extras["openvino"])):
        pins = locked_versions(lock)
        for req in declared + [Requirement(d) for d in extra]:
            name = canonicalize_name(swap.get(req.name, req.name))
            assert name in pins, f"{lock.name} lacks {name} (run `make lock`)"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"{lock.name}: {name}=={pins[name]} is outside pyproject.toml's {req}"
        text = lock.read_text()
        blocks = [b for b in re.split(r"\n(?=\S)", text.split("\n", 2)[2])
                  if not b.startswith("#")]
        assert len(blocks) == len(pins), f"{lock.name}: one block per pin"
        assert all("--hash=sha256:" in b for b in blocks), \
            f"{lock.name}: every pin carries its hashes"


def test_the_openvino_lock_is_the_serve_lock_plus_openvino():
    """The image built with --build-arg LOCK=openvino.txt runs every serving package at the
    default image's version, with OpenVINO's packages added."""
    plain, openvino = locked_versions(LOCK), locked_versions(LOCK.with_name("openvino.txt"))
    assert plain  # two empty locks would compare equal
    assert {k: v for k, v in openvino.items() if not k.startswith("openvino")} == plain
    assert {k for k in openvino if k.startswith("openvino")} == {"openvino",
                                                                 "openvino-telemetry"}


def test_the_dev_environment_runs_the_locked_serving_versions():
    """`make setup` installs with the lock as constraints: the versions the tests exercise are
    the ones the image ships (the OpenVINO image's lock: the default one's plus OpenVINO)."""
    from importlib.metadata import distribution

    pins = locked_versions(LOCK.with_name("openvino.txt"))
    assert pins  # a lock read as empty would check nothing
    for name, pinned in pins.items():
        assert distribution(name).version == pinned, (
            f"{name} {distribution(name).version} here, {pinned} in {LOCK.name}: run make setup")


@pytest.mark.parametrize("floor", ["pillow>=12.3", "onnxruntime>=1.24.1"])
def test_security_floors_stay_declared_and_documented(floor):
    """A floor raised for a security reason is not lowered by accident, and docs/security.md
    names it. (What the ONNX Runtime floor buys is tested in test_security.py.)"""
    assert any(d.replace(" ", "").startswith(floor) for d in PYPROJECT["project"]["dependencies"])
    assert floor in (ROOT / "docs" / "security.md").read_text().lower()
