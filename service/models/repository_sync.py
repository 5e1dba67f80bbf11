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
from pathlib import Path

from ..engine.backends import create_backend
from ..errors import ConfigError, ModelNotFound, VisionServeError
from ..format import repository
from ..format.object_store import StoreError, StoreUri
from ..format.repository import ModelEntry
from ..format.store_mirror import StoreMirror
from ..limits import ServerLimits
from ..metrics import Metrics
from ..states import VersionState
from .golden import GoldenCheck, Verdict
from .loader import BackendFactory, ServedVersion, load_version
from .routing import Router

log = logging.getLogger(__name__)

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"(),;]+")


def open_repository(repo: Path, store: StoreUri | None, cache_dir: Path,
                    max_bytes: int) -> tuple[Path, StoreMirror | None]:
    """The folder the scanner reads: ``repo``, or an object store's cache (with its mirror,
    which fills it). Raises ConfigError for a local folder that is not there."""
    if store is not None:
        mirror = StoreMirror(store, cache_dir, max_bytes)
        return mirror.root, mirror
    if not repo.is_dir():
        raise ConfigError(f"--repo {repo}: "
                          + ("not a folder" if repo.exists() else "no such folder")
                          + "; pass the model repository's folder, or create one with "
                          "`visionserve export ARCH --repo DIR`")
    return repo, None


