"""The router: which model version a request goes to, and what every model's status is.

It holds three things and only the repository sync controller (``repository_sync``) changes
them: the routing table ``(name, version) → ServedVersion`` (an immutable snapshot replaced
whole, so a reader sees the table before a swap or after it, never half of one), the versions
draining (no longer routed, their requests still finishing), and each model's status.
Every reader (the inference core, model control) only reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .config import ModelConfig
from .errors import ModelFailed, ModelNotFound, ModelUnavailable
from .lifecycle import Lifecycle
from .loader import ServedVersion
from .states import VersionState

__all__ = ["ModelStatus", "Router", "ServedVersion", "VersionStatus"]


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


class Router:
    def __init__(self, lifecycle: Lifecycle | None = None) -> None:
        self._lifecycle = lifecycle or Lifecycle()  # read only: "still loading" answers
        self._table: Mapping[tuple[str, int], ServedVersion] = MappingProxyType({})
        self._draining: dict[tuple[str, int], ServedVersion] = {}
        self._status: dict[str, ModelStatus] = {}

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

    def find_status(self, name: str) -> ModelStatus | None:
        return self._status.get(name)

    # --- writes: the repository sync controller only -------------------------------------------

    def route(self, name: str, versions: Mapping[int, ServedVersion]) -> None:
        """The atomic step: the model's routes are replaced in one assignment of a new table."""
        table = {key: s for key, s in self._table.items() if key[0] != name}
        table.update({(name, number): served for number, served in versions.items()})
        self._table = MappingProxyType(table)

    def clear(self) -> list[ServedVersion]:
        """Route nothing; returns what was routed."""
        routed, self._table = list(self._table.values()), MappingProxyType({})
        return routed

    def set_status(self, status: ModelStatus) -> None:
        self._status[status.name] = status

    def forget(self, name: str) -> None:
        self._status.pop(name, None)

    def start_draining(self, served: ServedVersion) -> None:
        self._draining[(served.name, served.version)] = served

    def end_draining(self, served: ServedVersion) -> None:
        self._draining.pop((served.name, served.version), None)

    # --- helpers -------------------------------------------------------------------------------

    def _known(self) -> str:
        return ", ".join(sorted(self._status)) or "none"

    @staticmethod
    def _routed(table: Mapping[tuple[str, int], ServedVersion], name: str) -> list[ServedVersion]:
        return sorted((s for (n, _), s in table.items() if n == name), key=lambda s: -s.version)
