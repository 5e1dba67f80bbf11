"""A repository in object storage, mirrored into a local cache that the ordinary scanner reads.

The server never loads a model from the store: before each scan, ``StoreMirror.refresh`` copies
what the store holds into ``--cache-dir``, and the scanner, the manifest checks, the loader and
the golden check run on that copy, exactly as for a local folder.

- A version exists in the store once its ``manifest.json`` does (export uploads it last). Only
  the files it lists are fetched, each checked against its size (from the listing, before any
  byte is read) and its sha256 (while it streams), into a hidden staging folder renamed into
  place whole: the cache never holds a partial or unverified version. A version that fails is
  refused with the file named (``refusals``) and not fetched again until its manifest or one of
  its files changes in the store.
- A version is fetched again only when its manifest's or a listed file's ETag changes; the
  ETags of what the cache holds are kept in ``.mirror.json``, so a restart fetches nothing that
  did not change, and serves the cache as it is when the store cannot be reached.
- Only the versions a model's version policy selects are fetched; versions fetched before stay
  (the scanner's fallbacks) until they leave the store or the cache is over ``max_bytes``: then
  the least recently selected go first (the folder's mtime is its last selection).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, VisionServeError
from . import manifest
from .manifest import MANIFEST_FILE
from .model_config import ModelConfig
from .model_format import CONFIG_FILE, LABELS_FILE, TRITON_CONFIG_FILE
from .object_store import (
    SCHEMES,
    StoreError,
    StoreUri,
    describe,
    library_errors,
    list_objects,
    open_store,
)
from .repository import ModelEntry, is_version_name

log = logging.getLogger(__name__)

MODEL_FILES = (CONFIG_FILE, LABELS_FILE, TRITON_CONFIG_FILE)  # a model folder's own files
MAX_MODEL_FILE_BYTES = 16 << 20  # config.toml, labels.txt (21k classes: ~0.5 MB)
INDEX_FILE = ".mirror.json"
STAGING = ".staging"


class StoreMirror:
    def __init__(self, uri: StoreUri, cache_dir: Path, max_bytes: int,
                 store: Any = None) -> None:
        self.uri = uri
        self.root = uri.cache_root(cache_dir)
        self.max_bytes = max_bytes
        self._store = store  # opened at the first refresh (a StoreError then fails the start)
        self._lock = threading.Lock()  # a poll and an explicit load never copy at once
        self.refusals: dict[str, dict[int, str]] = {}  # model → version → reason
        self._refused: dict[str, tuple[str, str]] = {}  # "m/N" → (store state, reason)
        self._index: dict[str, str] = self._read_index()  # cache key → the store's ETag(s)

    def refresh(self) -> None:
        """Bring the cache up to date with the store. When the store cannot be listed, the
        cache stays as it is (logged), unless it holds nothing: then StoreError."""
        with self._lock:
            try:
                if self._store is None:
                    self._store = open_store(self.uri)
                objects = list_objects(self._store)
            except StoreError as exc:
                if not any(self.root.glob("*/*/" + MANIFEST_FILE)):
                    raise StoreError(
                        f"{self.uri}: {exc}, and the cache holds no version to serve meanwhile; "
                        f"check the store's endpoint and credentials "
                        f"({SCHEMES[self.uri.scheme]}* environment variables: docs/deploy.md)"
                    ) from None
                log.warning("%s: %s; serving the cached copy in %s until it answers",
                            self.uri, exc, self.root)
                return
            self._sync(objects)

    def _sync(self, objects: dict[str, tuple[int, str]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
        models: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
        for key, meta in objects.items():
            model, sep, rest = key.partition("/")
            if sep and model and not model.startswith((".", "_")):  # ".." included
                models[model][rest] = meta
        selected: set[Path] = set()
        refusals: dict[str, dict[int, str]] = {}
        for name, files in sorted(models.items()):
            try:
                selected |= self._model(name, files, refusals.setdefault(name, {}))
            except (OSError, VisionServeError) as exc:  # this model only; the others go on
                log.error("%s: model %s could not be copied into the cache: %s", self.uri,
                          name, getattr(exc, "strerror", None) or exc)
        self.refusals = {m: r for m, r in refusals.items() if r}
        for cached in list(self.root.iterdir()):
            if cached.is_dir() and not cached.name.startswith(".") \
                    and cached.name not in models:
                log.info("%s: model %s left the store; removing its cached copy", self.uri,
                         cached.name)
                self._remove(cached, cached.name)
        self._evict(selected)
        self._write_index()

    def _model(self, name: str, files: dict[str, tuple[int, str]],
               refusals: dict[int, str]) -> set[Path]:
        """Copy one model's own files, then the versions its policy selects; returns the
        version folders selected (kept by the eviction)."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        for file in MODEL_FILES:
            key = f"{name}/{file}"
            if file not in files or files[file][0] > MAX_MODEL_FILE_BYTES:
                if file in files:
                    log.error("%s: %s is over %d MB; not copied", self.uri, key,
                              MAX_MODEL_FILE_BYTES >> 20)
                (folder / file).unlink(missing_ok=True)
                self._index.pop(key, None)
            elif self._index.get(key) != files[file][1] or not (folder / file).exists():
                self._fetch(key, folder / file, files[file][0])
                self._index[key] = files[file][1]
        versions: dict[int, dict[str, tuple[int, str]]] = defaultdict(dict)
        for rest, meta in files.items():
            number, sep, path = rest.partition("/")
            if sep and is_version_name(number):
                versions[int(number)][path] = meta
        published = sorted(n for n, listed in versions.items() if MANIFEST_FILE in listed)
        for number in {int(p.name) for p in folder.iterdir() if is_version_name(p.name)} \
                - set(published):
            log.info("%s: model %s version %d left the store; removing its cached copy",
                     self.uri, name, number)
            self._remove(folder / str(number), f"{name}/{number}")
        try:
            policy = ModelConfig.from_toml(folder / CONFIG_FILE).version_policy
        except (VisionServeError, OSError):
            return set()  # the scanner says what is wrong with the model's config
        selected = set()
        for number in policy.select(published):
            if reason := self._version(name, number, versions[number]):
                refusals[number] = reason
            else:
                selected.add(folder / str(number))
                os.utime(folder / str(number))  # its last selection, for the eviction
        return selected

    def _version(self, name: str, number: int, listed: dict[str, tuple[int, str]]) -> str:
        """Fetch one version if the store's copy changed; "" once the cache holds it, verified,
        else the reason it is refused."""
        key = f"{name}/{number}"
        state = json.dumps(sorted((p, m[1]) for p, m in listed.items()))
        target = self.root / name / str(number)
        if self._index.get(key) == state and target.is_dir():
            return ""
        if key in self._refused and self._refused[key][0] == state:
            return self._refused[key][1]
        started = time.perf_counter()
        stage = Path(tempfile.mkdtemp(prefix=f"{name}-{number}-", dir=self._staging()))
        try:
            self._fetch_version(name, number, listed, stage)
        except StoreError:  # the store failed meanwhile: tried again at the next scan
            shutil.rmtree(stage, ignore_errors=True)
            raise
        except ConfigError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            self._refused[key] = (state, str(exc))
            log.error("%s: %s", self.uri, exc)
            if target.exists():  # its verified copy is not what the store holds any more
                self._remove(target, key)
            return str(exc)
        if target.exists():  # the same number published again: the new copy replaces it
            shutil.rmtree(target)
        os.rename(stage, target)
        self._index[key] = state
        self._refused.pop(key, None)
        log.info("%s: model %s version %d copied into the cache and verified (%d files, "
                 "%.1f MB) in %.2f s", self.uri, name, number, len(listed),
                 sum(m[0] for m in listed.values()) / 1e6, time.perf_counter() - started)
        return ""

    def _fetch_version(self, name: str, number: int, listed: dict[str, tuple[int, str]],
                       stage: Path) -> None:
        """Fetch the manifest, then each file it lists, checked. Raises ConfigError naming the
        file (relative to the version folder) that is missing, extra, or off."""
        where = f"model {name} version {number}"
        if listed[MANIFEST_FILE][0] > manifest.MAX_MANIFEST_BYTES:
            raise ConfigError(f"{where}: {MANIFEST_FILE} is over {manifest.MAX_MANIFEST_BYTES} "
                              "bytes in the store; publish the version again")
        self._fetch(f"{name}/{number}/{MANIFEST_FILE}", stage / MANIFEST_FILE,
                    listed[MANIFEST_FILE][0])
        wanted = manifest.read_manifest(stage, where)
        assert wanted is not None
        sizes = {p: m[0] for p, m in listed.items()
                 if p != MANIFEST_FILE and not p.rsplit("/", 1)[-1].startswith(".")}
        manifest.check_listing(wanted, sizes, where)  # before any file's byte is read
        for entry in wanted.files:
            digest = self._fetch(f"{name}/{number}/{entry.path}", stage / entry.path,
                                 entry.size, where=where)
            if digest != entry.sha256:
                raise ConfigError(f"{where}: {entry.path} does not match its sha256 in "
                                  f"{MANIFEST_FILE} (altered or corrupted in the store); "
                                  "refused. Publish the version again")

    def _fetch(self, key: str, path: Path, size: int, where: str = "") -> str:
        """Stream one object into ``path`` (never more than ``size`` bytes); its sha256."""
        import obstore

        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        written = 0
        tmp = path.with_name(f".{path.name}.part")
        try:
            with open(tmp, "wb") as out:
                for chunk in obstore.get(self._store, key).stream(min_chunk_size=1 << 20):
                    written += len(chunk)
                    if written > size:
                        raise ConfigError(f"{where or key}: {key.split('/', 2)[-1]} grew "
                                          "while it was read (a publish in progress?); it "
                                          "is fetched again at the next scan")
                    digest.update(chunk)
                    out.write(chunk)
        except VisionServeError:
            tmp.unlink(missing_ok=True)
            raise
        except library_errors() as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the cache's own disk (full, read-only)
            raise StoreError(f"{key}: {describe(exc)}") from None
        os.rename(tmp, path)
        return digest.hexdigest()

    def amend(self, entry: ModelEntry) -> ModelEntry:
        """A scanned model with the versions the mirror refused, as the versions' errors (and
        without the scanner's "no version folder" when those are all it had)."""
        refused = self.refusals.get(entry.name)
        if not refused:
            return entry
        empty = entry.config is not None and not entry.versions and not entry.fallbacks
        return replace(entry, version_errors={**refused, **entry.version_errors},
                       error="" if empty else entry.error)

    def _evict(self, selected: set[Path]) -> None:
        """Over ``max_bytes``: remove the versions not selected now, least recently selected
        first. Selected versions stay, over the bound if need be (logged)."""
        sizes = {v: _size(v) for v in self.root.glob("*/*") if v.is_dir()
                 and is_version_name(v.name) and not v.parent.name.startswith(".")}
        total = sum(sizes.values())
        for version in sorted(set(sizes) - selected, key=lambda v: v.stat().st_mtime):
            if total <= self.max_bytes:
                break
            log.info("%s: cache over %.1f GB; evicting model %s version %s (not selected "
                     "now)", self.uri, self.max_bytes / 1e9, version.parent.name, version.name)
            self._remove(version, f"{version.parent.name}/{version.name}")
            total -= sizes[version]
        if total > self.max_bytes:
            log.warning("%s: the versions selected now take %.1f GB, over --cache-max-gb "
                        "%.1f: they stay cached", self.uri, total / 1e9, self.max_bytes / 1e9)

    def _remove(self, path: Path, key: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
        for k in [k for k in self._index if k == key or k.startswith(key + "/")]:
            del self._index[k]

    def _staging(self) -> Path:
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        return self.root / STAGING

    def _read_index(self) -> dict[str, str]:
        try:
            index = json.loads((self.root / INDEX_FILE).read_text(encoding="utf-8"))
            return {str(k): str(v) for k, v in index.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _write_index(self) -> None:
        tmp = self.root / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True), encoding="utf-8")
        os.rename(tmp, self.root / INDEX_FILE)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
