"""``visionserve export``: the command-line face of the export pipeline, with progress bars."""

from __future__ import annotations

import argparse
import logging

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionserve.service.repository import version_numbers

from . import architectures
from .pipeline import STEPS, ExportRequest, ParityError, export_model
from .publish import PublishError
from .weights import WeightsError

log = logging.getLogger(__name__)


def run_export(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # they narrate every graph pass
    if args.list:
        _print_list()
        return 0
    if not args.arch:
        console.print("name an architecture (or --list to see them)")
        return 2
    for name in args.arch:
        architectures.get(name)  # unknown names fail before any work
    todo = [a for a in args.arch
            if not (args.if_missing and version_numbers(args.repo / (args.name or a)))]
    for skipped in sorted(set(args.arch) - set(todo)):
        log.info("%s: already in %s, skipped (--if-missing)", skipped, args.repo)
    if not todo:
        return 0
    failures = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        overall = progress.add_task("all models", total=len(todo))
        for arch in todo:
            task = progress.add_task(f"{arch}: build", total=len(STEPS))

            def on_step(step: str, task=task, arch=arch) -> None:  # noqa: ANN001
                progress.update(task, description=f"{arch}: {step}",
                                completed=STEPS.index(step))

            try:
                result = export_model(ExportRequest(
                    arch=arch, repo=args.repo, name=args.name, version=args.version,
                    weights=args.weights, seed=args.seed, num_classes=args.num_classes,
                    labels_file=args.labels), on_step=on_step)
            except (ParityError, PublishError, WeightsError) as exc:
                progress.update(task, description=f"{arch}: FAILED")
                log.error("%s", exc)
                failures += 1
            else:
                p = result.parity
                progress.update(task, completed=len(STEPS),
                                description=f"{arch}: v{result.version} "
                                f"(max |Δ| logits {p.logits_max_abs_diff:.1e}, "
                                f"top-5 {p.top5_agreement:.0%})")
            progress.advance(overall)
    return 1 if failures else 0


def _print_list() -> None:
    table = Table(title="architectures")
    for col in ("name", "family", "input", "classes", "head (embedding = its input)"):
        table.add_column(col)
    for a in architectures.ARCHITECTURES.values():
        table.add_row(a.name, a.family, "x".join(map(str, a.input.shape)), str(a.num_classes),
                      a.head)
    Console().print(table)
