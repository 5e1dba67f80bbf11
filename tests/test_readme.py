"""Every Python example of the README runs as written against a running server (the test
server's address and one of its models put in for the README's `localhost:8001` and models)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2  # the native client and tritonclient


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example-{i}" for i in range(len(BLOCKS))])
def test_a_readme_example_runs_as_written(block, server):
    code = block.replace("localhost:8001", server.address)
    code = re.sub(r'"(resnet50|efficientnet_lite0)"', '"resnet18"', code)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example prints what it shows"


GRPCURL = Path(sys.executable).parent / "grpcurl"
SHELL_CALLS = [b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
               if "grpcurl -plaintext -d @" in b]


def test_the_readme_shows_a_classify_call_with_grpcurl():
    assert len(SHELL_CALLS) == 1


@pytest.mark.skipif(not GRPCURL.exists(), reason="grpcurl is installed by `make setup` (dev extra)")
def test_the_readme_grpcurl_call_classifies_a_jpeg_as_written(server):
    script = SHELL_CALLS[0].replace("localhost:8001", server.address)
    script = script.replace('"efficientnet_lite0"', '"resnet18"')
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                            text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout)
    assert reply["model"] == "resnet18"
    assert len(reply["results"][0]["classes"]) == 3
    assert all(0 <= c["score"] <= 1 and c["label"] for c in reply["results"][0]["classes"])
