"""``visionserve bench-ladder``: the CPU precision ladder, served and in-process, side by side.

For each architecture, five rungs on the same network: ONNX Runtime FP32 (the reference),
OpenVINO FP32, OpenVINO BF16 (its own export, checked in BF16; skipped, saying why, on a CPU
without BF16), ONNX Runtime INT8 and OpenVINO INT8 (the same seeded QDQ quantization, exported
once per engine: an INT8 golden set is the engine's own outputs). Missing exports are made first
(``<arch>``, ``<arch>_bf16``, ``<arch>_int8``, ``<arch>_int8_ov`` in ``--repo``).

One server serves every rung as its own model; one load generator (its own process) drives each
at each concurrency, the rungs interleaved inside every repeat; the in-process ceiling of each
rung is the server's own backend class with the same config, measured while the server idles.

Agreement of each rung with ONNX Runtime FP32: top-1 and top-5 sets on seeded crops and flips
of half of the photos in scikit-image's and matplotlib's wheels, through the server's
preprocessing (in-process); INT8 is calibrated on crops of the other half.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionserve.service import install_hint
from visionserve.service.cli.mistakes import CommandError
from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.model_format import CONFIG_FILE, MODEL_FILES
from visionserve.service.format.repository import version_numbers
from visionserve.service.limits import ServerLimits

from .launch import LINKED_REPO, single_model_repo, start_visionserve
from .loadgen import ClientProcess, Job
from .run import _machine, _median
from .schedule import median_run


@dataclass(frozen=True)
class Rung:
    name: str  # ort-fp32, ov-bf16…
    suffix: str  # the exported model it serves: <arch><suffix>
    overrides: dict[str, str]  # config keys (TOML values) on top of that model's config


OPENVINO = {"backend": '"openvino"'}
RUNGS = (
    Rung("ort-fp32", "", {}),
    Rung("ov-fp32", "", OPENVINO),
    Rung("ov-bf16", "_bf16", {}),  # its own export: checked, golden set included, in BF16
    Rung("ort-int8", "_int8", {}),
    Rung("ov-int8", "_int8_ov", OPENVINO),
)
EXPORTS = {"": {}, "_bf16": {"precision": "bf16"}, "_int8": {"precision": "int8"},
           "_int8_ov": {"precision": "int8", "backend": "openvino"}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="resnet50,resnet18,mobilenet_v3_small",
                   help="comma-separated architectures (exported into --repo where missing)")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--rungs", default=",".join(r.name for r in RUNGS),
                   help="comma-separated subset of the rungs")
    p.add_argument("--concurrency", default="1,8,16", help="closed-loop levels")
    p.add_argument("--duration-s", type=float, default=8.0, help="seconds per level")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="median of the repeats is reported")
    p.add_argument("--in-process-s", type=float, default=3.0,
                   help="seconds per batch size of each rung's in-process ceiling")
    p.add_argument("--agreement-variants", type=int, default=10,
                   help="seeded crops/flips per photo for the agreement (the 10 photos INT8 is "
                        "not calibrated on)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write a docs/benchmarks.md section here")


def run_ladder(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visionserve.service.engine.backends.openvino import cpu_capabilities

    console = Console(width=None if sys.stdout.isatty() else 10_000)
    if not cpu_capabilities():
        raise CommandError(f"bench-ladder needs OpenVINO: {install_hint('openvino')}")
    archs = [a.strip() for a in args.models.split(",") if a.strip()]
    from visionserve.export import architectures

    for arch in archs:  # an unknown name is a usage error before any export or server
        architectures.get(arch)
    wanted = {r.strip() for r in args.rungs.split(",") if r.strip()}
    unknown = wanted - {r.name for r in RUNGS}
    if unknown:
        raise CommandError(f"unknown rungs {sorted(unknown)}; known: "
                           f"{[r.name for r in RUNGS]}")
    skipped: dict[str, str] = {}
    if "BF16" not in cpu_capabilities() and "ov-bf16" in wanted:
        skipped["ov-bf16"] = (f"this CPU does not compute BF16 natively (OpenVINO: "
                              f"{cpu_capabilities()})")
    rungs = [r for r in RUNGS if r.name in wanted and r.name not in skipped]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-ladder-"))
    failed = _export_missing(console, args.repo, archs, {r.suffix for r in rungs},
                             workdir / "calibration")
    served = workdir / "repo"
    configs = _ladder_repo(args.repo, archs, rungs, workdir, served, failed, skipped)
    if not configs:
        console.print(f"nothing to measure: no rung of {', '.join(archs)} could be exported "
                      f"({'; '.join(f'{k}: {v}' for k, v in failed.items()) or 'none asked'})")
        return 1
    rows, in_process = _measure_ladder(args, console, served, configs, concurrencies)
    with console.status("agreement with ONNX Runtime FP32 on real photos…"):
        agreement = {arch: _agreement(arch, {n: v for n, v in configs.items()
                                             if n.startswith(arch + "--")},
                                      args.agreement_variants) for arch in archs}
    shutil.rmtree(workdir, ignore_errors=True)
    results = _results(args, archs, rungs, skipped, concurrencies, rows, in_process, agreement)
    text = markdown(results)
    console.print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(text)
        console.print(f"wrote {args.markdown}")
    return 0


def _ladder_repo(repo: Path, archs: list[str], rungs: list[Any], workdir: Path, served: Path,
                 failed: dict[str, str], skipped: dict[str, str]
                 ) -> dict[str, tuple[ModelConfig, Path]]:
    """One repository with every rung of every architecture as a model of its own
    (``<arch>--<rung>``); a rung whose export failed is skipped, with the reason."""
    served.mkdir()
    configs: dict[str, tuple[ModelConfig, Path]] = {}
    for arch in archs:
        for rung in rungs:
            name = f"{arch}--{rung.name}"
            if arch + rung.suffix in failed:
                skipped[name] = failed[arch + rung.suffix]
                continue
            single_model_repo(repo, arch + rung.suffix, workdir / name,
                              overrides=rung.overrides)
            (workdir / name / (arch + rung.suffix)).rename(served / name)
            shutil.rmtree(workdir / name)
            src = repo / (arch + rung.suffix)
            configs[name] = (ModelConfig.from_toml(served / name / CONFIG_FILE),
                             src / str(version_numbers(src)[-1]) / MODEL_FILES["onnxruntime"])
    return configs


def _measure_ladder(args: argparse.Namespace, console: Any, served: Path,
                    configs: dict[str, tuple[ModelConfig, Path]], concurrencies: list[int]
                    ) -> tuple[dict[tuple[str, str, int], list[dict[str, Any]]],
                               dict[str, dict[int, list[float]]]]:
    """Each repeat: every rung in-process at the batches the levels can fill, then served at
    each concurrency (one server holds every rung)."""
    from rich.progress import Progress

    rows: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    # the ceiling at each level: the engine alone at the batch that many clients can fill
    batches = {n: sorted({min(c, cfg.max_batch_size) for c in concurrencies})
               for n, (cfg, _) in configs.items()}
    in_process: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches[n]}
                                                     for n in configs}
    with console.status("starting the server (every rung a model: compile + golden checks)…"):
        server = start_visionserve(served, "--model-control", "none", *LINKED_REPO,
                                   name="visionserve-ladder", ready_timeout_s=900)
    try:
        with Progress(console=console, transient=True) as progress, ClientProcess() as client:
            total = args.repeats * sum(len(concurrencies) + len(b) for b in batches.values())
            task = progress.add_task("ladder", total=total)
            for repeat in range(args.repeats):
                for name, (config, model_file) in configs.items():
                    progress.update(task, description=f"[{repeat + 1}/{args.repeats}] "
                                                      f"in-process {name}")
                    with _engine(name, config, model_file) as engine:
                        for b in batches[name]:
                            in_process[name][b].append(_images_per_s(engine, config, b,
                                                                     args.in_process_s))
                            progress.advance(task)
                for c in concurrencies:
                    for name, (config, _) in configs.items():
                        progress.update(task, description=f"[{repeat + 1}/{args.repeats}] "
                                                          f"served {name} c={c}")
                        rows.setdefault((name.split("--")[0], name, c), []).append(client.run(Job(
                            target=server.target, label=name, model=name, api="classify",
                            input="float32", shape=config.input.shape,
                            input_name=config.input.name, concurrency=c,
                            duration_s=args.duration_s, warmup_s=args.warmup_s, seed=repeat)))
                        progress.advance(task)
    finally:
        server.stop()
    return rows, in_process


def _export_missing(console, repo: Path, archs: list[str], suffixes: set[str],
                    calibration: Path) -> dict[str, str]:
    """Export what the rungs serve where missing: INT8 calibrated on seeded crops of half of
    the photos (the other half measures agreement). Returns the exports that failed, and why
    (an INT8 export refused by its parity gate is reported, not fatal)."""
    from rich.progress import Progress

    from visionserve.export.errors import ExportError
    from visionserve.export.pipeline import ExportRequest, export_model

    from .int8 import photos, variants

    todo = [(a, s) for a in archs for s in sorted(suffixes) if not version_numbers(repo / (a + s))]
    failed: dict[str, str] = {}
    if not todo:
        return failed
    calibration.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, pixels in photos()[0::2]:
        for i, jpeg in enumerate(variants(pixels, 4, rng)):
            (calibration / f"{name}-{i}.jpg").write_bytes(jpeg)
    with Progress(console=console) as progress:
        task = progress.add_task("exporting the rungs' models", total=len(todo))
        for arch, suffix in todo:
            progress.update(task, description=f"export {arch}{suffix}")
            extra = {"calibration": calibration} if "precision" in EXPORTS[suffix] else {}
            try:
                export_model(ExportRequest(arch=arch, repo=repo, name=arch + suffix,
                                           **EXPORTS[suffix], **extra))
            except ExportError as exc:
                failed[arch + suffix] = f"export failed: {exc}"
                console.print(f"[yellow]{arch}{suffix}: {exc}")
            progress.advance(task)
    return failed


def _engine(name: str, config: ModelConfig, model_file: Path):
    from visionserve.export.engines import open_engine

    return open_engine(name, 1, config, model_file)


def _images_per_s(engine, config: ModelConfig, batch: int, duration_s: float) -> float:
    x = np.random.default_rng(0).standard_normal((batch, *config.input.shape), dtype=np.float32)
    engine.run(x)  # warm-up: this shape's allocations
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s or images < 3 * batch:
        engine.run(x)
        images += batch
    return images / elapsed


def _agreement(arch: str, rungs: dict[str, tuple[ModelConfig, Path]],
               variants_per_photo: int) -> dict[str, dict[str, float]]:
    """Top-1 / top-5-set agreement of each rung with ONNX Runtime FP32 on photo crops."""
    from visionserve.service.engine.preprocess import EncodedImage, Preprocessor

    from .int8 import photos, variants

    rng = np.random.default_rng(0)
    jpegs = [j for _, pixels in photos()[1::2]  # never calibrated on
             for j in variants(pixels, variants_per_photo, rng)]
    config = next(iter(rungs.values()))[0]
    prep = Preprocessor(arch, 1, config.input, ServerLimits())
    batch = np.stack([prep.tensor(i, EncodedImage(j)) for i, j in enumerate(jpegs)])
    tops: dict[str, np.ndarray] = {}
    for name, (cfg, model_file) in rungs.items():
        with _engine(name, cfg, model_file) as engine:
            logits = np.concatenate([engine.run(batch[i:i + 8]).logits
                                     for i in range(0, len(batch), 8)])
        tops[name.split("--")[1]] = np.argsort(-logits, axis=1)[:, :5]
    ref = tops.get("ort-fp32")
    if ref is None:
        return {}
    return {rung: {"top1": float(np.mean(t[:, 0] == ref[:, 0])),
                   "top5_set": float(np.mean([set(a) == set(b) for a, b in zip(t, ref,
                                                                                strict=True)])),
                   "inputs": len(jpegs)}
            for rung, t in tops.items()}


def _results(args, archs, rungs, skipped, concurrencies, rows, in_process,
             agreement) -> dict[str, Any]:
    from visionserve.service.engine.backends.openvino import _import_openvino

    openvino = _import_openvino("bench-ladder")  # telemetry kept off, as in the server
    out: dict[str, Any] = {
        "command": "visionserve " + shlex.join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        # the same machine record as `visionserve bench`, plus OpenVINO
        "machine": {**_machine(()), "openvino": openvino.__version__},
        "duration_s": args.duration_s, "repeats": args.repeats,
        "skipped": skipped, "models": {}}
    for arch in archs:
        model: dict[str, Any] = {}
        for rung in rungs:
            name = f"{arch}--{rung.name}"
            if name not in in_process:  # skipped (reported under "skipped")
                continue
            ceiling = {b: _median(v) for b, v in in_process[name].items()}
            served = {c: median_run(rows[(arch, name, c)]) for c in concurrencies}
            model[rung.name] = {
                "in_process": ceiling,
                "served": {c: {k: r.get(k) for k in ("images_per_s", "p50_ms", "p99_ms",
                                                      "errors")} for c, r in served.items()},
                "agreement": agreement[arch].get(rung.name, {}),
            }
        ref = model.get("ort-fp32")
        for data in model.values():
            ceiling = data["in_process"]
            for c, s in data["served"].items():
                alone = ceiling[min(c, max(ceiling))]
                s["served_over_in_process"] = round(s["images_per_s"] / alone, 3) if alone else None
                if ref:
                    base = ref["served"][c]["images_per_s"]
                    s["over_ort_fp32"] = round(s["images_per_s"] / base, 3) if base else None
        out["models"][arch] = model
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Measured {results['date']} on {m['cpu']} ({m['cores']} cores), ONNX Runtime "
             f"{m['onnxruntime']}, OpenVINO {m['openvino']}; {results['duration_s']:g} s per "
             f"level, median of {results['repeats']} interleaved repeats. Command: "
             f"`{results['command']}`.", ""]
    for rung, why in results["skipped"].items():
        lines += [f"Not measured: {rung}: {why}.", ""]
    for arch, model in results["models"].items():
        levels = list(next(iter(model.values()))["served"])
        batch_sizes = list(next(iter(model.values()))["in_process"])
        lines += [f"**{arch}**: images/s served at each concurrency (÷ served ONNX Runtime FP32 "
                  "at that concurrency; ÷ the same rung in-process at the batch that many "
                  "clients fill), and in-process alone", "",
                  "| rung | " + " | ".join(f"served c={c}" for c in levels) + " | in-process "
                  + " / ".join(f"b{b}" for b in batch_sizes) + " | top-1 / top-5 vs ORT FP32 |",
                  "|---|" + "---|" * len(levels) + "---|---|"]
        for rung, data in model.items():
            ip = data["in_process"]
            cells = [f"{s['images_per_s']:.1f} ({s.get('over_ort_fp32', 0):.2f}×; "
                     f"{s['served_over_in_process']:.2f})"
                     for s in (data["served"][c] for c in levels)]
            a = data["agreement"]
            agree = f"{a['top1']:.3f} / {a['top5_set']:.3f} ({a['inputs']} crops)" if a else "–"
            lines.append(f"| {rung} | " + " | ".join(cells) + " | " +
                         " / ".join(f"{ip[b]:.1f}" for b in batch_sizes) + f" | {agree} |")
        lines.append("")
    return "\n".join(lines)
