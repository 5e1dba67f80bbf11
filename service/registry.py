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
from .batching import BatchPolicy, DynamicBatcher
from .config import ModelConfig, ServerLimits
from .errors import ModelFailed, ModelNotFound, ModelUnavailable, VisionServeError
from .metrics import Metrics
from .preprocess import Preprocessor
from .repository import ModelEntry, VersionEntry

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
        self.loading = True

    async def load_repository(self, repo: Path) -> None:
        """Load every model the repository holds; failures are recorded, not raised."""
        self.loading = True
        try:
            for entry in repository.scan(repo):
                await self.load_model(entry)
        finally:
            self.loading = False

    async def load_model(self, entry: ModelEntry) -> None:
        status = ModelStatus(name=entry.name, config=entry.config, error=entry.error)
        self._status[entry.name] = status
        if entry.error or entry.config is None:
            log.error("model %s not loaded: %s", entry.name, entry.error)
            self._metrics.model_load_failures.labels(entry.name, "").inc()
            return
        for number, reason in entry.version_errors.items():
            self._fail(status, number, reason)
        for ventry in entry.versions:
            status.versions[ventry.version] = VersionStatus(version=ventry.version,
                                                            state="loading")
            self._metrics.set_model_state(entry.name, str(ventry.version), "loading")
            try:
                served = await self._load_version(entry.name, entry.config, ventry)
            except VisionServeError as exc:
                self._fail(status, ventry.version, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one model never stops the server
                log.exception("model %s version %d failed to load", entry.name, ventry.version)
                self._fail(status, ventry.version, f"{type(exc).__name__}: {exc}")
                continue
            self._register(served)
            status.num_classes = served.backend.num_classes
            status.embedding_dim = served.backend.embedding_dim
            status.versions[ventry.version] = VersionStatus(version=ventry.version, state="ready")
            self._metrics.set_model_state(entry.name, str(ventry.version), "ready")

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
        observer = self._metrics.observer(name, ventry.version, policy.max_queue_size)
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
                             executor=executor)

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

    async def close(self) -> None:
        """Drain every batcher (queued and computing work finishes), then release backends."""
        served = list(self._served.values())
        for s in served:
            self._metrics.set_model_state(s.name, str(s.version), "draining")
        await asyncio.gather(*(s.batcher.close() for s in served))
        for s in served:
            s.executor.shutdown(wait=True)
            s.backend.close()
            self._metrics.set_model_state(s.name, str(s.version), "unloaded")
        self._served.clear()
