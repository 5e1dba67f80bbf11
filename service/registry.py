"""The model registry: every model version the server knows, keyed by (name, version).

Loads what the repository scan selected (in an executor: session creation is blocking), warms
each version up, and only then makes it routable with its own batcher. A model or version that
fails is kept with its reason (GetModel, logs, metric) and never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import repository
from .backends import Backend, create_backend
from .batching import BatchPolicy, DynamicBatcher, FanOut
from .config import ModelConfig, ServerLimits
from .errors import ModelFailed, ModelNotFound, ModelUnavailable, VisionServeError
from .metrics import Metrics
from .preprocess import Preprocessor
from .repository import ModelEntry, VersionEntry
from .statistics import VersionStatistics

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServedVersion:
    """A loaded, routable model version: everything a request needs, in one place."""

    name: str
    version: int
    config: ModelConfig
    labels: tuple[str, ...]
    backend: Backend
    batcher: DynamicBatcher
    preprocessor: Preprocessor
    executor: ThreadPoolExecutor
    stats: VersionStatistics

    @property
    def where(self) -> str:
        return f"model {self.name} version {self.version}"


@dataclass(kw_only=True)
class VersionStatus:
    version: int
    state: str  # loading | ready | failed | draining | unloaded
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
    def state(self) -> str:
        states = {v.state for v in self.versions.values()}
        if "ready" in states:
            return "ready"
        if self.error or (states and states <= {"failed"}):
            return "failed"
        return "loading" if "loading" in states else "unloaded"

    @property
    def reason(self) -> str:
        return self.error or "; ".join(v.reason for v in self.versions.values() if v.reason)


class DuplicateModel(VisionServeError):
    """A (name, version) pair was registered twice: a bug in the caller."""


class ModelRegistry:
    def __init__(self, limits: ServerLimits, metrics: Metrics) -> None:
        self._limits = limits
        self._metrics = metrics
        self._served: dict[tuple[str, int], ServedVersion] = {}
        self._status: dict[str, ModelStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.repo: Path | None = None
        self.loading = True

    async def load_repository(self, repo: Path, only: set[str] | None = None) -> None:
        """Load every model the repository holds (or those in ``only``); failures are
        recorded, not raised."""
        self.repo = repo
        self.loading = True
        try:
            for entry in repository.scan(repo):
                if only is None or entry.name in only:
                    await self.load_model(entry)
            for missing in sorted((only or set()) - set(self._status)):
                log.error("model %s: no such folder in %s", missing, repo)
        finally:
            self.loading = False

    async def load_named(self, name: str) -> None:
        """(Re)load one model folder of the repository by name."""
        if self.repo is None or not (self.repo / name).is_dir() or name.startswith((".", "_")):
            raise ModelNotFound(f"model {name!r}: no folder {name!r} in the repository "
                                f"{self.repo}; export it first")
        await self.load_model(repository.scan_model(self.repo / name))

    async def load_model(self, entry: ModelEntry) -> None:
        """Load (or reload) one model: its versions load and warm up first, then routing
        switches to them at once, then versions no longer served drain and are released.
        If no version loads, whatever served before keeps serving."""
        async with self._locks.setdefault(entry.name, asyncio.Lock()):
            status = ModelStatus(name=entry.name, config=entry.config, error=entry.error)
            previous = self._status.get(entry.name)
            self._status[entry.name] = status
            loaded: list[ServedVersion] = []
            if entry.error or entry.config is None:
                log.error("model %s not loaded: %s", entry.name, entry.error)
                self._metrics.model_load_failures.labels(entry.name, "").inc()
            else:
                for number, reason in entry.version_errors.items():
                    self._fail(status, number, reason)
                for ventry in entry.versions:
                    served = await self._try_load(status, entry.config, ventry)
                    if served is not None:
                        loaded.append(served)
            old = [s for (n, _), s in self._served.items() if n == entry.name]
            if not loaded and old and previous is not None:
                log.error("model %s: no version loaded; the previous ones keep serving",
                          entry.name)
                for number, vstatus in previous.versions.items():
                    status.versions.setdefault(number, vstatus)
                status.num_classes, status.embedding_dim = (previous.num_classes,
                                                            previous.embedding_dim)
                return
            for s in old:
                del self._served[(s.name, s.version)]
            for s in loaded:
                self._register(s)
            await self._release([s for s in old if s not in loaded])

    async def unload_model(self, name: str) -> None:
        """Stop routing to the model, let queued and computing work finish, release it."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            status = self.status(name)
            old = [s for (n, _), s in self._served.items() if n == name]
            for s in old:
                del self._served[(s.name, s.version)]
            status.error = ""
            for number in status.versions:
                status.versions[number] = VersionStatus(version=number, state="unloaded",
                                                        reason="unloaded on request")
            await self._release(old)

    async def _try_load(self, status: ModelStatus, config: ModelConfig,
                        ventry: VersionEntry) -> ServedVersion | None:
        name = status.name
        status.versions[ventry.version] = VersionStatus(version=ventry.version, state="loading")
        self._metrics.set_model_state(name, str(ventry.version), "loading")
        try:
            served = await self._load_version(name, config, ventry)
        except VisionServeError as exc:
            self._fail(status, ventry.version, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - one model never stops the server
            log.exception("model %s version %d failed to load", name, ventry.version)
            self._fail(status, ventry.version, f"{type(exc).__name__}: {exc}")
            return None
        status.num_classes = served.backend.num_classes
        status.embedding_dim = served.backend.embedding_dim
        status.versions[ventry.version] = VersionStatus(version=ventry.version, state="ready")
        self._metrics.set_model_state(name, str(ventry.version), "ready")
        return served

    async def _release(self, served: list[ServedVersion]) -> None:
        """Drain (queued and computing work finishes), then free the engines."""
        for s in served:
            self._metrics.set_model_state(s.name, str(s.version), "draining")
        await asyncio.gather(*(s.batcher.close() for s in served))
        loop = asyncio.get_running_loop()
        for s in served:
            await loop.run_in_executor(None, s.executor.shutdown, True)
            s.backend.close()
            self._metrics.set_model_state(s.name, str(s.version), "unloaded")
            log.info("unloaded %s", s.where)

    def _fail(self, status: ModelStatus, version: int, reason: str) -> None:
        log.error("model %s version %d failed to load: %s", status.name, version, reason)
        status.versions[version] = VersionStatus(version=version, state="failed", reason=reason)
        self._metrics.set_model_state(status.name, str(version), "failed")
        self._metrics.model_load_failures.labels(status.name, str(version)).inc()

    async def _load_version(self, name: str, config: ModelConfig,
                            ventry: VersionEntry) -> ServedVersion:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(None, create_backend, name, config, ventry)
        if len(ventry.labels) not in (0, backend.num_classes):
            log.warning("model %s version %d: labels.txt has %d lines for %d classes; missing "
                        "labels are reported as the class index", name, ventry.version,
                        len(ventry.labels), backend.num_classes)
        for n in config.warmup_batch_sizes:
            zeros = np.zeros((n, *config.input.shape), dtype=np.float32)
            await loop.run_in_executor(None, backend.run, zeros)
        executor = ThreadPoolExecutor(max_workers=config.instance_count,
                                      thread_name_prefix=f"{name}-v{ventry.version}")
        policy = BatchPolicy(
            max_batch_size=config.max_batch_size,
            max_queue_size=config.batching.max_queue_size,
            max_queue_delay_ms=config.batching.max_queue_delay_ms,
            preferred_batch_sizes=config.batching.preferred_batch_sizes,
            instances=config.instance_count,
        )
        where = f"model {name} version {ventry.version}"
        stats = VersionStatistics()
        observer = FanOut(self._metrics.observer(name, ventry.version, policy.max_queue_size),
                          stats)
        batcher = DynamicBatcher(where, backend.run, policy, executor, observer)
        batcher.start()
        seconds = time.perf_counter() - start
        self._metrics.model_load_seconds.labels(name, str(ventry.version)).observe(seconds)
        log.info("loaded %s (%d classes, embedding %d, max batch %d) in %.2f s", where,
                 backend.num_classes, backend.embedding_dim, config.max_batch_size, seconds)
        return ServedVersion(name=name, version=ventry.version, config=config,
                             labels=ventry.labels, backend=backend, batcher=batcher,
                             preprocessor=Preprocessor(name, ventry.version, config.input,
                                                       self._limits),
                             executor=executor, stats=stats)

    def _register(self, served: ServedVersion) -> None:
        key = (served.name, served.version)
        if key in self._served:
            raise DuplicateModel(f"{served.where} is registered already")
        self._served[key] = served

    def resolve(self, name: str, version: int) -> ServedVersion:
        """The version a request goes to (0 = newest ready); raises a client-facing error."""
        status = self._status.get(name)
        if status is None:
            if self.loading:
                raise ModelUnavailable(f"model {name}: the server is still loading models; "
                                       "retry shortly (watch grpc.health.v1 for SERVING)")
            known = ", ".join(sorted(self._status)) or "none"
            raise ModelNotFound(f"model {name!r} not found; loaded models: {known} "
                                "(see `visionserve models`)")
        ready = sorted((v for (n, v) in self._served if n == name), reverse=True)
        if version == 0:
            if ready:
                return self._served[(name, ready[0])]
            if status.state == "unloaded":
                raise ModelNotFound(f"model {name} is unloaded; load it again (KServe "
                                    "RepositoryModelLoad) to serve it")
            raise ModelFailed(f"model {name} has no ready version: {status.reason or status.state}")
        served = self._served.get((name, version))
        if served is not None:
            return served
        vstatus = status.versions.get(version)
        if vstatus is not None and vstatus.state == "failed":
            raise ModelFailed(f"model {name} version {version} failed to load: {vstatus.reason}")
        raise ModelNotFound(f"model {name} version {version} is not served (ready versions: "
                            f"{ready or 'none'}); pass version 0 for the newest")

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

    def ready_versions(self, name: str) -> list[ServedVersion]:
        """Routable versions of ``name``, newest first."""
        return sorted((s for (n, _), s in self._served.items() if n == name),
                      key=lambda s: -s.version)

    async def close(self) -> None:
        """Drain every batcher (queued and computing work finishes), then release backends."""
        served = list(self._served.values())
        self._served.clear()
        await self._release(served)
