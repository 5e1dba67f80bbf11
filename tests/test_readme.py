"""Every Python example of the README runs as written against a running server (the test
server's address and one of its models put in for the README's `localhost:8001` and models)."""

from __future__ import annotations

import re
import subprocess
import sys

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
