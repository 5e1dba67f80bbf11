"""Generated protobuf code is produced by one command (`make proto`) and never goes stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SOURCES = sorted((ROOT / "proto").rglob("*.proto"))


def test_generated_code_matches_the_proto_sources(tmp_path: Path):
    """The same command as `make proto`, into a temporary folder, compared file by file."""
    assert SOURCES, "no .proto source under proto/: nothing would be compared"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}",
                    *(str(p.relative_to(ROOT)) for p in SOURCES)], check=True, cwd=ROOT)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert len(fresh) == 3 * len(SOURCES)
    for name in fresh:
        committed = ROOT / "proto" / name
        assert committed.is_file(), f"{name} was never generated: run `make proto`"
        assert (tmp_path / name).read_text() == committed.read_text(), \
            f"{name} is stale: run `make proto` and commit the result"
