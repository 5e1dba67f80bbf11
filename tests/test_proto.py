"""Generated protobuf code is produced by one command (`make proto`) and never goes stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

GENERATED = ("visionserve_pb2.py", "visionserve_pb2.pyi", "visionserve_pb2_grpc.py")


def test_generated_code_matches_the_proto_sources(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "proto/visionserve/v1/visionserve.proto"],
                   check=True, cwd=ROOT)
    for name in GENERATED:
        fresh = (tmp_path / "visionserve" / "v1" / name).read_text()
        committed = (ROOT / "proto" / "visionserve" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"
