"""Atomic publication of a new version (and, for a new model, of its whole folder).

Everything is written under a hidden ``.staging-*`` folder (the server's scanner never reads a
dot-prefixed folder), then renamed into place: for a model the repository holds already, the
version folder, staged inside the model folder; for a new model, its whole folder (config.toml,
labels.txt, config.pbtxt and the version), staged at the top of the repository, so that a
polling server never sees a model folder without its config. (Should the model folder appear
meanwhile, another export's, the version alone moves into it.) On one filesystem a rename is
atomic: the server sees either nothing or a complete model/version. Every file and folder is
flushed to disk (fsync) before the rename, and the folder renamed into after it: after a power
loss the version is either absent or complete, never present with empty or short files.

An export holds an exclusive lock (``flock``) on its staging folder's ``owner.json`` while it
runs; the kernel drops it when the process ends, however it ends. A staging folder whose lock
can be taken belongs to an export that will never finish (killed, out of memory, a power loss):
the next export into the same model or repository removes it. One without a lockable
``owner.json`` (a crash before it was written, a filesystem without locks) is removed after
``STALE_AFTER_S``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.model_format import CONFIG_FILE, LABELS_FILE, TRITON_CONFIG_FILE
from visionserve.service.format.repository import version_numbers
from visionserve.service.format.triton_config import model_config_text

from .errors import ExportError, ExportErrorCode

log = logging.getLogger("visionserve.export")

STAGING_PREFIX = ".staging-"
OWNER_FILE = "owner.json"  # in the staging folder, locked while its export runs
STALE_AFTER_S = 24 * 3600  # a staging folder whose owner cannot be told: removed after a day


class PublishError(ExportError):
    code = ExportErrorCode.PUBLISH

    """The version cannot be published (it exists already, or the repository is not writable)."""


def next_version(model_dir: Path) -> int:
    """One above every version of the model present: published, partial or refused folders,
    and those being staged by running exports. A number is never reused."""
    taken = [*version_numbers(model_dir), *_staged_versions(model_dir)]
    return max(taken, default=0) + 1


def _staged_versions(model_dir: Path) -> list[int]:
    """The versions the staging folders of ``model_dir`` (inside it, or a new model's at the
    top of the repository) are writing, as their ``owner.json`` says."""
    found = []
    for folder in (model_dir, model_dir.parent):
        for owner in folder.glob(f"{STAGING_PREFIX}*/{OWNER_FILE}"):
            try:
                record = json.loads(owner.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if record.get("model") == model_dir.name and isinstance(record.get("version"), int):
                found.append(record["version"])
    return found


class Staged:
    """Where an export writes: ``version_dir`` for the version's files, ``model_dir`` for the
    model-level files (the staged copy when the model is new, else the repository's own)."""

    def __init__(self, root: Path, target: Path, version: int) -> None:
        self.target = target  # the model folder in the repository
        self.new_model = root.parent != target
        self.model_dir = root / target.name if self.new_model else target
        self.version_dir = (self.model_dir if self.new_model else root) / str(version)
        self.version = version
        self.version_dir.mkdir(parents=True)  # mkdir's mode: readable as the files in it are


@contextmanager
def staging(model_dir: Path, version: int) -> Iterator[Staged]:
    """A hidden staging folder for a version of ``model_dir`` (inside it), or for a new model
    (beside it, at the top of the repository); removed unless ``publish`` moved its contents
    into place."""
    if (model_dir / str(version)).exists():
        raise PublishError(f"{model_dir / str(version)} exists already; versions are immutable: "
                           "pick another --version or omit it for the next free number")
    repo = model_dir.parent
    try:
        repo.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(repo)
        if model_dir.is_dir():
            remove_stale_staging(model_dir)
        root = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX,
                                     dir=model_dir if model_dir.is_dir() else repo))
        owner = open(root / OWNER_FILE, "w", encoding="utf-8")  # held (locked) until the end
    except OSError as exc:
        raise PublishError(f"cannot write into the repository at {repo}: {exc}; check "
                           "--repo and its permissions") from None
    try:
        with owner:
            _lock(owner)
            owner.write(json.dumps({"pid": os.getpid(), "model": model_dir.name,
                                    "version": version}) + "\n")
            owner.flush()
            yield Staged(root, model_dir, version)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def publish(staged: Staged) -> Path:
    """Move the staged version (or the whole new model folder) into the repository."""
    target = staged.target / str(staged.version)
    whole = staged.new_model and not staged.target.exists()
    source, destination = ((staged.model_dir, staged.target) if whole
                           else (staged.version_dir, target))
    try:
        _fsync_tree(source)
        os.rename(source, destination)  # atomic; refused when a non-empty folder is there
        _fsync(destination.parent)  # the rename itself
    except OSError as exc:
        raise PublishError(f"could not publish {target}: {exc}") from exc
    return target


def remove_stale_staging(folder: Path) -> None:
    """Remove the staging folders in ``folder`` of exports that will never finish (see the
    module's note); those of running exports stay."""
    for staging_dir in folder.glob(f"{STAGING_PREFIX}*"):
        try:
            with open(staging_dir / OWNER_FILE, "r+", encoding="utf-8") as owner:
                _lock(owner)  # taken: its export is gone
            stale = True
        except BlockingIOError:  # locked: its export runs
            stale = False
        except OSError:  # no owner file (yet), or no locks here: by its age
            stale = time.time() - _mtime(staging_dir) > STALE_AFTER_S
        if stale:
            log.info("removing %s, left by an export that did not finish", staging_dir)
            shutil.rmtree(staging_dir, ignore_errors=True)


def _lock(file) -> None:  # type: ignore[no-untyped-def]
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_model_files(model_dir: Path, config: ModelConfig, labels: list[str],
                       pbtxt: str) -> None:
    """Create the model-level config.toml, fallback labels.txt and Triton's config.pbtxt when
    the folder is new. Existing files are the operator's and are left alone."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((CONFIG_FILE, config.to_toml()),
                       (LABELS_FILE, "\n".join(labels) + "\n"),
                       (TRITON_CONFIG_FILE, pbtxt)):
        if not (model_dir / name).exists():
            _write_atomic(model_dir / name, text)


def triton_config(name: str, config: ModelConfig, num_classes: int, embedding_dim: int) -> str:
    """Triton's model configuration for the same folder, so the repository runs on Triton
    unchanged (the one renderer: ``visionserve.service.format.triton_config``)."""
    return model_config_text(name, config, num_classes, embedding_dim)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
