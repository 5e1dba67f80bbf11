"""The registry driven in-process, with a fake engine injected (no ONNX Runtime, no server
process, no sleeps): a broken version never replaces a working one, fixing its files retries it,
and a retired version drains its requests (visible as draining) before its engine is freed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from visionserve.service.backends.base import Backend, ModelOutputs
from visionserve.service.config import ServerLimits
from visionserve.service.control import ModelControl
from visionserve.service.errors import BackendError, ModelNotFound
from visionserve.service.metrics import Metrics
from visionserve.service.registry import ModelRegistry
from visionserve.service.repository import VersionEntry
from visionserve.service.states import VersionState

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "model_repo" / "lenet5" / "config.toml").read_text()  # a real exported config


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


@pytest.fixture
async def registry(repo: Path):
    engines = Engines()
    reg = ModelRegistry(ServerLimits(), Metrics(), backend_factory=engines)
    reg.engines = engines  # type: ignore[attr-defined]
    await reg.load_repository(repo)
    yield reg
    await reg.close()


async def until(condition, what: str) -> None:
    """Yield to the event loop until ``condition()`` holds (a bounded number of turns)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_a_broken_new_version_never_replaces_the_working_one(registry, repo):
    publish(repo, 2, b"broken")
    await registry.poll()
    assert registry.resolve("m", 0).version == 1
    versions = registry.status("m").versions
    assert versions[2].state == VersionState.FAILED and "the engine refused it" in \
        versions[2].reason
    assert versions[1].state == VersionState.READY and "kept serving" in versions[1].reason
    assert not registry.engines.loaded[1].closed


async def test_fixing_a_failed_versions_files_retries_it(registry, repo):
    publish(repo, 2, b"broken")
    await registry.poll()
    publish(repo, 2, b"weights, fixed")  # another size: the fingerprint changes
    await registry.poll()
    assert registry.resolve("m", 0).version == 2
    assert registry.status("m").versions[2].state == VersionState.READY
    assert set(registry.status("m").versions) == {2}  # latest = 1: version 1 retired
    assert registry.engines.loaded[1].closed


async def test_an_unchanged_repository_loads_nothing_again(registry, repo):
    first = registry.resolve("m", 0)
    await registry.poll()
    assert registry.resolve("m", 0) is first


async def test_a_retired_version_drains_its_requests_visibly_before_its_engine_is_freed(
        registry, repo):
    control = ModelControl(registry, "poll")
    old = registry.resolve("m", 0)
    with old.in_use():  # a request still running on version 1
        publish(repo, 2)
        poll = asyncio.create_task(registry.poll())
        await until(lambda: 1 in registry.status("m").versions
                    and registry.status("m").versions[1].state == VersionState.DRAINING,
                    "version 1 to show as draining")
        assert registry.resolve("m", 0).version == 2  # new requests go to version 2
        with pytest.raises(ModelNotFound):
            registry.resolve("m", 1)  # no new request reaches the draining version
        assert [s.version for s in control.statistics("m")] == [2, 1]
        assert not registry.engines.loaded[1].closed and not poll.done()
    await poll  # released: the drain ends
    assert registry.engines.loaded[1].closed
    assert set(registry.status("m").versions) == {2}
    assert [s.version for s in control.statistics("m")] == [2]


async def test_unload_shows_draining_then_unloaded(registry):
    old = registry.resolve("m", 0)
    with old.in_use():
        unload = asyncio.create_task(registry.unload_model("m"))
        await until(lambda: registry.status("m").versions.get(1) is not None
                    and registry.status("m").versions[1].state == VersionState.DRAINING,
                    "version 1 to drain")
    await unload
    assert registry.status("m").versions[1].state == VersionState.UNLOADED
    assert registry.status("m").state == VersionState.UNLOADED
