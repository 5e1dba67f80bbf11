"""The model repository on disk, scanned: the layout of ``model_format`` (Triton-compatible).

Hidden folders (``.tmp-…`` written by an export in progress) are ignored, so a version appears
only once it is published by an atomic rename. Scanning never raises for one bad model or
version: its reason (naming the file relative to the repository) is kept on its ``ModelEntry``
and the others load. Every path is resolved and must stay inside the repository, unless the
server was started with ``--allow-symlinks-outside-repo``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, VisionServeError
from . import manifest
from .manifest import MANIFEST_FILE, Manifest
from .model_config import ModelConfig
from .model_format import CONFIG_FILE, LABELS_FILE, MODEL_FILES

log = logging.getLogger(__name__)

MAX_VERSION_FILES = 1000  # files a version folder may hold (they are all fingerprinted)
OUTSIDE_FLAG = "--allow-symlinks-outside-repo"


@dataclass(frozen=True, kw_only=True)
class VersionEntry:
    """One version folder: its number, model file and the labels that apply to it."""

    version: int
    path: Path
    model_file: Path
    labels: tuple[str, ...]
    fingerprint: tuple[object, ...] = ()  # changes when any file of the version changes
    manifest: Manifest | None = None  # its files' sizes already match; contents: before a load


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One model folder as scanned: its config and the versions its policy selects, or an error.

    ``fallbacks`` are the older versions on disk the policy did not select, newest first: with a
    ``latest`` policy, they serve in place of selected versions that fail to load."""

    name: str
    path: Path
    config: ModelConfig | None
    versions: tuple[VersionEntry, ...] = ()
    fallbacks: tuple[VersionEntry, ...] = ()
    wanted: int = 0  # versions the policy selects (loadable or not)
    error: str = ""
    version_errors: dict[int, str] = field(default_factory=dict)
    config_fingerprint: tuple[object, ...] = ()  # changes when config.toml or labels.txt do

    @property
    def fingerprint(self) -> tuple[object, ...]:
        """Everything a rescan compares to decide whether the model must be synced again."""
        return (self.config_fingerprint, self.error,
                tuple((v.version, v.fingerprint) for v in (*self.versions, *self.fallbacks)),
                tuple(sorted(self.version_errors.items())))


def is_version_name(name: str) -> bool:
    """A published version folder's name: a number > 0 in ASCII digits, as ``str(n)`` writes it
    (``"²".isdigit()`` is true too; ``"01"`` would name the same version as ``"1"``)."""
    return name.isascii() and name.isdigit() and name == str(int(name)) and int(name) > 0


def version_numbers(model_dir: Path) -> list[int]:
    """Published version numbers in a model folder (hidden and non-numeric names ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if is_version_name(p.name) and p.is_dir())


def read_labels(path: Path) -> tuple[str, ...]:
    """One class name per line; index = line number. Trailing empty lines dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.strip() for line in lines)


@dataclass(frozen=True)
class ScanRules:
    allow_outside: bool = False  # --allow-symlinks-outside-repo
    require_manifest: bool = False  # --require-manifest


def scan(repo: Path, rules: ScanRules = ScanRules()) -> list[ModelEntry]:
    """Every model folder in ``repo``, sorted by name. Raises only when ``repo`` itself cannot
    be read; a fault inside one model folder fails that model alone."""
    return [scan_model(p, repo, rules) for p in model_folders(repo)]


def model_folders(repo: Path) -> list[Path]:
    """The model folders of ``repo``, sorted by name: every folder but hidden (``.``: an
    export's staging folder) and ``_`` ones. Raises only when ``repo`` itself cannot be read."""
    if not repo.is_dir():
        raise ConfigError(f"model repository {repo} does not exist; pass --repo DIR or run "
                          "`visionserve export ARCH --repo DIR` to create one")
    try:
        children = sorted(repo.iterdir())
    except OSError as exc:
        raise ConfigError(f"model repository {repo} cannot be read ({exc.strerror}); check "
                          "its permissions") from None
    return [p for p in children if not p.name.startswith((".", "_")) and p.is_dir()]


def scan_model(model_dir: Path, repo: Path | None = None,
               rules: ScanRules = ScanRules()) -> ModelEntry:
    """One model folder; any fault becomes the entry's error (never an exception)."""
    scanner = _Scanner(repo if repo is not None else model_dir.parent, rules)
    try:
        return scanner.model(model_dir)
    except Exception as exc:
        log.debug("scanning %s failed", model_dir, exc_info=True)
        return ModelEntry(name=model_dir.name, path=model_dir, config=None,
                          error=f"model {model_dir.name}: its folder could not be read "
                                f"({_describe(exc)}); fix {scanner.rel(model_dir)}")


