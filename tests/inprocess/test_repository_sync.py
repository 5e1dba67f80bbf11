"""Routing and repository sync driven in-process, with a fake engine injected (no ONNX Runtime,
no server process, no sleeps): a broken version never replaces a working one, fixing its files
retries it, and a retired version drains its requests (visible as draining) before its engine
is freed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from visionserve.service.engine.backends.base import Backend, ModelOutputs
from visionserve.service.errors import BackendError, ModelNotFound
from visionserve.service.format.repository import VersionEntry
from visionserve.service.limits import ServerLimits
from visionserve.service.metrics import Metrics
from visionserve.service.models.control import ModelControl
from visionserve.service.models.repository_sync import RepositorySync
from visionserve.service.models.routing import Router
from visionserve.service.modes import ModelControlMode
from visionserve.service.states import VersionState

ROOT = Path(__file__).resolve().parents[2]
CONFIG = (ROOT / "tests/fakes/model_repo/lenet5/config.toml").read_text()  # as export wrote it


class FakeBackend(Backend):
    num_classes = 10
    embedding_dim = 4

    def __init__(self, version: int) -> None:
        self.version = version
        self.closed = False

    def run(self, batch: np.ndarray) -> ModelOutputs:
        n = batch.shape[0]
        return ModelOutputs(np.full((n, 10), self.version, np.float32),
                            np.zeros((n, 4), np.float32))

    def close(self) -> None:
        self.closed = True


class Engines:
    """The injected backend factory: a version whose model file says "broken" fails to load."""

    def __init__(self) -> None:
        self.loaded: dict[int, FakeBackend] = {}

    def __call__(self, name: str, config: object, ventry: VersionEntry) -> Backend:
        if ventry.model_file.read_bytes().startswith(b"broken"):
            raise BackendError(f"model {name} version {ventry.version}: the engine refused it")
        self.loaded[ventry.version] = FakeBackend(ventry.version)
        return self.loaded[ventry.version]


def publish(repo: Path, version: int, content: bytes = b"weights") -> None:
    folder = repo / "m" / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(content)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.toml").write_text(CONFIG)
    publish(tmp_path, 1)
    return tmp_path


class Models:
    """A router and the repository sync that feeds it, on the fake engine."""

    def __init__(self) -> None:
        self.engines = Engines()
        self.router = Router()
        self.sync = RepositorySync(self.router, ServerLimits(), Metrics(),
                                   backend_factory=self.engines)
        self.control = ModelControl(self.router, self.sync, ModelControlMode.POLL)


@pytest.fixture
async def models(repo: Path):
    m = Models()
    await m.sync.load_repository(repo)
    yield m
    await m.sync.close()


async def until(condition, what: str) -> None:
    """Yield to the event loop until ``condition()`` holds: a hang guard of about a minute,
    not a timing (the scan runs in an executor thread, which a busy machine may not schedule
    within any fixed number of bare event-loop turns)."""
    for _ in range(60_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


async def test_a_broken_new_version_never_replaces_the_working_one(models, repo):
    publish(repo, 2, b"broken")
    await models.sync.poll()
    assert models.router.resolve("m", 0).version == 1
    versions = models.router.status("m").versions
    assert versions[2].state == VersionState.FAILED and "the engine refused it" in \
        versions[2].reason
    assert versions[1].state == VersionState.READY and "in place of a newer version" in \
        versions[1].reason
    assert not models.engines.loaded[1].closed


async def test_a_cold_start_with_a_broken_newest_version_serves_the_one_before(repo):
    publish(repo, 2, b"weights")
    publish(repo, 3, b"broken")
    cold = Models()
    await cold.sync.load_repository(repo)
    try:
        assert cold.router.resolve("m", 0).version == 2  # the newest that loads, not 1
        versions = cold.router.status("m").versions
        assert versions[3].state == VersionState.FAILED
        assert set(cold.engines.loaded) == {2}  # version 1 was never needed
    finally:
        await cold.sync.close()


async def test_fixing_a_failed_versions_files_retries_it(models, repo):
    publish(repo, 2, b"broken")
    await models.sync.poll()
    publish(repo, 2, b"weights, fixed")  # another size: the fingerprint changes
    await models.sync.poll()
    assert models.router.resolve("m", 0).version == 2
    assert models.router.status("m").versions[2].state == VersionState.READY
    assert set(models.router.status("m").versions) == {2}  # latest = 1: version 1 retired
    assert models.engines.loaded[1].closed


async def test_an_unchanged_repository_loads_nothing_again(models, repo):
    first = models.router.resolve("m", 0)
    await models.sync.poll()
    assert models.router.resolve("m", 0) is first


async def test_a_retired_version_drains_its_requests_visibly_before_its_engine_is_freed(
        models, repo):
    control = models.control
    old = models.router.resolve("m", 0)
    with old.in_use():  # a request still running on version 1
        publish(repo, 2)
        poll = asyncio.create_task(models.sync.poll())
        await until(lambda: 1 in models.router.status("m").versions
                    and models.router.status("m").versions[1].state == VersionState.DRAINING,
                    "version 1 to show as draining")
        assert models.router.resolve("m", 0).version == 2  # new requests go to version 2
        with pytest.raises(ModelNotFound):
            models.router.resolve("m", 1)  # no new request reaches the draining version
        assert [s.version for s in control.statistics("m")] == [2, 1]
        assert not models.engines.loaded[1].closed and not poll.done()
    await poll  # released: the drain ends
    assert models.engines.loaded[1].closed
    assert set(models.router.status("m").versions) == {2}
    assert [s.version for s in control.statistics("m")] == [2]


async def test_unload_shows_draining_then_unloaded(models):
    old = models.router.resolve("m", 0)
    with old.in_use():
        unload = asyncio.create_task(models.sync.unload_model("m"))
        await until(lambda: models.router.status("m").versions.get(1) is not None
                    and models.router.status("m").versions[1].state == VersionState.DRAINING,
                    "version 1 to drain")
    await unload
    assert models.router.status("m").versions[1].state == VersionState.UNLOADED
    assert models.router.status("m").state == VersionState.UNLOADED
