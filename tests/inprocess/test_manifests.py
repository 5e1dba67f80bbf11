"""A version's manifest (docs/repository.md#manifests): a version that carries one serves only
when its folder holds exactly the listed files, at the listed sizes and sha256; a partial copy
loads once complete, a tampered or padded one never, and the version before keeps serving. A
version without one loads unverified, said in the log, unless the server requires manifests.

The manifests here are written by the test from the documented format (``seal``), not by the
export code, so the format itself is what is specified."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import eventually
from inprocess.harness import InProcessServer, fake_repo, lenet5_repo, publish_fake
from visionserve.v1 import visionserve_pb2 as pb

POLL = ("--poll-interval-s", "0.1")
LENET_X = np.zeros((1, 32, 32), np.float32)


def seal(version: Path) -> None:
    """Write ``manifest.json`` as documented: every other file of the folder, relative path
    ("/"-separated), size in bytes, sha256 in hex."""
    files = sorted(p for p in version.rglob("*") if p.is_file() and p.name != "manifest.json")
    (version / "manifest.json").write_text(json.dumps({"format": 1, "files": [
        {"path": p.relative_to(version).as_posix(), "size": p.stat().st_size,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]}))


def sealed_lenet5(dst: Path) -> Path:
    repo = lenet5_repo(dst)
    seal(repo / "lenet5" / "1")
    return repo


def classify(srv: InProcessServer, version: int = 0) -> pb.ClassifyResponse:
    return srv.stub.Classify(pb.ClassifyRequest(model="lenet5", version=version, images=[
        pb.Image(tensor=pb.Tensor(shape=[1, 32, 32], dtype=pb.DTYPE_FLOAT32,
                                  data=LENET_X.tobytes()))]), timeout=30)


def version_state(srv: InProcessServer, number: int) -> tuple[int, str]:
    info = srv.stub.GetModel(pb.GetModelRequest(model="lenet5"), timeout=10)
    return next(((v.state, v.reason) for v in info.versions if v.version == number), (0, ""))


# --- each fault: applied to a sealed version 2, returns what its reason must say ---------------

def flipped_byte(v: Path) -> str:
    data = bytearray((v / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash tells
    (v / "model.onnx").write_bytes(bytes(data))
    return "model.onnx does not match its sha256 in manifest.json (altered or corrupted)"


def extra_file(v: Path) -> str:
    (v / "payload.so").write_bytes(b"\x7fELF")
    return "payload.so is not listed in manifest.json"


def size_lie(v: Path) -> str:
    document = json.loads((v / "manifest.json").read_text())
    document["files"][0]["size"] += 1
    (v / "manifest.json").write_text(json.dumps(document))
    return "manifest.json says"


def path_leaves_the_folder(v: Path) -> str:
    document = json.loads((v / "manifest.json").read_text())
    document["files"][0]["path"] = "../1/model.onnx"
    (v / "manifest.json").write_text(json.dumps(document))
    return "manifest.json cannot be read as a manifest"


def not_json(v: Path) -> str:
    (v / "manifest.json").write_text("{")
    return "manifest.json cannot be read as a manifest"


@pytest.mark.parametrize("fault", [flipped_byte, extra_file, size_lie, path_leaves_the_folder,
                                   not_json])
def test_a_version_off_its_manifest_is_refused_naming_the_file_and_the_previous_one_serves(
        start, tmp_path, fault: Callable[[Path], str]):
    repo = sealed_lenet5(tmp_path / "repo")
    srv = start(repo, *POLL)
    assert classify(srv).version == 1
    staged = tmp_path / "staged"  # version 2 made whole, then broken, then published at once
    shutil.copytree(publish_fake(repo / "lenet5", 2), staged)
    shutil.rmtree(repo / "lenet5" / "2")
    shutil.copy(repo / "lenet5" / "labels.txt", staged / "labels.txt")
    seal(staged)
    expected = fault(staged)
    staged.rename(repo / "lenet5" / "2")
    eventually(lambda: version_state(srv, 2)[0] == pb.MODEL_STATE_FAILED, "version 2 refused")
    reason = version_state(srv, 2)[1]
    assert "model lenet5 version 2" in reason and expected in reason, reason
    assert str(tmp_path) not in reason  # the file named inside the version, never a host path
    assert classify(srv).version == 1  # the version before keeps serving
    with pytest.raises(grpc.RpcError) as err:
        classify(srv, version=2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_copy_in_progress_loads_once_every_listed_file_is_there(start, tmp_path):
    """rsync of a version, manifest first: refused while a file is missing or short, served the
    moment the copy completes (the next poll sees the files change)."""
    repo = sealed_lenet5(tmp_path / "repo")
    srv = start(repo, *POLL)
    source = tmp_path / "source"
    shutil.copytree(publish_fake(repo / "lenet5", 2), source)
    shutil.rmtree(repo / "lenet5" / "2")
    seal(source)
    target = repo / "lenet5" / "2"
    target.mkdir()
    shutil.copy(source / "manifest.json", target)
    eventually(lambda: "model.onnx is listed in manifest.json but missing" in
               version_state(srv, 2)[1], "the missing file named")
    whole = (source / "model.onnx").read_bytes()
    (target / "model.onnx").write_bytes(whole[: len(whole) // 2])
    eventually(lambda: "model.onnx is" in version_state(srv, 2)[1] and "bytes" in
               version_state(srv, 2)[1], "the short file named")
    assert classify(srv).version == 1
    (target / "model.onnx").write_bytes(whole)
    eventually(lambda: classify(srv).version == 2, "version 2 to serve once complete")


def test_a_version_without_a_manifest_loads_unverified_unless_manifests_are_required(
        start, tmp_path):
    repo = fake_repo(tmp_path / "repo", ("lenet5",))  # copied by hand: no manifest
    srv = start(repo)
    assert classify(srv).version == 1
    assert "model lenet5 version 1 has no manifest.json: loading it unverified" in srv.log()
    strict = start(fake_repo(tmp_path / "strict", ("lenet5",)), "--require-manifest")
    state, reason = version_state(strict, 1)
    assert state == pb.MODEL_STATE_FAILED
    assert "model lenet5 version 1: no manifest.json" in reason
    assert "--require-manifest" in reason and "visionserve export" in reason
    sealed = start(sealed_lenet5(tmp_path / "sealed"), "--require-manifest")
    assert classify(sealed).version == 1
