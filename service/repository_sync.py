"""The repository sync controller: turns what the repository holds into routing changes.

It syncs each model with its folder: new or changed versions load and warm up first
(``loader``, through the injected backend factory), then the router switches to them in one
step, then versions no longer served are retired (their in-flight requests finish first, shown
as draining meanwhile). A model or version that fails to load keeps its reason (GetModel, logs,
metric) and never stops the others; if nothing new loads, whatever served before keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import repository
from .backends import create_backend
from .config import ServerLimits
from .errors import ModelNotFound, VisionServeError
from .golden import GoldenCheck, Verdict
from .loader import BackendFactory, ServedVersion, load_version
from .metrics import Metrics
from .repository import ModelEntry
from .routing import ModelStatus, Router, VersionStatus
from .states import VersionState

log = logging.getLogger(__name__)

Readiness = Callable[[str, bool], Awaitable[None]]
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"(),;]+")


async def _ignore(name: str, ready: bool) -> None:
    pass


class RepositorySync:
    def __init__(self, router: Router, limits: ServerLimits, metrics: Metrics,
                 on_readiness: Readiness = _ignore,
                 backend_factory: BackendFactory = create_backend,
                 allow_outside: bool = False, golden: GoldenCheck | None = None) -> None:
        self._router = router  # the only writer of its table and statuses
        self._backend_factory = backend_factory  # injected: tests drive the sync with fakes
        self._limits = limits
        self._metrics = metrics
        self._on_readiness = on_readiness  # e.g. the gRPC health service, per model name
        self._synced: dict[str, tuple[object, ...]] = {}  # fingerprint last synced, per model
        self._locks: dict[str, asyncio.Lock] = {}
        self._allow_outside = allow_outside  # --allow-symlinks-outside-repo
        self._golden = golden  # run on every version loaded, before it is routed
        self.repo: Path | None = None

    async def load_repository(self, repo: Path, only: set[str] | None = None) -> None:
        """Initial load: every model of the repository (or those in ``only``)."""
        self.repo = repo
        # off the event loop: health answers while a large repository is read
        entries = await asyncio.get_running_loop().run_in_executor(
            None, repository.scan, repo, self._allow_outside)
        for entry in entries:
            if only is None or entry.name in only:
                await self.sync(entry)
        for missing in sorted((only or set()) - {s.name for s in self._router.statuses()}):
            log.error("model %s: no such folder in %s", missing, repo)

    async def poll(self) -> None:
        """Rescan the repository: sync new and changed models, retire removed ones."""
        assert self.repo is not None
        try:
            entries = await asyncio.get_running_loop().run_in_executor(
                None, repository.scan, self.repo, self._allow_outside)
        except VisionServeError as exc:
            log.error("repository poll failed: %s", exc)
            return
        for entry in entries:
            await self.sync(entry)
        known = {s.name for s in self._router.statuses()}
        for gone in sorted(known - {e.name for e in entries}):
            log.info("model %s was removed from the repository; draining it", gone)
            await self.unload_model(gone, forget=True)

    async def load_named(self, name: str) -> None:
        """(Re)load one model folder by name (explicit model control)."""
        if self.repo is None or not (self.repo / name).is_dir() or name.startswith((".", "_")):
            raise ModelNotFound(f"model {name!r}: no folder {name!r} in the repository; "
                                "export it first")
        entry = await asyncio.get_running_loop().run_in_executor(
            None, repository.scan_model, self.repo / name, self.repo, self._allow_outside)
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
            old = {s.version: s for s in self._router.ready_versions(name)}
            status = ModelStatus(name=name, config=entry.config,
                                 error=self._public(entry.error),
                                 versions={v: VersionStatus(version=v, state=VersionState.READY)
                                           for v in old})
            self._router.set_status(status)
            final: dict[int, ServedVersion] = {}
            if entry.error or entry.config is None:
                log.error("model %s not loaded: %s", name, entry.error)
                self._metrics.model_load_failures.labels(name, "").inc()
            else:
                for number, reason in entry.version_errors.items():
                    self._fail(status, number, reason)
                # the selected versions, then (latest-N policy) older ones in place of those
                # that fail: the newest versions that load are served
                for i, ventry in enumerate((*entry.versions, *entry.fallbacks)):
                    fallback = i >= len(entry.versions)
                    if fallback and len(final) >= entry.wanted:
                        break
                    current = old.get(ventry.version)
                    if (current is not None and not force
                            and current.config_fingerprint == entry.config_fingerprint
                            and current.fingerprint == ventry.fingerprint):
                        served: ServedVersion | None = current
                        status.versions[ventry.version] = VersionStatus(
                            version=ventry.version, state=VersionState.READY,
                            reason=current.note)
                    else:
                        served = await self._try_load(status, entry, ventry)
                    if served is None:
                        continue
                    final[ventry.version] = served
                    if fallback:
                        log.warning("model %s: serving version %d in place of a newer version "
                                    "that failed", name, ventry.version)
                        status.versions[ventry.version].reason = \
                            "serving in place of a newer version that failed to load"
            if not final and old:
                log.error("model %s: nothing new could be loaded; versions %s keep serving",
                          name, sorted(old))
                final = dict(old)
                for number in old:
                    failed = status.versions.get(number)
                    why = f" ({failed.reason})" if failed is not None and failed.reason \
                        and failed.state == VersionState.FAILED else ""
                    status.versions[number] = VersionStatus(
                        version=number, state=VersionState.READY,
                        reason=f"kept serving: its replacement failed to load{why}")
            for number in set(old) - set(final):
                if status.versions[number].state == VersionState.READY:  # retired, not failed
                    del status.versions[number]
            self._route(name, final, status)
            await self._on_readiness(name, bool(final))
            await self._retire([s for v, s in old.items() if final.get(v) is not s])

    async def unload_model(self, name: str, forget: bool = False) -> None:
        """Stop routing to the model; its in-flight requests finish, then it is released.
        ``forget`` also drops it from ListModels (its folder is gone)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            status = self._router.status(name)
            old = {s.version: s for s in self._router.ready_versions(name)}
            self._route(name, {}, status)
            status.error = ""
            for number in list(status.versions):
                if number in old:  # shown as draining by _retire, then unloaded
                    del status.versions[number]
                else:
                    status.versions[number] = VersionStatus(
                        version=number, state=VersionState.UNLOADED, reason="unloaded")
            self._synced.pop(name, None)
            if forget:
                self._router.forget(name)
            await self._on_readiness(name, False)
            await self._retire(list(old.values()), then=VersionState.UNLOADED)

    async def close(self) -> None:
        """Retire everything: in-flight requests finish, then engines are released."""
        await self._retire(self._router.clear())

    def _route(self, name: str, new: dict[int, ServedVersion], status: ModelStatus) -> None:
        self._router.route(name, new)
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
        verdict = Verdict(serve=True, reason="")
        try:
            if self._golden is not None:
                verdict = await self._golden.verify(served, ventry.path)
        except Exception as exc:
            log.exception("model %s version %d: the golden check could not run",
                          status.name, number)
            verdict = Verdict(serve=False, reason=f"the golden check could not run "
                                                  f"({type(exc).__name__}: {exc})")
        except BaseException:  # cancelled (shutdown): release the engine, then stop
            await served.discard()
            raise
        if not verdict.serve:
            await served.discard()
            self._fail(status, number, verdict.reason)
            return None
        served.observe()
        served.note = self._public(verdict.reason) or ""
        status.versions[number] = VersionStatus(version=number, state=VersionState.READY,
                                                reason=served.note)
        return served

    async def _retire(self, served: list[ServedVersion],
                      then: VersionState | None = None) -> None:
        """Drain and release versions no longer routed; while they drain they stay visible
        (GetModel, ModelStatistics and the state metric say "draining"), then they are
        dropped from the model's status, or shown as ``then`` (unloaded)."""
        for s in served:
            self._router.start_draining(s)
            status = self._router.find_status(s.name)
            if status is not None and s.version not in status.versions:
                status.versions[s.version] = VersionStatus(version=s.version,
                                                           state=VersionState.DRAINING)
        try:
            await asyncio.gather(*(s.retire(self._metrics) for s in served))
        finally:
            for s in served:
                self._router.end_draining(s)
                status = self._router.find_status(s.name)
                if status is not None and (v := status.versions.get(s.version)) is not None \
                        and v.state == VersionState.DRAINING:
                    if then is None:
                        del status.versions[s.version]
                    else:
                        status.versions[s.version] = VersionStatus(
                            version=s.version, state=then, reason=then.value)

    def _public(self, text: str | None) -> str | None:
        """A reason as clients see it (GetModel, errors): paths relative to the repository,
        never the server's own directories (an engine's message may name a resolved path
        anywhere on the host: it is replaced). Logs keep the full paths."""
        if not text or self.repo is None:
            return text
        for root in {str(self.repo.resolve()), str(self.repo.absolute()), str(self.repo)} \
                - {".", ""}:
            text = text.replace(root.rstrip("/") + "/", "")
        return _ABSOLUTE_PATH.sub("<a path outside the repository>", text)

    def _fail(self, status: ModelStatus, version: int, reason: str) -> None:
        log.error("model %s version %d failed to load: %s", status.name, version, reason)
        status.versions[version] = VersionStatus(version=version, state=VersionState.FAILED,
                                                 reason=self._public(reason) or "")
        self._metrics.set_model_state(status.name, str(version), VersionState.FAILED)
        self._metrics.model_load_failures.labels(status.name, str(version)).inc()
