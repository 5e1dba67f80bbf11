"""Publishing into a repository in object storage (``export ARCH --repo s3://BUCKET/PREFIX``).

The export runs as for a local folder, into a temporary one (the model's own files, if the
store has them, fetched first: an existing model's config is what serves, as locally); then
its files are uploaded:

1. the version number is claimed first, by a hidden ``N/.claim`` object written only if absent
   (a conditional write, If-None-Match): two exports never write the same version, and a
   number claimed by an export that failed is never reused;
2. the model's own files (``config.toml``, ``labels.txt``, ``config.pbtxt``), only where the
   store has none (the operator's stay);
3. the version's files, then its ``manifest.json`` last (also only if absent). A server sees
   the version once the manifest is there and fetches it only when every file matches it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from visionserve.service.format.manifest import MANIFEST_FILE
from visionserve.service.format.model_format import CONFIG_FILE, LABELS_FILE, TRITON_CONFIG_FILE
from visionserve.service.format.object_store import (
    SCHEMES,
    StoreError,
    StoreUri,
    describe,
    library_errors,
    open_store,
    parse_uri,
)
from visionserve.service.format.repository import is_version_name

from . import architectures
from .errors import UsageError
from .pipeline import ExportRequest, ExportResult, export_model
from .publish import PublishError

log = logging.getLogger("visionserve.export")

MODEL_FILES = (CONFIG_FILE, LABELS_FILE, TRITON_CONFIG_FILE)
CLAIM = ".claim"


def store_of(repo: Path) -> StoreUri | None:
    """The object store ``--repo`` names, or None for a local folder."""
    try:
        return parse_uri(repo)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def versions_in(uri: StoreUri, name: str, store: Any = None) -> list[int]:
    """The version numbers of model ``name`` present in the store: complete, partial or only
    claimed (every ``name/N/`` prefix)."""
    import obstore

    store = store if store is not None else _open(uri)
    try:
        listing = obstore.list_with_delimiter(store, f"{name}/")
    except library_errors() as exc:
        raise PublishError(f"{uri}: the store cannot be listed ({describe(exc)}); check the "
                           "store's environment variables (docs/deploy.md)") from None
    numbers = (p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"])
    return sorted(int(n) for n in numbers if is_version_name(n))


def export_into_store(uri: StoreUri, req: ExportRequest, on_step=lambda step: None
                      ) -> ExportResult:
    """Export ``req`` and publish it into the store (see the module's note)."""
    import obstore

    store = _open(uri)
    name = req.name or architectures.get(req.arch).name
    taken = versions_in(uri, name, store)
    version = req.version or max(taken, default=0) + 1
    if version in taken:
        raise PublishError(f"{uri}/{name}/{version} exists already; versions are immutable: "
                           "pick another --version or omit it for the next free number")
    _put(store, uri, f"{name}/{version}/{CLAIM}", b"", create=True)
    with tempfile.TemporaryDirectory(prefix="visionserve-export-") as tmp:
        local = Path(tmp)
        (local / name).mkdir()
        for file in MODEL_FILES:  # an existing model's files: its config is what serves
            try:
                data = obstore.get(store, f"{name}/{file}").bytes()
            except FileNotFoundError:
                continue
            except library_errors() as exc:
                raise PublishError(f"{uri}/{name}/{file}: cannot be read "
                                   f"({describe(exc)})") from None
            (local / name / file).write_bytes(bytes(data))
        result = export_model(replace(req, repo=local, version=version), on_step)
        _upload(store, uri, local / name, version)
    log.info("published %s version %d into %s", name, version, uri)
    return replace(result, path=Path(f"{uri}/{name}/{version}"))


def _upload(store: Any, uri: StoreUri, model_dir: Path, version: int) -> None:
    name = model_dir.name
    for file in MODEL_FILES:
        if (model_dir / file).exists():
            _put(store, uri, f"{name}/{file}", model_dir / file, create=True, keep=True)
    version_dir = model_dir / str(version)
    files = sorted(p for p in version_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for path in files:
        _put(store, uri, f"{name}/{version}/{path.relative_to(version_dir).as_posix()}", path)
    _put(store, uri, f"{name}/{version}/{MANIFEST_FILE}", version_dir / MANIFEST_FILE,
         create=True)


def _put(store: Any, uri: StoreUri, key: str, data: bytes | Path, create: bool = False,
         keep: bool = False) -> None:
    """Upload one object; ``create``: only if absent (``keep``: an existing one is fine)."""
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    try:
        obstore.put(store, key, data, mode="create" if create else "overwrite")
    except (AlreadyExistsError, PreconditionError):
        if keep:
            return
        raise PublishError(f"{uri}/{key} exists already (another export took this version "
                           "number); run the export again for the next free number") from None
    except library_errors() as exc:
        raise PublishError(f"{uri}/{key}: the upload failed ({describe(exc)}); the version "
                           "stays invisible to servers (no manifest): run the export again"
                           ) from None


def _open(uri: StoreUri) -> Any:
    try:
        return open_store(uri)
    except StoreError as exc:
        raise PublishError(f"{uri}: {exc}; check the {SCHEMES[uri.scheme]}* environment "
                           "variables (docs/deploy.md)") from None
