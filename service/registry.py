"""The model registry: which model versions are routable, keyed by (name, version).

It syncs each model with what the repository holds: new or changed versions load and warm up
first (``loader``), then routing switches to them in one step, then versions no longer served
are retired (their in-flight requests finish first). A model or version that fails to load keeps
its reason (GetModel, logs, metric) and never stops the others; if nothing new loads, whatever
served before keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from . import repository
from .backends import create_backend
from .config import ModelConfig, ServerLimits
from .errors import ModelFailed, ModelNotFound, ModelUnavailable, VisionServeError
from .lifecycle import Lifecycle
from .loader import BackendFactory, ServedVersion, load_version
from .metrics import Metrics
from .repository import ModelEntry
from .states import VersionState

log = logging.getLogger(__name__)

__all__ = ["ModelRegistry", "ModelStatus", "ServedVersion", "VersionState", "VersionStatus"]


@dataclass(kw_only=True)
class VersionStatus:
    version: int
    state: VersionState
    reason: str = ""


@dataclass(kw_only=True)
class ModelStatus:
    """What ListModels/GetModel report about one model."""

    name: str
    config: ModelConfig | None
    error: str = ""
    versions: dict[int, VersionStatus] = field(default_factory=dict)
    num_classes: int = 0
    embedding_dim: int = 0

    @property
    def state(self) -> VersionState:
        states = {v.state for v in self.versions.values()}
        if VersionState.READY in states:
            return VersionState.READY
        if self.error or (states and states <= {VersionState.FAILED}):
            return VersionState.FAILED
        return VersionState.LOADING if VersionState.LOADING in states else VersionState.UNLOADED

    @property
    def reason(self) -> str:
        return "; ".join(r for r in [self.error, *(v.reason for v in self.versions.values())]
                         if r)


Readiness = Callable[[str, bool], Awaitable[None]]


async def _ignore(name: str, ready: bool) -> None:
    pass


class ModelRegistry:
    def __init__(self, limits: ServerLimits, metrics: Metrics,
                 on_readiness: Readiness = _ignore, lifecycle: Lifecycle | None = None,
                 backend_factory: BackendFactory = create_backend) -> None:
        self._lifecycle = lifecycle or Lifecycle()  # read only: "still loading" answers
        self._backend_factory = backend_factory  # injected: tests drive the registry with fakes
        self._limits = limits
        self._metrics = metrics
        self._on_readiness = on_readiness  # e.g. the gRPC health service, per model name
        # the routing table: an immutable snapshot, replaced (never edited) by _swap, so a
        # reader sees the table before a swap or after it, never half of one
        self._served: Mapping[tuple[str, int], ServedVersion] = MappingProxyType({})
        self._draining: dict[tuple[str, int], ServedVersion] = {}  # retiring: no new requests
        self._status: dict[str, ModelStatus] = {}
        self._synced: dict[str, tuple[object, ...]] = {}  # fingerprint last synced, per model
        self._locks: dict[str, asyncio.Lock] = {}
        self.repo: Path | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def load_repository(self, repo: Path, only: set[str] | None = None) -> None:
        """Initial load: every model of the repository (or those in ``only``)."""
        self.repo = repo
        # off the event loop: health answers while a large repository is read
        entries = await asyncio.get_running_loop().run_in_executor(None, repository.scan, repo)
        for entry in entries:
            if only is None or entry.name in only:
                await self.sync(entry)
        for missing in sorted((only or set()) - set(self._status)):
            log.error("model %s: no such folder in %s", missing, repo)

    async def poll(self) -> None:
        """Rescan the repository: sync new and changed models, retire removed ones."""
        assert self.repo is not None
        try:
            entries = await asyncio.get_running_loop().run_in_executor(
                None, repository.scan, self.repo)
        except VisionServeError as exc:
            log.error("repository poll failed: %s", exc)
            return
        for entry in entries:
            await self.sync(entry)
        for gone in sorted(set(self._status) - {e.name for e in entries}):
            log.info("model %s was removed from the repository; draining it", gone)
            await self.unload_model(gone, forget=True)

    async def load_named(self, name: str) -> None:
        """(Re)load one model folder by name (explicit model control)."""
        if self.repo is None or not (self.repo / name).is_dir() or name.startswith((".", "_")):
            raise ModelNotFound(f"model {name!r}: no folder {name!r} in the repository; "
                                "export it first")
        entry = await asyncio.get_running_loop().run_in_executor(
            None, repository.scan_model, self.repo / name)
        await self.sync(entry, force=True)

    async def sync(self, entry: ModelEntry, force: bool = False) -> None:
        """Make the model serve what ``entry`` selects. Unchanged versions keep serving as
        they are; new or changed ones load and warm up before the swap; a config change
        reloads them all. Does nothing if the entry did not change since the last sync
        (unless ``force``): a broken version is not retried until its files change."""
        name = entry.name
        async with self._locks.setdefault(name, asyncio.Lock()):
            if not force and self._synced.get(name) == entry.fingerprint:
                return
            self._synced[name] = entry.fingerprint
            old = {v: s for (n, v), s in self._served.items() if n == name}
            status = ModelStatus(name=name, config=entry.config,
                                 error=self._public(entry.error),
                                 versions={v: VersionStatus(version=v, state=VersionState.READY)
                                           for v in old})
            self._status[name] = status
            final: dict[int, ServedVersion] = {}
            if entry.error or entry.config is None:
                log.error("model %s not loaded: %s", name, entry.error)
                self._metrics.model_load_failures.labels(name, "").inc()
            else:
                for number, reason in entry.version_errors.items():
                    self._fail(status, number, reason)
                for ventry in entry.versions:
                    current = old.get(ventry.version)
                    if (current is not None and not force
                            and current.config_fingerprint == entry.config_fingerprint
                            and current.fingerprint == ventry.fingerprint):
                        final[ventry.version] = current
                        status.versions[ventry.version] = VersionStatus(
                            version=ventry.version, state=VersionState.READY)
                        continue
                    served = await self._try_load(status, entry, ventry)
                    if served is not None:
                        final[ventry.version] = served
            if not final and old:
                log.error("model %s: nothing new could be loaded; versions %s keep serving",
                          name, sorted(old))
                final = dict(old)
                for number in old:
                    status.versions[number] = VersionStatus(
                        version=number, state=VersionState.READY,
                        reason="kept serving: its replacement failed to load")
            for number in set(old) - set(final):
                if status.versions[number].state == VersionState.READY:  # retired, not failed
                    del status.versions[number]
            self._swap(name, old, final, status)
            await self._on_readiness(name, bool(final))
            await self._retire([s for v, s in old.items() if final.get(v) is not s])

    async def unload_model(self, name: str, forget: bool = False) -> None:
        """Stop routing to the model; its in-flight requests finish, then it is released.
        ``forget`` also drops it from ListModels (its folder is gone)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            status = self.status(name)
            old = {v: s for (n, v), s in self._served.items() if n == name}
            self._swap(name, old, {}, status)
            status.error = ""
            for number in list(status.versions):
                if number in old:  # shown as draining by _retire, then unloaded
                    del status.versions[number]
                else:
                    status.versions[number] = VersionStatus(
                        version=number, state=VersionState.UNLOADED, reason="unloaded")
            self._synced.pop(name, None)
            if forget:
                del self._status[name]
            await self._on_readiness(name, False)
            await self._retire(list(old.values()), then=VersionState.UNLOADED)

    def _swap(self, name: str, old: dict[int, ServedVersion], new: dict[int, ServedVersion],
              status: ModelStatus) -> None:
        """The atomic step: the model's routes are replaced in one assignment of a new table."""
        table = {key: s for key, s in self._served.items() if key[0] != name}
        table.update({(name, number): served for number, served in new.items()})
        self._served = MappingProxyType(table)
        for number in new:
            self._metrics.set_model_state(name, str(number), VersionState.READY)
        if new:
            newest = new[max(new)]
            status.num_classes = newest.backend.num_classes
            status.embedding_dim = newest.backend.embedding_dim

    async def _try_load(self, status: ModelStatus, entry: ModelEntry,
                        ventry: repository.VersionEntry) -> ServedVersion | None:
        assert entry.config is not None
        number = ventry.version
        status.versions[number] = VersionStatus(version=number, state=VersionState.LOADING)
        self._metrics.set_model_state(status.name, str(number), VersionState.LOADING)
        try:
            served = await load_version(status.name, entry.config, entry.config_fingerprint,
                                        ventry, self._limits, self._metrics,
                                        self._backend_factory)
        except VisionServeError as exc:
            self._fail(status, number, str(exc))
            return None
        except Exception as exc:
            log.exception("model %s version %d failed to load", status.name, number)
            self._fail(status, number, f"{type(exc).__name__}: {exc}")
            return None
        status.versions[number] = VersionStatus(version=number, state=VersionState.READY)
        return served

    async def _retire(self, served: list[ServedVersion],
                      then: VersionState | None = None) -> None:
        """Drain and release versions no longer routed; while they drain they stay visible
        (GetModel, ModelStatistics and the state metric say "draining"), then they are
        dropped from the model's status, or shown as ``then`` (unloaded)."""
        for s in served:
            self._draining[(s.name, s.version)] = s
            status = self._status.get(s.name)
            if status is not None and s.version not in status.versions:
                status.versions[s.version] = VersionStatus(version=s.version,
                                                           state=VersionState.DRAINING)
        try:
            await asyncio.gather(*(s.retire(self._metrics) for s in served))
        finally:
            for s in served:
                self._draining.pop((s.name, s.version), None)
                status = self._status.get(s.name)
                if status is not None and (v := status.versions.get(s.version)) is not None \
                        and v.state == VersionState.DRAINING:
                    if then is None:
                        del status.versions[s.version]
                    else:
                        status.versions[s.version] = VersionStatus(
                            version=s.version, state=then, reason=then.value)

    def _public(self, text: str | None) -> str | None:
        """A reason as clients see it (GetModel, errors): paths relative to the repository,
        never the server's own directories. Logs keep the full paths."""
        if not text or self.repo is None:
            return text
        for root in {str(self.repo.resolve()), str(self.repo)} - {".", ""}:
            text = text.replace(root.rstrip("/") + "/", "")
        return text

    def _fail(self, status: ModelStatus, version: int, reason: str) -> None:
        log.error("model %s version %d failed to load: %s", status.name, version, reason)
        status.versions[version] = VersionStatus(version=version, state=VersionState.FAILED,
                                                 reason=self._public(reason) or "")
        self._metrics.set_model_state(status.name, str(version), VersionState.FAILED)
        self._metrics.model_load_failures.labels(status.name, str(version)).inc()

    # --- routing -------------------------------------------------------------------------------

    def resolve(self, name: str, version: int) -> ServedVersion:
        """The version a request goes to (0 = newest ready); raises a client-facing error."""
        status = self._status.get(name)
        if status is None:
            if self._lifecycle.loading:
                raise ModelUnavailable(f"model {name}: the server is still loading models; "
                                       "retry shortly (watch grpc.health.v1 for SERVING)")
            known = ", ".join(sorted(self._status)) or "none"
            raise ModelNotFound(f"model {name!r} not found; loaded models: {known} "
                                "(see `visionserve models`)")
        ready = [s.version for s in self.ready_versions(name)]
        if version == 0:
            if ready:
                return self._served[(name, ready[0])]
            if status.state == VersionState.UNLOADED:
                raise ModelNotFound(f"model {name} is unloaded; load it again (KServe "
                                    "RepositoryModelLoad) to serve it")
            raise ModelFailed(f"model {name} has no ready version: {status.reason or status.state}")
        served = self._served.get((name, version))
        if served is not None:
            return served
        vstatus = status.versions.get(version)
        if vstatus is not None and vstatus.state == VersionState.FAILED:
            raise ModelFailed(f"model {name} version {version} failed to load: {vstatus.reason}")
        raise ModelNotFound(f"model {name} version {version} is not served (ready versions: "
                            f"{ready or 'none'}); pass version 0 for the newest")

    def ready_versions(self, name: str) -> list[ServedVersion]:
        """Routable versions of ``name``, newest first."""
        return sorted((s for (n, _), s in self._served.items() if n == name),
                      key=lambda s: -s.version)

    def is_known(self, name: str) -> bool:
        return name in self._status

    def statuses(self) -> list[ModelStatus]:
        return [self._status[n] for n in sorted(self._status)]

    def status(self, name: str) -> ModelStatus:
        try:
            return self._status[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} not found; loaded models: "
                                f"{', '.join(sorted(self._status)) or 'none'}") from None

    def draining_versions(self, name: str) -> list[ServedVersion]:
        """Versions of ``name`` no longer routed whose requests are still finishing."""
        return sorted((s for (n, _), s in self._draining.items() if n == name),
                      key=lambda s: -s.version)

    async def close(self) -> None:
        """Retire everything: in-flight requests finish, then engines are released."""
        served = list(self._served.values())
        self._served = MappingProxyType({})
        await self._retire(served)
