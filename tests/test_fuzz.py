"""A short coverage-guided fuzz campaign (atheris) of the decode/preprocess path on every test
run: tests/fuzz/fuzz_preprocess.py must finish its runs without a finding (a crash, an
undocumented exception, a hang). The marked campaign makes 2,000 runs, 10,000 with
VISIONSERVE_LONG_TESTS=1 (as `make test-all` runs it; VISIONSERVE_FUZZ_RUNS sets any count).
Long campaigns: see that file's docstring and docs/security.md.

Replayable: a finding is saved (crash-*, timeout-*, under the test's tmp_path; libFuzzer's
log, in the failure message, names it) and replays exactly by passing that file to the target.
libFuzzer's seed is fixed (1; VISIONSERVE_FUZZ_SEED picks another) and printed with every
failure, and no clock steers the campaign (-reload=0, no time limit); a rerun with the same
seed is still not input-for-input the same, as the coverage that guides it varies a little
from one Python process to the next.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("atheris")
LONG = os.environ.get("VISIONSERVE_LONG_TESTS") == "1"
CAMPAIGN = os.environ.get("VISIONSERVE_FUZZ_RUNS") or ("10000" if LONG else "2000")
SEED = os.environ.get("VISIONSERVE_FUZZ_SEED", "1")


@pytest.mark.parametrize("runs", ["500", pytest.param(CAMPAIGN, marks=pytest.mark.slow)],
                         ids=["smoke", "campaign"])
def test_the_decode_and_preprocess_fuzz_target_finds_nothing(tmp_path, runs):
    corpus = tmp_path / "corpus"
    print(f"seed={SEED} runs={runs} (VISIONSERVE_FUZZ_SEED={SEED} replays it)")  # noqa: T201
    # -timeout: libFuzzer's per-input hang guard (a hang is a finding), not a timing.
    # -reload=0: no re-reading of the corpus folder every second, which made the count of runs
    # (and the inputs tried) depend on how long the campaign took ("Done 10028 runs")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_preprocess.py"),
         "--seed-corpus", str(corpus), f"-runs={runs}", "-max_len=16384", "-timeout=20",
         "-rss_limit_mb=2048", "-reload=0", f"-artifact_prefix={tmp_path}/", f"-seed={SEED}",
         str(corpus)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    tail = f"seed={SEED} runs={runs}\n" + result.stderr[-4000:]
    assert result.returncode == 0, tail
    assert f"Done {runs} runs" in result.stderr, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), tail
