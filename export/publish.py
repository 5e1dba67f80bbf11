"""Atomic publication of a new version into a model repository.

Everything is written into a hidden ``.tmp-<version>-<pid>`` folder inside the model folder (the
server's scanner ignores hidden folders), then renamed to ``<version>``: on one filesystem the
rename is atomic, so the server sees either no version or a complete one. Every file and folder
is flushed to disk (fsync) before the rename, and the model folder after it: after a power loss
the version is either absent or complete, never present with empty or short files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.model_format import CONFIG_FILE, LABELS_FILE, TRITON_CONFIG_FILE
from visionserve.service.format.repository import version_numbers
from visionserve.service.format.triton_config import model_config_text

from .errors import ExportError, ExportErrorCode


class PublishError(ExportError):
    code = ExportErrorCode.PUBLISH

    """The version cannot be published (it exists already, or the repository is not writable)."""


def next_version(model_dir: Path) -> int:
    existing = version_numbers(model_dir)
    return (max(existing) + 1) if existing else 1


@contextmanager
def staging(model_dir: Path, version: int) -> Iterator[Path]:
    """A hidden folder to write a version into; removed unless ``publish`` renamed it."""
    if (model_dir / str(version)).exists():
        raise PublishError(f"{model_dir / str(version)} exists already; versions are immutable: "
                           "pick another --version or omit it for the next free number")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    except OSError as exc:
        raise PublishError(f"cannot write into the repository at {model_dir}: {exc}; check "
                           "--repo and its permissions") from None
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, model_dir: Path, version: int) -> Path:
    target = model_dir / str(version)
    try:
        # mkdtemp made it 0700: a server running as another user (the serve image's uid
        # 10001, an export job's) could not read the version. Readable as the files in it are.
        os.chmod(tmp, _readable_dir_mode())
        _fsync_tree(tmp)
        os.rename(tmp, target)  # atomic; fails if the target appeared meanwhile
        _fsync(model_dir)  # the rename itself
    except OSError as exc:
        raise PublishError(f"could not publish {target}: {exc}") from exc
    return target


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


def _readable_dir_mode() -> int:
    """0o777 less the process umask (0o755 with the usual 022), as ``mkdir`` would give. Read
    from /proc, not by setting and restoring it: ``os.umask`` is process-wide, and another
    thread creating a file meanwhile would get mode 0666."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o777 & ~umask


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
