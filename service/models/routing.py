"""The router: which model version a request goes to, and what every model's status is.

It is the one owner of model and version state. It holds the routing table ``(name, version)
→ ServedVersion`` (an immutable snapshot replaced whole, so a reader sees the table before a
swap or after it, never half of one), the versions draining (no longer routed, their requests
still finishing), and each model's status as a frozen ``ModelStatus`` snapshot. Every change is
a transition method below, called by the repository sync controller only (it decides; it never
edits), and each transition writes the status, the ``visionserve_model_state`` metric and the
model's readiness (gRPC health) together. Transitions of a retiring instance are keyed by the
instance: once a successor serves the same version, the old one can no longer change its state.
Every reader (the inference core, model control) only reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from ..errors import ModelFailed, ModelNotFound, ModelUnavailable
from ..format.model_config import ModelConfig
from ..lifecycle import Lifecycle
from ..metrics import Metrics
from ..states import VersionState
from .loader import ServedVersion

__all__ = ["ModelStatus", "Readiness", "Router", "ServedVersion", "VersionStatus"]

Readiness = Callable[[str, bool], Awaitable[None]]  # per model name: has a routed version


async def _ignore(name: str, ready: bool) -> None:
    pass


@dataclass(frozen=True, kw_only=True)
class VersionStatus:
    version: int
    state: VersionState
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """What ListModels/GetModel report about one model: a snapshot, never changed in place."""

    name: str
    config: ModelConfig | None
    error: str = ""
    versions: Mapping[int, VersionStatus] = field(default_factory=lambda: MappingProxyType({}))
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


class Router:
    def __init__(self, lifecycle: Lifecycle | None = None, metrics: Metrics | None = None,
                 on_readiness: Readiness = _ignore) -> None:
        self._lifecycle = lifecycle or Lifecycle()  # read only: "still loading" answers
        self._metrics = metrics or Metrics()
        self._on_readiness = on_readiness  # e.g. the gRPC health service, per model name
        self._table: Mapping[tuple[str, int], ServedVersion] = MappingProxyType({})
        self._draining: dict[tuple[str, int], ServedVersion] = {}
        self._status: dict[str, ModelStatus] = {}
        self._shown: dict[tuple[str, int], VersionState] = {}  # what the state metric says

    # --- reads ---------------------------------------------------------------------------------

    def resolve(self, name: str, version: int) -> ServedVersion:
        """The version a request goes to (0 = newest ready), or the client-facing error: not
        ready yet (loading, unloaded) is UNAVAILABLE, which clients retry; FAILED_PRECONDITION
        only for a version that failed to load; NOT_FOUND only for what is not there."""
        status = self._status.get(name)
        if status is None:
            if self._lifecycle.loading:
                raise ModelUnavailable(f"model {name}: the server is still loading models; "
                                       "retry shortly (watch grpc.health.v1 for SERVING)")
            raise ModelNotFound(f"model {name!r} not found; loaded models: {self._known()} "
                                "(see `visionserve models`)")
        table = self._table  # one snapshot for the whole answer
        if version == 0:
            ready = self._routed(table, name)
            if ready:
                return ready[0]
            if status.state == VersionState.LOADING:
                raise ModelUnavailable(f"model {name} is loading and has no ready version yet; "
                                       "retry shortly")
            if status.state == VersionState.UNLOADED:
                raise ModelUnavailable(f"model {name} is unloaded; load it (KServe "
                                       "RepositoryModelLoad), then retry")
            raise ModelFailed(f"model {name} has no ready version: {status.reason or status.state}")
        served = table.get((name, version))
        if served is not None:
            return served
        vstatus = status.versions.get(version)
        if vstatus is not None and vstatus.state == VersionState.FAILED:
            raise ModelFailed(f"model {name} version {version} failed to load: {vstatus.reason}")
        if vstatus is not None and vstatus.state == VersionState.LOADING:
            raise ModelUnavailable(f"model {name} version {version} is loading; retry shortly")
        ready_numbers = [s.version for s in self._routed(table, name)]
        raise ModelNotFound(f"model {name} version {version} is not served (ready versions: "
                            f"{ready_numbers or 'none'}); pass version 0 for the newest")

    def ready_versions(self, name: str) -> list[ServedVersion]:
        """Routable versions of ``name``, newest first."""
        return self._routed(self._table, name)

    def draining_versions(self, name: str) -> list[ServedVersion]:
        """Versions of ``name`` no longer routed whose requests are still finishing."""
        return sorted((s for (n, _), s in self._draining.items() if n == name),
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
                                f"{self._known()}") from None

    # --- transitions: the repository sync controller only ---------------------------------------

    def begin(self, name: str, config: ModelConfig | None, error: str | None) -> None:
        """A sync of ``name`` starts from what its folder holds now: its config, the model's
        error if the folder is unusable, and the versions routed (ready) or still draining;
        every other version's state is decided again by this sync."""
        old = self._status.get(name)
        versions = {s.version: VersionStatus(version=s.version, state=VersionState.DRAINING)
                    for s in self.draining_versions(name)}
        versions.update({s.version: VersionStatus(version=s.version, state=VersionState.READY,
                                                  reason=s.note)
                         for s in self.ready_versions(name)})
        self._write(ModelStatus(name=name, config=config, error=error or "", versions=versions,
                                num_classes=old.num_classes if old else 0,
                                embedding_dim=old.embedding_dim if old else 0),
                    sweep=False)  # a version dropped here is decided again before the route
        if error or config is None:
            self._metrics.model_load_failures.labels(name, "").inc()

    def loading(self, name: str, version: int) -> None:
        self._set(name, VersionStatus(version=version, state=VersionState.LOADING))

    def failed(self, name: str, version: int, reason: str) -> None:
        """The version did not load (or failed its golden check): counted, and kept out."""
        self._set(name, VersionStatus(version=version, state=VersionState.FAILED, reason=reason))
        self._metrics.model_load_failures.labels(name, str(version)).inc()

    def ready(self, name: str, version: int, reason: str = "") -> None:
        """The version loaded (or keeps serving, with ``reason`` saying why), to be routed."""
        self._set(name, VersionStatus(version=version, state=VersionState.READY, reason=reason))

    async def route(self, name: str, versions: Mapping[int, ServedVersion]) -> list[ServedVersion]:
        """The atomic step: the model's routes are replaced in one assignment of a new table.
        Returns the instances no longer routed, now draining: the caller retires each, then
        reports it with ``retired``."""
        old = self.ready_versions(name)
        table = {key: s for key, s in self._table.items() if key[0] != name}
        table.update({(name, number): served for number, served in versions.items()})
        self._table = MappingProxyType(table)
        retiring = [s for s in old if versions.get(s.version) is not s]
        status = self._status[name]
        shown = dict(status.versions)
        for number, served in versions.items():
            if number not in shown or shown[number].state != VersionState.READY:
                shown[number] = VersionStatus(version=number, state=VersionState.READY,
                                              reason=served.note)
        for s in retiring:
            self._draining[(name, s.version)] = s
            now = shown.get(s.version)
            if s.version not in versions and (now is None or now.state == VersionState.READY):
                shown[s.version] = VersionStatus(version=s.version, state=VersionState.DRAINING)
        newest = versions[max(versions)] if versions else None
        self._write(replace(status, versions=shown,
                            num_classes=newest.backend.num_classes if newest
                            else status.num_classes,
                            embedding_dim=newest.backend.embedding_dim if newest
                            else status.embedding_dim))
        await self._on_readiness(name, bool(versions))
        return retiring

    async def unload(self, name: str, forget: bool = False) -> list[ServedVersion]:
        """Route nothing of ``name``: its routed versions drain (returned, for the caller to
        retire), the others show as unloaded; ``forget`` drops the model from ListModels (its
        folder is gone)."""
        retiring = await self.route(name, {})
        status = self._status[name]
        shown = {n: v if v.state == VersionState.DRAINING
                 else VersionStatus(version=n, state=VersionState.UNLOADED, reason="unloaded")
                 for n, v in status.versions.items()}
        self._write(replace(status, error="", versions=shown))
        if forget:
            del self._status[name]
            self._sweep(name)
        return retiring

    def retired(self, served: ServedVersion, then: VersionState | None = None) -> None:
        """``served`` has drained and is released: its version leaves the model's status, or
        shows as ``then`` (unloaded). Keyed by the instance: if a successor of the same version
        is routed, or the version's state moved on (failed), nothing changes."""
        key = (served.name, served.version)
        if self._draining.get(key) is served:
            del self._draining[key]
        if self._table.get(key, served) is not served:
            return  # a successor serves this version: the state is its own
        status = self._status.get(served.name)
        if status is None:
            self._sweep(served.name)
            return
        shown = dict(status.versions)
        now = shown.get(served.version)
        if now is None or now.state != VersionState.DRAINING:
            return
        if then is None:
            del shown[served.version]
        else:
            shown[served.version] = VersionStatus(version=served.version, state=then,
                                                  reason=then.value)
        self._write(replace(status, versions=shown))

    def clear(self) -> list[ServedVersion]:
        """Route nothing (shutdown); returns what was routed, now draining."""
        routed, self._table = list(self._table.values()), MappingProxyType({})
        for s in routed:
            self._draining[(s.name, s.version)] = s
            if s.name in self._status:
                self._set(s.name, VersionStatus(version=s.version,
                                                state=VersionState.DRAINING))
        return routed

    # --- the status snapshot and the state metric, written together ---------------------------

    def _set(self, name: str, version: VersionStatus) -> None:
        status = self._status[name]
        self._write(replace(status, versions={**status.versions, version.version: version}),
                    sweep=False)

    def _write(self, status: ModelStatus, sweep: bool = True) -> None:
        status = replace(status, versions=MappingProxyType(dict(status.versions)))
        self._status[status.name] = status
        for v in status.versions.values():
            self._show(status.name, v.version, v.state)
        if sweep:
            self._sweep(status.name)

    def _sweep(self, name: str) -> None:
        """A version the model no longer shows, and that no longer drains, reads unloaded."""
        status = self._status.get(name)
        for (n, number) in list(self._shown):
            if n == name and (status is None or number not in status.versions) \
                    and (name, number) not in self._draining:
                self._show(name, number, VersionState.UNLOADED)

    def _show(self, name: str, version: int, state: VersionState) -> None:
        if self._shown.get((name, version)) != state:
            self._shown[(name, version)] = state
            self._metrics.set_model_state(name, str(version), state)

    # --- helpers -------------------------------------------------------------------------------

    def _known(self) -> str:
        return ", ".join(sorted(self._status)) or "none"

    @staticmethod
    def _routed(table: Mapping[tuple[str, int], ServedVersion], name: str) -> list[ServedVersion]:
        return sorted((s for (n, _), s in table.items() if n == name), key=lambda s: -s.version)
