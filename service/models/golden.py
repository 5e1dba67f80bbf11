"""The golden check: before a version serves, it proves that this server computes what PyTorch
computed when the version was exported.

A version may hold a golden set (``visionserve export`` writes one; an operator may write their
own, docs/lifecycle.md "The golden check"):

    <model>/<N>/golden/golden.json   the manifest below
    <model>/<N>/golden/<files>       inputs (JPEG/PNG/WebP files, .npy tensors) and the expected
                                     outputs (.npy, float32, one row: [classes] / [dim])

    {"format": 1,
     "tolerance": {"max_rel_diff": 0.003, "why": "..."},
     "labels_sha256": "...",        # optional: the labels the version was made with
     "labels": "labels.txt",        # optional: a copy of them (the reason then says what moved)
     "preprocessing": {...},        # optional: the [input] values its numbers depend on
     "cases": [{"name": "chelsea", "input": "chelsea.jpg", "decoder": "exact",
                "logits": "chelsea.exact.logits.npy", "embedding": "chelsea.exact.embedding.npy"},
               {"name": "noise", "input": "noise.npy", "logits": "noise.logits.npy"}]}

At load, after warm-up and before routing, each case goes through the version's own path as a
request would: decode (the server's decode pool) → preprocess → the version's batcher → its
engine (configured provider, threads, precision) → outputs. Every output is compared with the
expected one as the export's parity check does: the largest absolute difference over the
expected output's largest magnitude, held to the manifest's tolerance. The labels and the
preprocessing config are compared too: a labels change, or a preprocessing change, is a new
export. Image cases record the decoder they were made for; those of another decoder are skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..engine.backends.base import ModelOutputs
from ..engine.preprocess import EncodedImage, ImageInput, RawTensor
from ..errors import ConfigError, VisionServeError
from ..format.model_config import DECODERS, InputSpec
from ..format.repository import read_labels
from ..modes import GoldenMode

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .loader import ServedVersion

log = logging.getLogger(__name__)

GOLDEN_DIR = "golden"
MANIFEST = "golden.json"
FORMAT = 1
MAX_CASES = 64
MAX_FILE_BYTES = 64 * 1024 * 1024
# the [input] keys that change the numbers; the others (the tensor's name, the raw forms
# accepted on the wire, the decoder, which has cases of its own) do not
PREPROCESSING_KEYS = ("channels", "height", "width", "color", "resize", "interpolation",
                      "mean", "std")
OUTPUTS = ("logits", "embedding")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def labels_sha256(labels: Sequence[str]) -> str:
    """The labels as ``labels.txt`` holds them (one per line, stripped, final newline)."""
    return hashlib.sha256(("\n".join(labels) + "\n").encode("utf-8")).hexdigest()


def preprocessing_record(spec: InputSpec) -> dict[str, object]:
    """The ``[input]`` values a version's numbers depend on, JSON-ready."""
    record: dict[str, object] = {}
    for key in PREPROCESSING_KEYS:
        value = getattr(spec, key)
        record[key] = [float(v) for v in value] if isinstance(value, tuple) else value
    return record


