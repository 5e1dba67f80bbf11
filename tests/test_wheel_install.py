"""The wheel, installed as a user installs it: a fresh venv, no extras, the serve image's lock
(hash-checked), then our wheel. It serves an exported repository and answers exactly what the
editable install answers (same lock in both); the extras it lacks are named when asked for.
Each venv installs with --no-index from wheels downloaded once into tests/.cache/wheels (keyed
by the lock's content, conftest.download_wheels), not from the registry per venv."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kpb  # never our KServe stubs (tests/test_kserve.py)
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from conftest import LOCK, ROOT, Server, content_key, download_wheels, encode, photo
from visionserve.bench.launch import start_visionserve
from visionserve.service.format.model_format import INPUT
from visionserve.v1 import visionserve_pb2 as pb

pytestmark = pytest.mark.slow

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
names = []
for top in ("visionserve.service", "visionserve.v1", "visionserve.inference"):
    package = importlib.import_module(top)
    names += [top] + [m.name for m in pkgutil.walk_packages(package.__path__, top + ".")]
# a __main__ runs the program when imported (`python -m visionserve.service.cli`): found, not run
mains = [n for n in names if n.endswith(".__main__")]
assert mains == ["visionserve.service.cli.__main__"], mains
for name in names:
    if name not in mains:
        importlib.import_module(name)
assert "torch" not in sys.modules
print(len(names))
"""


def pip(venv: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                             "--no-cache-dir", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def install_lock(venv: Path, lock: Path, wheels: Path) -> None:
    """The lock with --require-hashes, binary only, from its downloaded wheels alone. Without
    compiling the third-party modules to bytecode (half the install's time; Python compiles what
    it imports): our wheel, installed next, is compiled as the Dockerfile compiles it."""
    pip(venv, "--no-index", "--find-links", str(wheels), "--require-hashes",
        "--only-binary=:all:", "--no-compile", "-r", str(lock))


@pytest.fixture(scope="module")
def user_venv(built_wheel: Path, lock_wheels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python3.11 -m venv`, the lock with --require-hashes, the wheel with --no-deps."""
    venv = tmp_path_factory.mktemp("user") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install_lock(venv, LOCK, lock_wheels(LOCK))
    pip(venv, "--no-index", "--no-deps", str(built_wheel))
    return venv


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "visionserve"), *args], capture_output=True,
                          text=True, timeout=120, cwd=venv)


def answers(srv: Server) -> tuple[pb.ClassifyResponse, kpb.ModelInferResponse]:
    """A Classify of a real JPEG and a KServe ModelInfer of a seeded tensor (messages compare
    field by field: every float and every raw output byte)."""
    image = pb.Image(encoded=encode(photo("chelsea")))
    classify = srv.stub.Classify(pb.ClassifyRequest(model="resnet18", images=[image], top_k=5,
                                                    request_id="same"), timeout=60)
    batch = np.random.default_rng(7).standard_normal((2, 3, 224, 224), dtype=np.float32)
    request = kpb.ModelInferRequest(
        model_name="resnet18", id="same",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="FP32",
                                                       shape=list(batch.shape))],
        raw_input_contents=[batch.tobytes()])
    infer = kpb_grpc.GRPCInferenceServiceStub(srv.channel).ModelInfer(request, timeout=60)
    return classify, infer


def test_the_installed_wheel_has_no_torch_and_imports_every_serving_module(user_venv):
    python = str(user_venv / "bin" / "python")
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr
    result = subprocess.run([python, "-c", IMPORT_EVERY_MODULE], capture_output=True,
                            text=True, timeout=300, cwd=user_venv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) > 20  # the service, its api/ and backends/, both protos
    assert run(user_venv, "--version").stdout.startswith("visionserve 0.")


def test_commands_of_missing_extras_exit_2_naming_the_extra(user_venv):
    export = run(user_venv, "export", "resnet18", "--repo", str(user_venv / "repo"))
    assert export.returncode == 2, export.stderr
    # the hint names this project's wheel, never PyPI's unrelated project of the same name
    assert "'export' extra" in export.stderr and ".whl[export]'" in export.stderr
    assert "visionserve is not on PyPI" in export.stderr
    assert "pip install 'visionserve[" not in export.stderr
    bench = run(user_venv, "bench", "--help")
    assert bench.returncode == 2, bench.stderr
    assert "'bench' extra" in bench.stderr and ".whl[bench]'" in bench.stderr


def test_the_installed_wheel_serves_what_the_editable_install_serves(user_venv, server,
                                                                      exported_repo, tmp_path):
    launched = start_visionserve(exported_repo, name="installed wheel",
                                 command=(str(user_venv / "bin" / "visionserve"),),
                                 log_path=tmp_path / "wheel.log", cwd=tmp_path)
    installed = Server(launched.process, launched.log_path, launched.grpc_port,
                       launched.metrics_port)
    try:
        health = run(user_venv, "health", "--server", installed.address)
        assert health.returncode == 0 and "SERVING" in health.stdout
        assert answers(installed) == answers(server)  # bit-identical replies
    finally:
        assert installed.stop() == 0


def test_the_bench_extra_brings_the_bench_command(built_wheel, tmp_path):
    """`pip install visionserve[bench]` in a venv of its own (the lock's versions as
    constraints: the hash mode cannot resolve an extra)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(line.rstrip(" \\") for line in LOCK.read_text().splitlines()
                                     if "--hash=" not in line) + "\n")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["bench"]
    wheels = download_wheels("bench", content_key([constraints.read_text(), wanted]),
                             "-c", str(constraints), *wanted)
    pip(venv, "--no-index", "--find-links", str(wheels), "--no-compile", "-c", str(constraints),
        f"{built_wheel}[bench]")
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                          capture_output=True).returncode == 1  # the bench needs no PyTorch
    bench = run(venv, "bench", "--help")
    assert bench.returncode == 0, bench.stderr
    assert "usage: visionserve bench" in bench.stdout and "--concurrency" in bench.stdout
    decode = run(venv, "bench-decode", "--help")
    assert decode.returncode == 0 and "--sizes" in decode.stdout


def test_the_openvino_image_lock_serves_openvino_models(built_wheel, exported_repo, lock_wheels,
                                                        tmp_path):
    """What `--build-arg LOCK=openvino.txt` installs (hash-checked, then the wheel): a model
    configured for OpenVINO loads, passes its golden check there and answers; telemetry off."""
    from conftest import edit_config, make_repo

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    lock = LOCK.with_name("openvino.txt")
    install_lock(venv, lock, lock_wheels(lock))
    pip(venv, "--no-index", "--no-deps", str(built_wheel))
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",))
    edit_config(repo / "resnet18", {"backend": "openvino"})
    home = tmp_path / "home"
    home.mkdir()
    launched = start_visionserve(repo, name="openvino image lock",
                                 command=(str(venv / "bin" / "visionserve"),),
                                 env={"HOME": str(home)}, log_path=tmp_path / "ov.log",
                                 cwd=tmp_path)
    installed = Server(launched.process, launched.log_path, launched.grpc_port,
                       launched.metrics_port)
    try:
        info = installed.stub.GetModel(pb.GetModelRequest(model="resnet18"))
        assert (info.backend, info.state) == ("openvino", pb.MODEL_STATE_READY), info.reason
        classify, _ = answers(installed)
        assert len(classify.results[0].classes) == 5
        assert "passed its golden check" in installed.log()
    finally:
        assert installed.stop() == 0
    assert not (home / "intel").exists()
