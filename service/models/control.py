"""Model control: what every front end may ask about the models, and what it may change.

List, status, resolve (for metadata and config), statistics, load and unload, in one place that
both servicers (and the planned HTTP one) call; they reach neither the router nor the repository
sync directly. Load and unload are honoured in ``--model-control explicit`` mode only, as in Triton
(and that mode needs a bearer token, or ``--trust-network``); each request writes an audit log line
(who: the client's address and identity) and is rate-limited per model.
"""

from __future__ import annotations

import logging
import time

from ..errors import InvalidInput, ModelFailed, ModelNotFound, RateLimited
from ..format import model_format
from ..modes import ModelControlMode
from ..states import VersionState
from .repository_sync import RepositorySync
from .routing import ModelStatus, Router, ServedVersion
from .views import IndexEntry, ModelMetadata, ServedConfig, TensorSpec, VersionStats

audit = logging.getLogger("visionserve.audit")  # one line per load/unload request

# a load reloads and warms up every version of the model: per model, a burst of CONTROL_BURST
# loads/unloads, then one per ``interval_s`` (--load-interval-s; a token bucket); beyond,
# RESOURCE_EXHAUSTED saying when to retry
CONTROL_BURST = 4


class ModelControl:
    def __init__(self, router: Router, sync: RepositorySync, mode: ModelControlMode,
                 identity: str = "no token", interval_s: float = 5.0,
                 clock=time.monotonic) -> None:
        self._router = router
        self._sync = sync
        self._mode = mode  # poll | explicit | none (--model-control)
        self._identity = identity  # who a caller that passed the token check is
        self._interval_s = interval_s  # 0: no rate limit
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # model -> (tokens, at)

    def is_known(self, name: str) -> bool:
        return self._router.is_known(name)

    def models(self) -> list[ModelStatus]:
        return self._router.statuses()

    def status(self, name: str) -> ModelStatus:
        """NOT_FOUND for a name the repository does not hold."""
        return self._router.status(name)

    def resolve(self, name: str, version: int) -> ServedVersion:
        """The served version (0 = the newest ready), or the client-facing reason why not."""
        return self._router.resolve(name, version)

    def weights(self, name: str) -> dict[int, str]:
        """Where each serving version's weights came from (format/provenance.py)."""
        return {s.version: s.weights for s in self.ready_versions(name)}

    def ready_versions(self, name: str) -> list[ServedVersion]:
        """Routable versions of ``name``, newest first."""
        return self._router.ready_versions(name)

    def metadata(self, name: str, version: int = 0) -> tuple[ModelMetadata, int]:
        """The model's tensors, one input per accepted form (FP32 first), and its versions:
        the one asked for, or (``version`` 0) every ready one. With the version answered."""
        served = self.resolve(name, version)
        versions = [served] if version else self.ready_versions(name)
        spec, out, batch = served.config.input, served.config.output, -1
        return ModelMetadata(
            name=served.name, versions=tuple(s.version for s in versions),
            platform=model_format.PLATFORMS[served.config.backend],
            inputs=tuple(TensorSpec(spec.name, dtype, tuple(shape))
                         for dtype, shape in spec.forms()),
            outputs=(TensorSpec(out.logits, "FP32", (batch, served.backend.num_classes)),
                     TensorSpec(out.embedding, "FP32", (batch, served.backend.embedding_dim))),
            weights=served.weights,
        ), served.version

    def served_config(self, name: str, version: int = 0) -> ServedConfig:
        served = self.resolve(name, version)
        return ServedConfig(name=served.name, version=served.version, config=served.config,
                            num_classes=served.backend.num_classes,
                            embedding_dim=served.backend.embedding_dim, weights=served.weights)

    def statistics(self, name: str = "", version: int = 0) -> list[VersionStats]:
        """The statistics of one version (``version``), of every ready or draining one of
        ``name``, or of those of every model (no name). A draining version's requests are
        still finishing: its counts still move."""
        return [VersionStats(name=s.name, version=s.version, stats=s.accounting.stats)
                for s in self._stat_versions(name, version)]

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """The repository index: every version of every model the server knows (a model
        without any, once), and, as Triton lists them, every model folder of the repository it
        has not loaded (``--model-control explicit``), without a version or state: how a client
        finds what it may load."""
        folders = [] if ready_only else await self._sync.folder_names()
        statuses = self.models()  # after the await: one snapshot, the folders checked against it
        entries = []
        for status in statuses:
            if not status.versions:
                entries.append(IndexEntry(status.name, 0, status.state, status.reason))
            entries.extend(IndexEntry(status.name, v.version, v.state, v.reason)
                           for v in sorted(status.versions.values(), key=lambda v: v.version))
        if ready_only:
            return [e for e in entries if e.state == VersionState.READY]
        known = {status.name for status in statuses}
        entries += [IndexEntry(name, 0, None, "") for name in folders if name not in known]
        return sorted(entries, key=lambda e: (e.name, e.version))

    def _stat_versions(self, name: str, version: int) -> list[ServedVersion]:
        if not name:
            return [s for status in self.models() for s in self._reported(status.name)]
        if version:
            draining = [s for s in self._router.draining_versions(name) if s.version == version]
            return draining or [self.resolve(name, version)]
        self.status(name)  # NOT_FOUND for unknown names
        versions = self._reported(name)
        if not versions:
            raise ModelNotFound(f"model {name} has no ready version")
        return versions

    def _reported(self, name: str) -> list[ServedVersion]:
        return sorted([*self.ready_versions(name), *self._router.draining_versions(name)],
                      key=lambda s: -s.version)

    async def load(self, name: str, rpc: str, peer: str = "") -> None:
        """(Re)load a model folder; raises if the mode forbids it or the model did not load."""
        self._require_explicit(rpc)
        self._require_name(name, rpc)
        self._admit_change(name, rpc, peer)
        await self._sync.load_named(name)
        status = self._router.status(name)
        if status.state != VersionState.READY:
            raise ModelFailed(f"model {name} failed to load: {status.reason}")

    async def unload(self, name: str, rpc: str, peer: str = "") -> None:
        self._require_explicit(rpc)
        self._require_name(name, rpc)
        self._admit_change(name, rpc, peer)
        await self._sync.unload_model(name)

    def _admit_change(self, name: str, rpc: str, peer: str) -> None:
        """The audit line (who asked what), then the per-model rate limit."""
        now = self._clock()
        tokens, at = self._buckets.get(name, (float(CONTROL_BURST), now))
        tokens = min(float(CONTROL_BURST), tokens + (now - at) / self._interval_s) \
            if self._interval_s else float(CONTROL_BURST)
        refused = tokens < 1
        audit.info("%s model=%s peer=%s identity=%s%s", rpc, name, peer or "-", self._identity,
                   " refused=rate-limited" if refused else "")
        if refused:
            self._buckets[name] = (tokens, now)
            raise RateLimited(
                f"model {name}: {rpc} refused: at most {CONTROL_BURST} loads or unloads of a "
                f"model at once, then one per {self._interval_s:g} s (each reloads and warms "
                f"up the model; the server's --load-interval-s); retry in "
                f"{(1 - tokens) * self._interval_s:.1f} s")
        self._buckets[name] = (tokens - 1, now)

    @staticmethod
    def _require_name(name: str, rpc: str) -> None:
        if not name:
            raise InvalidInput(f"{rpc}: model_name is empty; name the model folder to "
                               f"{'unload' if 'Unload' in rpc else 'load'}")

    def _require_explicit(self, rpc: str) -> None:
        if self._mode != ModelControlMode.EXPLICIT:
            raise ModelFailed(f"{rpc} is refused: the server runs with --model-control "
                              f"{self._mode}; restart it with --model-control explicit to load "
                              "and unload models by request")