class RepositorySync:
    def __init__(self, router: Router, limits: ServerLimits, metrics: Metrics,
                 backend_factory: BackendFactory = create_backend,
                 rules: repository.ScanRules | None = None,
                 golden: GoldenCheck | None = None) -> None:
        self._router = router  # records every state this controller decides
        self._backend_factory = backend_factory  # injected: tests drive the sync with fakes
        self._limits = limits
        self._metrics = metrics  # for the loads' own series (load time)
        self._synced: dict[str, tuple[object, ...]] = {}  # fingerprint last synced, per model
        self._locks: dict[str, asyncio.Lock] = {}
        # --allow-symlinks-outside-repo, --require-manifest
        self._rules = rules or repository.ScanRules()
        self._golden = golden  # run on every version loaded, before it is routed
        self.repo: Path | None = None
        self._mirror: StoreMirror | None = None  # a repository in object storage: its cache

    async def load_repository(self, repo: Path, only: set[str] | None = None,
                              mirror: StoreMirror | None = None) -> None:
        """Initial load: every model of the repository (or those in ``only``). With a
        ``mirror``, ``repo`` is its cache, brought up to date before each scan."""
        self.repo = repo
        self._mirror = mirror
        # off the event loop: health answers while a large repository is read
        entries = await asyncio.get_running_loop().run_in_executor(None, self._scan)
        for entry in entries:
            if only is None or entry.name in only:
                await self.sync(entry)
        for missing in sorted((only or set()) - {s.name for s in self._router.statuses()}):
            log.error("model %s: no such folder in %s", missing, repo)

    async def poll(self) -> None:
        """Rescan the repository: sync new and changed models, retire removed ones."""
        assert self.repo is not None
        try:
            entries = await asyncio.get_running_loop().run_in_executor(None, self._scan)
        except VisionServeError as exc:  # a store's StoreError too
            log.error("repository poll failed: %s", exc)
            return
        for entry in entries:
            await self.sync(entry)
        known = {s.name for s in self._router.statuses()}
        for gone in sorted(known - {e.name for e in entries}):
            log.info("model %s was removed from the repository; draining it", gone)
            await self.unload_model(gone, forget=True)

    async def folder_names(self) -> list[str]:
        """The names of the repository's model folders, loaded or not (off the event loop)."""
        if self.repo is None:
            return []
        try:
            folders = await asyncio.get_running_loop().run_in_executor(
                None, repository.model_folders, self.repo)
        except VisionServeError as exc:  # the repository went away: what is loaded remains
            log.warning("repository index: %s", exc)
            return []
        return [p.name for p in folders]

    async def load_named(self, name: str) -> None:
        """(Re)load one model folder by name (explicit model control)."""
        loop = asyncio.get_running_loop()
        if self._mirror is not None:
            await loop.run_in_executor(None, self._refresh_cache)
        if self.repo is None or not (self.repo / name).is_dir() or name.startswith((".", "_")):
            raise ModelNotFound(f"model {name!r}: no folder {name!r} in the repository; "
                                "export it first")
        entry = await loop.run_in_executor(None, self._scan_one, name)
        await self.sync(entry, force=True)

    def _scan(self) -> list[ModelEntry]:
        """The repository's models (blocking: run in an executor); a store's cache is brought
        up to date first, and the versions it refused join their models' errors."""
        assert self.repo is not None
        if self._mirror is None:
            return repository.scan(self.repo, self._rules)
        self._mirror.refresh()
        return [self._mirror.amend(e) for e in repository.scan(self.repo, self._rules)]

    def _scan_one(self, name: str) -> ModelEntry:
        assert self.repo is not None
        entry = repository.scan_model(self.repo / name, self.repo, self._rules)
        return entry if self._mirror is None else self._mirror.amend(entry)

    def _refresh_cache(self) -> None:
        assert self._mirror is not None
        try:
            self._mirror.refresh()
        except StoreError as exc:  # the cached copy is what there is
            log.warning("%s", exc)

    async def sync(self, entry: ModelEntry, force: bool = False) -> None:
        """Make the model serve what ``entry`` selects. Unchanged versions keep serving as
        they are; new or changed ones load and warm up before the swap; a config change
        reloads them all. Does nothing if the entry did not change since the last sync
        (unless ``force``): a broken version is not retried until its files change. Every
        state it decides is the router's to record (``Router`` transitions)."""
        name = entry.name
        router = self._router
        async with self._locks.setdefault(name, asyncio.Lock()):
            if not force and self._synced.get(name) == entry.fingerprint:
                return
            self._synced[name] = entry.fingerprint
            old = {s.version: s for s in router.ready_versions(name)}
            router.begin(name, entry.config, self._public(entry.error))
            final: dict[int, ServedVersion] = {}
            if entry.error or entry.config is None:
                log.error("model %s not loaded: %s", name, entry.error)
            else:
                for number, reason in entry.version_errors.items():
                    self._fail(name, number, reason)
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
                        router.ready(name, ventry.version, current.note)
                    else:
                        served = await self._try_load(entry, ventry)
                    if served is None:
                        continue
                    final[ventry.version] = served
                    if fallback:
                        log.warning("model %s: serving version %d in place of a newer version "
                                    "that failed", name, ventry.version)
                        router.ready(name, ventry.version,
                                     "serving in place of a newer version that failed to load")
            if not final and old:
                log.error("model %s: nothing new could be loaded; versions %s keep serving",
                          name, sorted(old))
                final = dict(old)
                shown = router.status(name).versions
                for number in old:
                    failed = shown.get(number)
                    why = f" ({failed.reason})" if failed is not None and failed.reason \
                        and failed.state == VersionState.FAILED else ""
                    router.ready(name, number,
                                 f"kept serving: its replacement failed to load{why}")
            await self._retire(await router.route(name, final))

    async def unload_model(self, name: str, forget: bool = False) -> None:
        """Stop routing to the model; its in-flight requests finish, then it is released.
        ``forget`` also drops it from ListModels (its folder is gone)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._router.status(name)  # NOT_FOUND for a name never seen
            self._synced.pop(name, None)
            retiring = await self._router.unload(name, forget=forget)
            await self._retire(retiring, then=VersionState.UNLOADED)

    async def close(self) -> None:
        """Retire everything: in-flight requests finish, then engines are released."""
        await self._retire(self._router.clear())

    async def _try_load(self, entry: ModelEntry,
                        ventry: repository.VersionEntry) -> ServedVersion | None:
        assert entry.config is not None
        name, number = entry.name, ventry.version
        self._router.loading(name, number)
        try:
            served = await load_version(name, entry.config, entry.config_fingerprint,
                                        ventry, self._limits, self._metrics,
                                        self._backend_factory)
        except VisionServeError as exc:
            self._fail(name, number, str(exc))
            return None
        except Exception as exc:
            log.exception("model %s version %d failed to load", name, number)
            self._fail(name, number, f"{type(exc).__name__}: {exc}")
            return None
        verdict = Verdict(serve=True, reason="")
        try:
            if self._golden is not None:
                verdict = await self._golden.verify(served, ventry.path)
        except Exception as exc:
            log.exception("model %s version %d: the golden check could not run", name, number)
            verdict = Verdict(serve=False, reason=f"the golden check could not run "
                                                  f"({type(exc).__name__}: {exc})")
        except BaseException:  # cancelled (shutdown): release the engine, then stop
            await served.discard()
            raise
        if not verdict.serve:
            await served.discard()
            self._fail(name, number, verdict.reason)
            return None
        served.accounting.start()
        served.note = self._public(verdict.reason) or ""
        self._router.ready(name, number, served.note)
        return served

    async def _retire(self, served: list[ServedVersion],
                      then: VersionState | None = None) -> None:
        """Wait for the requests of versions no longer routed (the router shows them
        draining), release them, then report each to the router: dropped from the model's
        status, or shown as ``then`` (unloaded)."""
        try:
            await asyncio.gather(*(s.retire() for s in served))
        finally:
            for s in served:
                self._router.retired(s, then)

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

    def _fail(self, name: str, version: int, reason: str) -> None:
        log.error("model %s version %d failed to load: %s", name, version, reason)
        self._router.failed(name, version, self._public(reason) or "")
