"""A short coverage-guided fuzz campaign (atheris) of the decode/preprocess path on every test
run: tests/fuzz/fuzz_preprocess.py must finish its runs without a finding (a crash, an
undocumented exception, a hang). Long campaigns: see that file's docstring and docs/security.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("atheris")
CAMPAIGN = os.environ.get("VISIONSERVE_FUZZ_RUNS", "10000")


@pytest.mark.parametrize("runs", ["500", pytest.param(CAMPAIGN, marks=pytest.mark.slow)],
                         ids=["smoke", "campaign"])
def test_the_decode_and_preprocess_fuzz_target_finds_nothing(tmp_path, runs):
    corpus = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_preprocess.py"),
         "--seed-corpus", str(corpus), f"-runs={runs}", "-max_len=16384", "-timeout=20",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-seed=1", str(corpus)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    tail = result.stderr[-4000:]
    assert result.returncode == 0, tail
    assert f"Done {runs} runs" in result.stderr, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), tail
