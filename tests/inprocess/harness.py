"""The whole server in the test's own process: the real ``Server`` (gRPC and REST front ends,
admission, accounting, repository sync, batching, preprocessing, metrics endpoint) built from
the same ``serve`` flags a user types, on port 0, with the fake engine of tests/fakes/engine.py
injected through its backend factory.

The server's event loop runs in one thread of the test process, so the tests talk to it through
real loopback sockets with the same blocking clients as the integration tier (a test's body is
the same on either tier: its subject decides where it runs). Nothing here starts a process or
exports a model; a server starts in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from fakes.engine import Engines, fake_model_file

from conftest import ServerClients, edit_config
from visionserve.service.cli import build_parser, server_config
from visionserve.service.logs import FORMAT, tag_request_ids
from visionserve.service.process.server import Server

ROOT = Path(__file__).resolve().parents[2]
# configs and labels as export wrote them (model_repo/ holds only what `make models` generates)
EXPORTED = ROOT / "tests" / "fakes" / "model_repo"
# those models, with the fake engine's file as version 1: model -> (embedding size, seed)
MODELS = {"lenet5": (84, 1), "mobilenet_v3_small": (1024, 2), "resnet18": (512, 3)}
START_TIMEOUT_S = 60.0


def fake_repo(dst: Path, models: tuple[str, ...] = tuple(MODELS),
              overrides: dict[str, dict[str, object]] | None = None) -> Path:
    """A repository on disk as export leaves it (config.toml, labels.txt, ``1/model.onnx``),
    the model file being the fake engine's."""
    for name in models:
        model_dir = dst / name
        model_dir.mkdir(parents=True, exist_ok=True)
        for file in ("config.toml", "labels.txt"):
            shutil.copy(EXPORTED / name / file, model_dir / file)
        publish_fake(model_dir, 1)
        if overrides and name in overrides:
            edit_config(model_dir, overrides[name])
    return dst


def lenet5_repo(dst: Path) -> Path:
    """A repository holding lenet5 as export leaves it: its labels also in the version folder."""
    repo = fake_repo(dst, ("lenet5",))
    shutil.copy(repo / "lenet5" / "labels.txt", repo / "lenet5" / "1" / "labels.txt")
    return repo


def publish_fake(model_dir: Path, version: int, seed: int | None = None) -> Path:
    """Version ``version`` of the model in ``model_dir``, for the fake engine (a hidden folder
    renamed into place, as export publishes)."""
    name = model_dir.name
    dim, default_seed = MODELS.get(name, (16, 9))
    classes = len((model_dir / "labels.txt").read_text().splitlines())
    tmp = model_dir / f".tmp-{version}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.onnx").write_bytes(fake_model_file(classes, dim, seed or default_seed))
    target = model_dir / str(version)
    if target.exists():
        shutil.rmtree(tmp)
        return target
    tmp.rename(target)
    return target


class _LogText(logging.Handler):
    """The server's log lines, formatted as the CLI writes them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessServer(ServerClients):
    """A started ``Server`` on loopback; ``stop()`` shuts it down as SIGTERM would."""

    def __init__(self, repo: Path, *flags: str, engines: Engines | None = None,
                 wait_ready: bool = True) -> None:
        """Start a server on ``repo`` with ``serve``'s ``flags``; return once it is SERVING,
        or with ``wait_ready=False`` once it listens (models may still be loading: hold them
        with ``engines.hold_loads()``)."""
        self.repo = repo
        self.engines = engines or Engines()
        args = build_parser().parse_args(
            ["serve", "--repo", str(repo), "--host", "127.0.0.1", "--grpc-port", "0",
             "--metrics-port", "0", "--http-port", "0", *flags])
        self.config = server_config(args)
        self._logs = _LogText()
        tag_request_ids()
        logger = logging.getLogger("visionserve")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self._logs)
        self._loop = asyncio.new_event_loop()
        self._started: Future[Server] = Future()
        self._listening: Future[Server] = Future()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inprocess-server", daemon=True)
        self._thread.start()
        try:
            self.server = (self._started if wait_ready else self._listening).result(
                START_TIMEOUT_S)
        except BaseException:
            self._detach_logs()
            raise
        self.grpc_port = self.server.grpc_port
        self.metrics_port = self.server.metrics_port
        self.http_port = self.server.http_port
        self.open_clients()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()
            self._stopped.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            server = Server(self.config, self._stop, backend_factory=self.engines)
            starting = asyncio.ensure_future(server.start())
            listening = asyncio.ensure_future(server.listening.wait())
            await asyncio.wait((starting, listening), return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            if server.listening.is_set():  # ports bound; models may still be loading
                self._listening.set_result(server)
            await starting
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, re-raised there
            for future in (self._listening, self._started):
                if not future.done():
                    future.set_exception(exc)
            return
        if not self._listening.done():
            self._listening.set_result(server)
        self._started.set_result(server)
        await server.wait()
        await server.shutdown()

    def log(self) -> str:
        return "\n".join(self._logs.lines)

    def alive(self) -> bool:
        return not self._stopped.is_set()

    def begin_stop(self) -> None:
        """Start the graceful shutdown (what SIGTERM starts) without waiting for its end."""
        self._in_loop(self._stop.set)

    def _in_loop(self, callback: Callable[[], object]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: the server has stopped already
            pass

    def wait_stopped(self, timeout: float = 60.0) -> bool:
        return self._stopped.wait(timeout)

    def end_shutdown_delay(self) -> None:
        self._in_loop(self.server.end_shutdown_delay)

    def stop(self) -> int:
        self.engines.release_all()
        self.channel.close()
        self.begin_stop()
        self.end_shutdown_delay()
        stopped = self.wait_stopped()
        self._detach_logs()
        assert stopped, "the in-process server did not stop within 60 s"
        return 0

    def _detach_logs(self) -> None:
        logger = logging.getLogger("visionserve")
        logger.removeHandler(self._logs)
        logger.setLevel(self._level)
