"""One model version from disk to routable: engine, warm-up, batcher — and back to nothing.

``ServedVersion`` counts the requests using it (``in_use``), so that retiring a version waits for
every request that resolved to it — queued, computing or still preprocessing — before its
batcher stops and its engine is freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..engine.backends import Backend, create_backend
from ..engine.batching import BatchPolicy, DynamicBatcher
from ..engine.preprocess import Preprocessor
from ..format.manifest import MANIFEST_FILE, verify_contents
from ..format.model_config import ModelConfig
from ..format.provenance import weights_of
from ..format.repository import VersionEntry
from ..limits import ServerLimits
from ..metrics import Metrics
from .accounting import VersionAccounting

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False)
class ServedVersion:
    """A loaded, routable model version: everything a request needs, in one place."""

    name: str
    version: int
    config: ModelConfig
    config_fingerprint: tuple[object, ...]
    fingerprint: tuple[object, ...]
    labels: tuple[str, ...]
    backend: Backend
    batcher: DynamicBatcher
    preprocessor: Preprocessor
    executor: ThreadPoolExecutor
    accounting: VersionAccounting
    note: str = ""  # what GetModel shows beside "ready" (e.g. the golden check's warning)
    weights: str = ""  # where its weights came from (format/provenance.py)
    _inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def where(self) -> str:
        return f"model {self.name} version {self.version}"

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Held by a request from resolution to reply. Enter it before the first await after
        resolving, so that no swap can retire the version in between."""
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def retire(self) -> None:
        """Wait for the requests using this version, stop its batcher, free its engine. (Its
        state is the router's to show: ``Router.route`` and ``Router.retired``.)"""
        await self._idle.wait()
        await self.discard()
        log.info("unloaded %s", self.where)

    async def discard(self) -> None:
        """Stop the batcher and free the engine of a version that never served (or no longer
        does and has no request left)."""
        await self.batcher.close()
        self.accounting.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._free)

    def _free(self) -> None:
        self.executor.shutdown(wait=True)
        self.backend.close()
        release_freed_memory()


def release_freed_memory() -> None:
    """Ask glibc to return freed heap pages to the OS. Without it, a retired engine's memory
    stays in malloc's per-thread arenas and RSS ratchets up with every reload (measured in
    docs/lifecycle.md). A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - musl, macOS
        pass


BackendFactory = Callable[[str, ModelConfig, VersionEntry], Backend]


async def load_version(name: str, config: ModelConfig, config_fingerprint: tuple[object, ...],
                       ventry: VersionEntry, limits: ServerLimits, metrics: Metrics,
                       backend_factory: BackendFactory = create_backend) -> ServedVersion:
    """Create the engine with ``backend_factory`` (in an executor: it blocks), warm it up at the
    configured batch sizes, and start the version's batcher. Raises if any step fails; nothing
    is routable before."""
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    where = f"model {name} version {ventry.version}"
    if ventry.manifest is not None:  # every file's sha256, before the engine reads any
        await loop.run_in_executor(None, verify_contents, ventry.path, ventry.manifest, where)
    else:
        log.info("%s has no %s: loading it unverified (--require-manifest refuses such "
                 "versions)", where, MANIFEST_FILE)
    backend = await loop.run_in_executor(None, backend_factory, name, config, ventry)
    try:
        if len(ventry.labels) not in (0, backend.num_classes):
            log.warning("model %s version %d: labels.txt has %d lines for %d classes; missing "
                        "labels are reported as the class index", name, ventry.version,
                        len(ventry.labels), backend.num_classes)
        for n in config.warmup_batch_sizes:
            zeros = np.zeros((n, *config.input.shape), dtype=np.float32)
            await loop.run_in_executor(None, backend.run, zeros)
    except BaseException:
        backend.close()
        raise
    executor = ThreadPoolExecutor(max_workers=config.instance_count,
                                  thread_name_prefix=f"{name}-v{ventry.version}")
    policy = BatchPolicy(
        max_batch_size=config.max_batch_size,
        max_queue_size=config.batching.max_queue_size,
        max_queue_delay_ms=config.batching.max_queue_delay_ms,
        preferred_batch_sizes=config.batching.preferred_batch_sizes,
        instances=config.instance_count,
        reject_unreachable_deadlines=config.batching.reject_unreachable_deadlines,
    )
    accounting = VersionAccounting(metrics, name, ventry.version, policy.max_queue_size,
                                   config.instance_count)
    preprocessor = Preprocessor(name, ventry.version, config.input, limits)
    batcher = DynamicBatcher(where, backend.run, policy, executor, accounting,
                             assemble=preprocessor.assemble)
    batcher.start()
    seconds = time.perf_counter() - start
    metrics.model_load_seconds.labels(name, str(ventry.version)).observe(seconds)
    log.info("loaded %s (%d classes, embedding %d, max batch %d) in %.2f s", where,
             backend.num_classes, backend.embedding_dim, config.max_batch_size, seconds)
    return ServedVersion(name=name, version=ventry.version, config=config,
                         config_fingerprint=config_fingerprint, fingerprint=ventry.fingerprint,
                         labels=ventry.labels, backend=backend, batcher=batcher,
                         preprocessor=preprocessor, executor=executor,
                         accounting=accounting, weights=weights_of(ventry.path))