class _Scanner:
    def __init__(self, repo: Path, rules: ScanRules) -> None:
        self._repo = repo
        self._root = repo.resolve()
        self._allow_outside = rules.allow_outside
        self._require_manifest = rules.require_manifest

    def rel(self, path: Path) -> str:
        """``path`` as the repository names it (reasons never show the server's directories)."""
        try:
            return str(path.relative_to(self._repo))
        except ValueError:
            return path.name

    def escapes(self, path: Path) -> str:
        """A reason when ``path`` resolves outside the repository (and that is not allowed)."""
        if self._allow_outside:
            return ""
        try:
            inside = path.resolve().is_relative_to(self._root)
        except (OSError, RuntimeError):  # a symlink loop
            return f"{self.rel(path)} is a symbolic link that cannot be resolved"
        if inside:
            return ""
        return (f"{self.rel(path)} resolves outside the repository (a symbolic link); refused. "
                f"If your volume layout links outside on purpose, start the server with "
                f"{OUTSIDE_FLAG}")

    def labels(self, path: Path) -> tuple[str, ...]:
        try:
            return read_labels(path)
        except UnicodeDecodeError:
            raise ConfigError(f"{self.rel(path)} is not UTF-8 text; write one class name per "
                              "line, in UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{self.rel(path)} cannot be read ({_describe(exc)})") from None

    def model(self, model_dir: Path) -> ModelEntry:
        name = model_dir.name
        config_file, labels_file = model_dir / CONFIG_FILE, model_dir / LABELS_FILE
        config_fp = (_stat(config_file), _stat(labels_file))

        def failed(error: str) -> ModelEntry:
            return ModelEntry(name=name, path=model_dir, config=None, error=error,
                              config_fingerprint=config_fp)

        for path in (model_dir, config_file, labels_file):
            if (path.exists() or path.is_symlink()) and (reason := self.escapes(path)):
                return failed(f"model {name}: {reason}")
        try:
            config = ModelConfig.from_toml(config_file)
            fallback_labels = self.labels(labels_file) if labels_file.exists() else ()
        except VisionServeError as exc:
            return failed(str(exc).replace(str(model_dir), self.rel(model_dir)))
        on_disk = version_numbers(model_dir)
        if not on_disk:
            return ModelEntry(name=name, path=model_dir, config=config,
                              config_fingerprint=config_fp,
                              error=f"model {name}: no version folder with a "
                                    f"{MODEL_FILES[config.backend]} under {self.rel(model_dir)}; "
                                    f"export one with `visionserve export ARCH --name {name}`")
        selected = config.version_policy.select(on_disk)
        policy = config.version_policy
        older = [] if policy.all or policy.specific else \
            [v for v in sorted(on_disk, reverse=True) if v not in selected]
        versions: list[VersionEntry] = []
        fallbacks: list[VersionEntry] = []
        errors: dict[int, str] = {}
        for number in [*selected, *older]:
            try:
                ventry = self.version(name, model_dir / str(number), number, config,
                                      fallback_labels)
            except VisionServeError as exc:
                if number in selected:  # an older one that cannot load is simply not a fallback
                    errors[number] = str(exc)
                continue
            (versions if number in selected else fallbacks).append(ventry)
        return ModelEntry(name=name, path=model_dir, config=config, versions=tuple(versions),
                          fallbacks=tuple(fallbacks), wanted=len(selected),
                          version_errors=errors, config_fingerprint=config_fp)

    def version(self, name: str, vdir: Path, number: int, config: ModelConfig,
                fallback_labels: tuple[str, ...]) -> VersionEntry:
        where = f"model {name} version {number}"
        if reason := self.escapes(vdir):
            raise ConfigError(f"{where}: {reason}")
        files = self.files(where, vdir)
        listed = self.manifest(where, vdir, files)  # first: it says why a file is missing
        model_file = vdir / MODEL_FILES[config.backend]
        if model_file not in files:
            raise ConfigError(f"{where}: {self.rel(model_file)} is missing")
        labels_file = vdir / LABELS_FILE
        labels = self.labels(labels_file) if labels_file.exists() else fallback_labels
        return VersionEntry(version=number, path=vdir, model_file=model_file, labels=labels,
                            fingerprint=tuple(sorted((str(p.relative_to(vdir)), stat)
                                                     for p, stat in files.items())),
                            manifest=listed)

    def manifest(self, where: str, vdir: Path,
                 files: dict[Path, tuple[int, int]]) -> Manifest | None:
        """The version's manifest, its listing checked against the folder (sizes only: the
        contents are hashed before a load), or None where it has none and none is required."""
        listed = manifest.read_manifest(vdir, where)
        if listed is None:
            if self._require_manifest:
                raise ConfigError(f"{where}: no {MANIFEST_FILE}, and the server requires one "
                                  "(--require-manifest); publish the version with "
                                  "`visionserve export`, which writes it")
            return None
        sizes = {p.relative_to(vdir).as_posix(): stat[1] for p, stat in files.items()}
        sizes.pop(MANIFEST_FILE, None)
        manifest.check_listing(listed, sizes, where)
        return listed

    def files(self, where: str, vdir: Path) -> dict[Path, tuple[int, int]]:
        """Every file of a version folder (subfolders included) with its (mtime, size): a change
        to any of them (external weights too) is a change of the version. Each must stay inside
        the repository."""
        found: dict[Path, tuple[int, int]] = {}
        for folder, dirs, names in os.walk(vdir, onerror=_raise):
            for entry in [*dirs, *names]:
                path = Path(folder) / entry
                if reason := self.escapes(path):
                    raise ConfigError(f"{where}: {reason}")
            for entry in names:
                path = Path(folder) / entry
                found[path] = _stat(path)
                if len(found) > MAX_VERSION_FILES:
                    raise ConfigError(f"{where}: {self.rel(vdir)} holds more than "
                                      f"{MAX_VERSION_FILES} files; a version folder holds the "
                                      "model file, its external weights and labels.txt")
        return found


def _raise(exc: OSError) -> None:
    raise exc


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def _describe(exc: BaseException) -> str:
    """An exception as a reason, without the absolute paths an OSError carries."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"[:200]