def rel_diff(expected: np.ndarray, got: np.ndarray) -> float:
    """max |got − expected| / max |expected|: the export's parity measure (inf when the shapes
    differ or a value is not finite)."""
    expected = np.asarray(expected, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if expected.shape != got.shape or not (np.isfinite(expected).all()
                                           and np.isfinite(got).all()):
        return math.inf
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return float(np.abs(got - expected).max() / (scale or 1.0)) if expected.size else 0.0


@dataclass(frozen=True, kw_only=True)
class GoldenCase:
    name: str
    input: ImageInput
    decoder: str  # "" for tensors: every decoder
    expected: dict[str, np.ndarray]  # output name -> float32 [K]


@dataclass(frozen=True, kw_only=True)
class GoldenSet:
    cases: tuple[GoldenCase, ...]
    max_rel_diff: float
    labels_sha256: str = ""
    labels: tuple[str, ...] | None = None  # the recorded copy, when the set has one
    preprocessing: dict[str, object] | None = None


def read_golden(version_dir: Path, where: str) -> GoldenSet | None:
    """The version's golden set, or None when it has none. Raises ConfigError naming the
    manifest's field when the set is malformed (a broken check must not pass silently)."""
    if not (version_dir / GOLDEN_DIR / MANIFEST).exists():
        return None
    return _Reader(version_dir, where).golden_set()


class _Reader:
    """One golden set, read and validated; every fault names the manifest's field."""

    def __init__(self, version_dir: Path, where: str) -> None:
        self._folder = version_dir / GOLDEN_DIR
        self._where = where
        self._rel = f"{version_dir.name}/{GOLDEN_DIR}/{MANIFEST}"

    def bad(self, what: str) -> ConfigError:
        return ConfigError(f"{self._where}: {self._rel}: {what}; fix the golden set "
                           "(docs/lifecycle.md, \"The golden check\") or export the version "
                           "again")

    def golden_set(self) -> GoldenSet:
        try:
            manifest = json.loads((self._folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.bad(f"cannot be read as JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise self.bad(f"\"format\" must be {FORMAT}")
        tolerance = manifest.get("tolerance")
        max_rel = tolerance.get("max_rel_diff") if isinstance(tolerance, dict) else None
        if isinstance(max_rel, bool) or not isinstance(max_rel, int | float) or not max_rel > 0:
            raise self.bad("tolerance.max_rel_diff must be a number > 0")
        cases = manifest.get("cases")
        if not isinstance(cases, list) or not 0 < len(cases) <= MAX_CASES:
            raise self.bad(f"\"cases\" must be a list of 1 to {MAX_CASES} cases")
        digest = manifest.get("labels_sha256", "")
        preprocessing = manifest.get("preprocessing")
        if not isinstance(digest, str) or (preprocessing is not None
                                           and not isinstance(preprocessing, dict)):
            raise self.bad("labels_sha256 must be a string and preprocessing an object")
        recorded = None
        if "labels" in manifest:
            try:
                recorded = read_labels(self.file("labels", manifest["labels"]))
            except UnicodeDecodeError:
                raise self.bad("labels: not UTF-8 text") from None
        return GoldenSet(cases=tuple(self.case(i, c) for i, c in enumerate(cases)),
                         max_rel_diff=float(max_rel), labels_sha256=digest, labels=recorded,
                         preprocessing=preprocessing)

    def case(self, i: int, case: object) -> GoldenCase:
        if not isinstance(case, dict):
            raise self.bad(f"cases[{i}] must be an object")
        source = case.get("input")
        decoder = ""  # tensors: every decoder
        if isinstance(source, str) and source.lower().endswith(IMAGE_SUFFIXES):
            image: ImageInput = EncodedImage(self.file(f"cases[{i}].input", source).read_bytes())
            decoder = case.get("decoder", "exact")
            if decoder not in DECODERS:
                raise self.bad(f"cases[{i}].decoder must be one of {DECODERS}, got {decoder!r}")
        else:
            tensor = self.array(f"cases[{i}].input", source)
            if tensor.dtype not in (np.float32, np.uint8):
                raise self.bad(f"cases[{i}].input must be float32 [C, H, W] or uint8 "
                               f"[H, W, C], got {tensor.dtype}")
            data = np.ascontiguousarray(tensor, dtype=tensor.dtype.newbyteorder("<"))
            image = RawTensor(shape=tuple(tensor.shape), dtype=str(tensor.dtype),
                              data=data.tobytes())
        expected = {out: self.array(f"cases[{i}].{out}", case[out]).astype(np.float32)
                    .reshape(-1) for out in OUTPUTS if out in case}
        if not expected:
            raise self.bad(f"cases[{i}] has neither \"logits\" nor \"embedding\" to compare")
        return GoldenCase(name=str(case.get("name") or source), input=image, decoder=decoder,
                          expected=expected)

    def file(self, field: str, name: object) -> Path:
        if not isinstance(name, str) or not name or Path(name).name != name \
                or name.startswith("."):
            raise self.bad(f"{field} must name a file in {GOLDEN_DIR}/, got {name!r}")
        path = self._folder / name
        if not path.is_file():
            raise self.bad(f"{field}: {GOLDEN_DIR}/{name} is missing")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise self.bad(f"{field}: {GOLDEN_DIR}/{name} is over {MAX_FILE_BYTES} bytes")
        return path

    def array(self, field: str, name: object) -> np.ndarray:
        path = self.file(field, name)
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable .npy is a malformed set
            raise self.bad(f"{field}: {GOLDEN_DIR}/{name} is not a .npy array "
                           f"({type(exc).__name__})") from None


@dataclass(frozen=True, kw_only=True)
class GoldenReport:
    """What a check found: ``problems`` empty means passed."""

    cases: int  # cases run
    skipped: int  # image cases made for another decoder
    worst_rel_diff: float
    max_rel_diff: float
    problems: tuple[str, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        others = f" (and {self.skipped} for another decoder)" if self.skipped else ""
        cases = f"{self.cases} case" + ("" if self.cases == 1 else "s")
        return (f"{cases}{others}, worst difference {self.worst_rel_diff:.1e} "
                f"(tolerance {self.max_rel_diff:.1e}), {self.seconds:.2f} s")


# runs one case's input through the version's path: (input) -> outputs
RunCase = Callable[[ImageInput], Awaitable[ModelOutputs]]


async def check(golden: GoldenSet, version: int, labels: Sequence[str], spec: InputSpec,
                run: RunCase) -> GoldenReport:
    """Compare what ``run`` computes for every case with what the golden set expects; the
    labels and preprocessing too."""
    start = time.perf_counter()
    problems = [p for p in (_labels_problem(golden, version, labels),
                            _preprocessing_problem(golden, version, spec)) if p]
    cases = [c for c in golden.cases if c.decoder in ("", spec.decoder)]
    skipped = len(golden.cases) - len(cases)
    # one at a time, at batch 1 (the warm-up's shape): all at once, the engine's arena grew to
    # a batch of 5 on every load, and 50 load/unload cycles of ResNet-18 kept ~200 MB more
    outcomes: list[ModelOutputs | BaseException] = []
    for case in cases:
        try:
            outcomes.append(await run(case.input))
        except VisionServeError as exc:
            outcomes.append(exc)
    worst, worst_at = 0.0, ""
    for case, outcome in zip(cases, outcomes, strict=True):
        if isinstance(outcome, VisionServeError):
            problems.append(f"golden case {case.name!r} could not run: {outcome}")
            continue
        if isinstance(outcome, BaseException):
            raise outcome  # a bug or a cancellation, not a verdict on the version
        for name, expected in case.expected.items():
            got = np.asarray(getattr(outcome, name))[0]
            diff = rel_diff(expected, got)
            if diff > worst or not worst_at:
                worst, worst_at = diff, f"{name} of golden case {case.name!r}"
    if worst > golden.max_rel_diff:
        verb, whose = ("are", "their") if worst_at.startswith("logits") else ("is", "its")
        problems.append(f"the {worst_at} {verb} off by {worst:.1e} of {whose} scale (tolerance "
                        f"{golden.max_rel_diff:.1e})")
    if not cases:
        problems.append(f"no golden case applies: its images were made for another decoder "
                        f"than this config's decoder = \"{spec.decoder}\"")
    return GoldenReport(cases=len(cases), skipped=skipped, worst_rel_diff=worst,
                        max_rel_diff=golden.max_rel_diff, problems=tuple(problems),
                        seconds=time.perf_counter() - start)


def _labels_problem(golden: GoldenSet, version: int, labels: Sequence[str]) -> str:
    if not golden.labels_sha256 or labels_sha256(labels) == golden.labels_sha256:
        return ""
    how = f"sha256 {labels_sha256(labels)[:12]}…, recorded {golden.labels_sha256[:12]}…"
    if golden.labels is not None:
        old, new = golden.labels, tuple(labels)
        moved = sum(a != b for a, b in zip(old, new, strict=False)) + abs(len(old) - len(new))
        how = f"{moved} of {len(old)} lines differ"
        if sorted(old) == sorted(new):
            how += ": the same names in another order"
        elif len(old) != len(new):
            how += f": {len(new)} lines, {len(old)} recorded"
    return (f"its labels are not those version {version} was exported with ({how}); a labels "
            "change is a new version: export it again with --labels")


def _preprocessing_problem(golden: GoldenSet, version: int, spec: InputSpec) -> str:
    if golden.preprocessing is None:
        return ""
    now = preprocessing_record(spec)
    recorded = golden.preprocessing
    changed = [f"{key} = {_show(now.get(key))} (exported with {_show(recorded.get(key))})"
               for key in PREPROCESSING_KEYS
               if key in recorded and _show(now.get(key)) != _show(recorded.get(key))]
    if not changed:
        return ""
    return (f"config.toml [input] {', '.join(changed)}: version {version} was exported with "
            "other preprocessing; a preprocessing change is a new export")


def _show(value: object) -> str:
    return json.dumps(value)


@dataclass(frozen=True, kw_only=True)
class Verdict:
    serve: bool  # whether the version may be routed
    reason: str  # shown in GetModel and the model index ("" when nothing to say)


class GoldenCheck:
    """What the repository sync runs on every version it loads, before routing it."""

    def __init__(self, mode: GoldenMode, outputs: Callable[[ServedVersion, ImageInput],
                                                           Awaitable[ModelOutputs]],
                 metrics: Metrics) -> None:
        self.mode = mode
        self._outputs = outputs  # InferenceCore.outputs: the request path, uncounted
        self._metrics = metrics

    async def verify(self, served: ServedVersion, version_dir: Path) -> Verdict:
        if self.mode is GoldenMode.OFF:
            return Verdict(serve=True, reason="")
        labels = (served.name, str(served.version))
        try:
            golden = await asyncio.get_running_loop().run_in_executor(
                None, read_golden, version_dir, served.where)
        except ConfigError as exc:
            return self._failed(served, str(exc))
        if golden is None:
            self._metrics.golden_checks.labels(*labels, "missing").inc()
            log.warning("%s has no golden set (%s/%s): its numbers are not checked before it "
                        "serves; export it again, or add one (docs/lifecycle.md)", served.where,
                        GOLDEN_DIR, MANIFEST)
            return Verdict(serve=True, reason="no golden set: not checked at load")
        report = await check(golden, served.version, served.labels, served.config.input,
                             lambda image: self._outputs(served, image))
        self._metrics.golden_check_seconds.labels(*labels).observe(report.seconds)
        if not report.passed:
            return self._failed(served, "; ".join(report.problems))
        self._metrics.golden_checks.labels(*labels, "passed").inc()
        log.info("%s passed its golden check: %s", served.where, report.summary())
        return Verdict(serve=True, reason="")

    def _failed(self, served: ServedVersion, problems: str) -> Verdict:
        self._metrics.golden_checks.labels(served.name, str(served.version), "failed").inc()
        if self.mode is GoldenMode.WARN:
            reason = (f"golden check failed, serving anyway (--golden-check warn): {problems}")
            log.error("%s: %s", served.where, reason)
            return Verdict(serve=True, reason=reason)
        return Verdict(serve=False, reason=f"golden check failed: {problems}. It does not serve: "
                                           "fix the version or export it again "
                                           "(--golden-check warn would serve it)")
