"""The model repository on disk, scanned: the layout of ``model_format`` (Triton-compatible).

 Hidden folders (``.tmp-…`` written by an export in progress) are
ignored, so a version appears only once it is published by an atomic rename. Scanning never
raises for one bad model: its error is kept on its ``ModelEntry`` and the others load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig
from .errors import ConfigError, VisionServeError
from .model_format import CONFIG_FILE, LABELS_FILE, MODEL_FILES

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class VersionEntry:
    """One version folder: its number, model file and the labels that apply to it."""

    version: int
    path: Path
    model_file: Path
    labels: tuple[str, ...]
    fingerprint: tuple[object, ...] = ()  # changes when the version's files change


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One model folder as scanned: its config and the versions its policy selects, or an error."""

    name: str
    path: Path
    config: ModelConfig | None
    versions: tuple[VersionEntry, ...] = ()
    error: str = ""
    version_errors: dict[int, str] = field(default_factory=dict)
    config_fingerprint: tuple[object, ...] = ()  # changes when config.toml or labels.txt do

    @property
    def fingerprint(self) -> tuple[object, ...]:
        """Everything a rescan compares to decide whether the model must be synced again."""
        return (self.config_fingerprint, self.error,
                tuple((v.version, v.fingerprint) for v in self.versions),
                tuple(sorted(self.version_errors.items())))


def version_numbers(model_dir: Path) -> list[int]:
    """Published version numbers in a model folder (hidden and non-numeric names ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def read_labels(path: Path) -> tuple[str, ...]:
    """One class name per line; index = line number. Trailing empty lines dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.strip() for line in lines)


def scan(repo: Path) -> list[ModelEntry]:
    """Every model folder in ``repo``, sorted by name."""
    if not repo.is_dir():
        raise ConfigError(f"model repository {repo} does not exist; pass --repo DIR or run "
                          "`visionserve export ARCH --repo DIR` to create one")
    return [scan_model(p) for p in sorted(repo.iterdir())
            if p.is_dir() and not p.name.startswith((".", "_"))]


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def scan_model(model_dir: Path) -> ModelEntry:
    name = model_dir.name
    config_fp = (_stat(model_dir / CONFIG_FILE), _stat(model_dir / LABELS_FILE))
    try:
        config = ModelConfig.from_toml(model_dir / CONFIG_FILE)
    except VisionServeError as exc:
        return ModelEntry(name=name, path=model_dir, config=None, error=str(exc),
                          config_fingerprint=config_fp)
    fallback = model_dir / LABELS_FILE
    fallback_labels = read_labels(fallback) if fallback.is_file() else ()
    on_disk = version_numbers(model_dir)
    if not on_disk:
        return ModelEntry(name=name, path=model_dir, config=config,
                          config_fingerprint=config_fp,
                          error=f"model {name}: no version folder with a "
                                f"{MODEL_FILES[config.backend]} under {model_dir}; export one "
                                f"with `visionserve export ARCH --name {name}`")
    versions: list[VersionEntry] = []
    errors: dict[int, str] = {}
    for number in config.version_policy.select(on_disk):
        vdir = model_dir / str(number)
        model_file = vdir / MODEL_FILES[config.backend]
        labels_file = vdir / LABELS_FILE
        labels = read_labels(labels_file) if labels_file.is_file() else fallback_labels
        if not model_file.is_file():
            errors[number] = f"model {name} version {number}: {model_file} is missing"
            continue
        fingerprint = (_stat(model_file), _stat(model_file.with_name(model_file.name + ".data")),
                       _stat(labels_file))
        versions.append(VersionEntry(version=number, path=vdir, model_file=model_file,
                                     labels=labels, fingerprint=fingerprint))
    return ModelEntry(name=name, path=model_dir, config=config, versions=tuple(versions),
                      version_errors=errors, config_fingerprint=config_fp)
