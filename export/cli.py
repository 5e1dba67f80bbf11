"""``visionserve export``: the command-line face of the export pipeline, with progress bars."""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from visionserve.service.format.repository import version_numbers

from . import architectures
from .errors import ExportError, ExportErrorCode, UsageError
from .pipeline import STEPS, ExportRequest, export_model
from .provided import describe_default
from .report import write_report
from .store_publish import export_into_store, store_of, versions_in

log = logging.getLogger(__name__)


def run_export(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # they narrate every graph pass
    if args.list:
        _print_list(args.output)
        return 0
    names = _names(args, console)
    if names is None:
        return 2
    store = store_of(args.repo)  # checked by _names
    try:
        todo = _todo(args, names)
    except ExportError as exc:  # the store cannot be listed
        log.error("%s", exc)
        return 1
    failures = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        overall = progress.add_task("all models", total=len(todo))
        for number, arch in enumerate(todo, 1):
            log.info("exporting %s (%d of %d): build, export, parity check, publish", arch,
                     number, len(todo))
            task = progress.add_task(f"{arch}: build", total=len(STEPS))

            def on_step(step: str, task=task, arch=arch) -> None:
                progress.update(task, description=f"{arch}: {step}",
                                completed=STEPS.index(step))

            try:
                publish = partial(export_into_store, store) if store else export_model
                result = publish(ExportRequest(
                    arch=arch, repo=args.repo, name=args.name, version=args.version,
                    weights=args.weights, random_weights=args.random_weights, seed=args.seed,
                    num_classes=args.num_classes,
                    labels_file=args.labels, precision=args.precision,
                    calibration=args.calibration, format=args.format,
                    backend=args.backend), on_step=on_step)
            except ExportError as exc:
                progress.update(task, description=f"{arch}: FAILED")
                log.error("%s", exc)
                if exc.code is ExportErrorCode.USAGE:
                    return 2  # the same flags would fail every architecture
                failures += 1
            else:
                p = result.parity
                progress.update(task, completed=len(STEPS),
                                description=f"{arch}: v{result.version} "
                                f"(max |Δ| logits {p.logits_max_abs_diff:.1e}, "
                                f"top-5 {p.top5_agreement:.0%})")
            progress.advance(overall)
    if args.report:
        rows = [(a, args.repo / a / str(max(version_numbers(args.repo / a)))) for a in names
                if version_numbers(args.repo / a)]
        with console.status(f"measuring {len(rows)} models for {args.report}"):
            write_report(args.report, rows)
        log.info("wrote %s", args.report)
    return 1 if failures else 0


def _todo(args: argparse.Namespace, names: list[str]) -> list[str]:
    """``names``, less those the repository holds already with --if-missing (said)."""
    store = store_of(args.repo)

    def present(name: str) -> list[int]:
        return versions_in(store, name) if store else version_numbers(args.repo / name)

    todo = [a for a in names if not (args.if_missing and present(args.name or a))]
    for skipped in sorted(set(names) - set(todo)):
        log.info("%s: already in %s, skipped (--if-missing)", skipped, store or args.repo)
    return todo


def _names(args: argparse.Namespace, console: Console) -> list[str] | None:
    """The architectures to export, or None (a usage error, said) before any work."""
    names = [a.name for a in architectures.ARCHITECTURES.values()
             if not (args.skip_heavy and a.heavy)] if args.all else args.arch
    if not names:
        console.print("name an architecture, or --all (--list shows them)")
        return None
    if args.skip_heavy and not args.all:
        console.print("--skip-heavy applies to --all (name the architectures you want instead)")
        return None
    try:
        if store_of(args.repo) and args.report:
            raise UsageError("--report measures the local versions it exported; with an "
                             "object-store --repo, export into a folder to measure them")
    except UsageError as exc:
        log.error("%s", exc)
        return None
    try:
        for name in names:
            architectures.get(name)  # unknown names fail before any work
    except UsageError as exc:
        log.error("%s", exc)
        return None
    if args.name and len(names) > 1:
        console.print("--name applies to one architecture at a time")
        return None
    mistake = _missing_input(args)
    if mistake:
        log.error("%s", mistake)
        return None
    return names


def _missing_input(args: argparse.Namespace) -> str:
    """The first file or folder named by a flag that is not there (before any work)."""
    for flag, path, folder in (("--weights", args.weights, False),
                               ("--labels", args.labels, False),
                               ("--calibration", args.calibration, True)):
        if path is None:
            continue
        if not path.exists():
            return f"{flag} {path}: no such {'folder' if folder else 'file'}"
        if path.is_dir() != folder:
            return (f"{flag} {path} is a directory; pass the file in it" if not folder
                    else f"{flag} {path} is a file; pass a folder of images")
    return ""


def _print_list(output: str) -> None:
    """Built on PyTorch's meta device: shapes and parameter counts without allocating weights."""
    import torch

    from visionserve.service.cli.terminal import print_json, print_table

    rows = []
    for a in architectures.ARCHITECTURES.values():
        with torch.device("meta"):
            model = a.build(a.num_classes)
        head = a.head_path(model)
        params = sum(p.numel() for p in model.parameters())
        dim = getattr(model.get_submodule(head), "in_features", None)
        rows.append({"name": a.name, "family": a.family, "source": a.source,
                     "default_weights": describe_default(a.weights),
                     "input": list(a.input.shape), "resize": a.input.resize,
                     "interpolation": a.input.interpolation, "params": params,
                     "embedding_dim": dim, "head": head, "heavy": a.heavy})
    if output == "json":
        print_json(rows)
        return
    print_table(f"{len(rows)} architectures (heavy: left out by --all --skip-heavy)",
                ("name", "family", "source", "default weights", "input", "resize", "params (M)",
                 "embedding", "head", "heavy"),
                [(r["name"], r["family"], r["source"], r["default_weights"],
                  "x".join(map(str, r["input"])),
                  f"{r['resize']} {r['interpolation']}", f"{r['params'] / 1e6:.1f}",
                  r["embedding_dim"] or "?", r["head"], "heavy" if r["heavy"] else "")
                 for r in rows])


def run_train_digits(args: argparse.Namespace) -> int:
    import torch

    from .digits import train_lenet5

    console = Console(stderr=True)
    try:  # before the training, not after it
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.is_dir() or not os.access(args.out.parent, os.W_OK):
            raise IsADirectoryError(0, "a folder" if args.out.is_dir() else "not writable")
    except OSError as exc:
        log.error("--out %s: cannot write it (%s); pick a writable file path", args.out,
                  exc.strerror or exc)
        return 2
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} epochs"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("lenet5 on digits", total=args.epochs)
        trained = train_lenet5(seed=args.seed, epochs=args.epochs,
                               on_epoch=lambda: progress.advance(task))
    try:
        torch.save(trained.state_dict, args.out)
    except (OSError, RuntimeError) as exc:  # PyTorch's writer raises RuntimeError
        log.error("--out %s: cannot write it (%s); pick a writable file path", args.out,
                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1
    log.info("wrote %s: held-out accuracy %.4f on %d digits (PyTorch), trained on %d in %.1f s",
             args.out, trained.held_out_accuracy, trained.held_out_images,
             trained.train_images, trained.seconds)
    return 0
