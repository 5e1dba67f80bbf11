"""Fixtures of the in-process tier: the same names as the integration tier's (``server``,
``server_factory``), each a whole server running in this process on the fake engine.

This tier never imports tritonclient: tritonclient registers the KServe ``inference.*``
protobuf symbols in the process's default descriptor pool, and the in-process server registers
ours (visionserve.inference); one process cannot hold both. `make test` runs the two tiers as
two pytest processes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.engine import Engines

from inprocess.harness import MODELS, InProcessServer, fake_repo

if "tritonclient.grpc" in sys.modules:  # pragma: no cover - a wrong invocation
    raise pytest.UsageError(
        "tests/inprocess cannot share a pytest process with tritonclient (both define the "
        "inference.* protobuf symbols): run `make test-unit`, or pytest tests/inprocess alone")


@pytest.fixture
def engines() -> Engines:
    return Engines()


@pytest.fixture
def server(tmp_path: Path, engines: Engines) -> Iterator[InProcessServer]:
    """A server with lenet5, mobilenet_v3_small and resnet18 (their committed configs) on the
    fake engine; new for every test (it starts in milliseconds)."""
    srv = InProcessServer(fake_repo(tmp_path / "repo"), engines=engines)
    yield srv
    srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path, engines: Engines) -> Iterator:
    """Start servers with edited configs and flags; all stopped at the end of the test."""
    started: list[InProcessServer] = []

    def start(models: tuple[str, ...] = tuple(MODELS),
              overrides: dict[str, dict[str, object]] | None = None,
              *flags: str) -> InProcessServer:
        repo = fake_repo(tmp_path / f"repo{len(started)}", models, overrides)
        srv = InProcessServer(repo, *flags, engines=engines)
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def start(engines: Engines) -> Iterator:
    """``start(repo, *flags)``: a server on a repository the test prepared; stopped at the end."""
    started: list[InProcessServer] = []

    def run(repo: Path, *flags: str) -> InProcessServer:
        started.append(InProcessServer(repo, *flags, engines=engines))
        return started[-1]

    yield run
    for srv in reversed(started):
        srv.stop()
