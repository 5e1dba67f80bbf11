"""Process wiring (``Server``): metrics HTTP server, gRPC server (our API, health, reflection),
models, signals, graceful shutdown. Everything is built here from one ``ServerConfig`` and passed
down.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
from functools import partial
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import disable_created_metrics

from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

from ..api.access_log import AccessLog
from ..api.admission import GOAWAY_S, SETTLE_S, Admission
from ..api.auth import TokenCheck, TokenFile
from ..api.calls import CallHandler
from ..api.grpc import wire_limits
from ..api.grpc.auth import BearerTokenInterceptor
from ..api.grpc.kserve import KServeServicer
from ..api.grpc.orca import LoadReports
from ..api.grpc.strict import add_servicer
from ..api.grpc.vision import VisionServicer
from ..api.http.rest import RestApi
from ..core.inference import InferenceCore
from ..engine.backends import EngineOptions, create_backend
from ..engine.decode_pool import DecodePool
from ..errors import ConfigError
from ..lifecycle import Lifecycle, Phase
from ..limits import cpu_count
from ..metrics import Metrics
from ..models.control import ModelControl
from ..models.golden import GoldenCheck
from ..models.loader import BackendFactory
from ..models.repository_sync import RepositorySync, open_repository
from ..models.routing import Router
from ..modes import ModelControlMode
from ..states import VersionState
from .grpc_transport import transport_options
from .http_listener import HttpListener
from .metrics_http import MetricsHttp
from .server_config import ServerConfig

log = logging.getLogger(__name__)


class Server:
    """One server process's parts, built from one ``ServerConfig``, in three steps (uvicorn's
    shape): ``start`` (listening, models loaded, SERVING), ``wait`` (until ``stop``), and
    ``shutdown`` (readiness off, drain, stop, release). ``serve`` runs the three with signals."""

    def __init__(self, config: ServerConfig, stop: asyncio.Event,
                 backend_factory: BackendFactory | None = None) -> None:
        """``backend_factory`` loads one version's engine (blocking, called from an executor);
        the default picks ONNX Runtime, OpenVINO or TensorRT from the model's config. Tests pass
        a fake engine here and run the whole server in-process (tests/inprocess)."""
        self.config = config
        self.stop = stop
        self.lifecycle = Lifecycle()
        disable_created_metrics()  # the *_created series only double the scrape size
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self.router = Router(self.lifecycle, self.metrics, self._readiness)
        threads = config.preprocess_threads or cpu_count()
        self._decode_pool = DecodePool(threads, config.limits, self.metrics.decode_queue)
        self.core = InferenceCore(self.router, self._decode_pool, config.limits)
        if backend_factory is None:
            engines = EngineOptions(openvino_cache_dir=config.openvino_cache_dir)
            backend_factory = partial(create_backend, options=engines)
        self.sync = RepositorySync(self.router, config.limits, self.metrics,
                                   rules=config.scan_rules,
                                   backend_factory=backend_factory,
                                   golden=GoldenCheck(config.golden_check, self.core.outputs,
                                                      self.metrics))
        self.admission = Admission(self.lifecycle, config.limits.max_inflight_requests)
        self._http: HttpListener | None = None  # built with the gRPC server's parts
        self.grpc = self._build_grpc()
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._metrics_http: MetricsHttp | None = None
        self._poller: asyncio.Task[None] | None = None
        self._delay_over = asyncio.Event()  # set: the shutdown delay ends now
        self.listening = asyncio.Event()  # set by start() once every port is bound
        self._token_watch: asyncio.Task[None] | None = None

    def _build_grpc(self) -> grpc.aio.Server:
        config = self.config
        limit = config.limits.max_message_bytes
        self._access_log = AccessLog(config.access_log)
        check = TokenCheck(config.auth_token, config.auth_open) if config.auth_token else None
        # no interceptor at all without auth: no per-call cost
        interceptors = [BearerTokenInterceptor(check, self._refused)] if check else []
        self.token_file = TokenFile(config.auth_token_file, check) \
            if check and config.auth_token_file else None
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs or None, options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # exclusive by default: with SO_REUSEPORT a second server starts on a port in
                # use and the kernel splits connections between it and the stale one
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),
                *transport_options(config.limits),
            ])
        control = ModelControl(self.router, self.sync, config.model_control,
                               "bearer token" if config.auth_token else "no token",
                               config.load_interval_s)
        reports = LoadReports(self.metrics.utilization) if config.orca_load_reports else None
        calls = CallHandler(control, self.metrics, self.admission, self._access_log, reports)
        wire = wire_limits.schemas(config.limits)  # counts checked before protobuf parses
        add_servicer(pb_grpc.add_VisionServiceServicer_to_server,
                     VisionServicer(self.core, control, calls), server, wire, self._refused)
        add_servicer(kpb_grpc.add_GRPCInferenceServiceServicer_to_server,
                     KServeServicer(self.core, control, calls, self.lifecycle), server, wire,
                     self._refused)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.http_port is not None:  # the REST API: same core, control, accounting, auth
            rest = RestApi(self.core, control, calls, self.lifecycle, check, self._refused)
            self._http = HttpListener(
                rest.app(), config.host, config.http_port, config.limits.http_max_connections,
                config.tls.ssl_context() if config.tls else None,
                auto_decompress=False,  # api/http/body.py decompresses, within the body limit
                lingering_time=2.0)  # after an early 413, unread body bytes are not awaited long
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["VisionService"].full_name,
             kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        return server

    def _refused(self, method: str, code: str, reason: str) -> None:
        """A call refused before any handler ran (token check, strict decoding): counted by
        reason, and in the access log like any failed call (rate-limited there)."""
        self.metrics.refused.labels(method, reason).inc()
        self._access_log.record(method, "", "", f"{code} ({reason})", 0.0)

    async def _readiness(self, name: str, ready: bool) -> None:
        """Per-model gRPC health, set by the repository sync."""
        await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if ready
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start(self) -> None:
        """Listen (NOT_SERVING), load the repository, then go SERVING, unless ``stop`` was
        set meanwhile: a signal during the initial load never reports SERVING."""
        config = self.config
        try:
            repo, mirror = open_repository(config.repo, config.store_uri, config.store_cache_dir,
                                           int(config.cache_max_gb * 1e9))
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        await self._listen()
        only = set(config.load_models) if config.model_control is ModelControlMode.EXPLICIT \
            else None
        try:
            await self.sync.load_repository(repo, only, mirror)
        except ConfigError as exc:  # the repository itself cannot be read: nothing to serve
            await self.grpc.stop(0)
            await self._close_http()
            raise StartupError(f"--repo: {exc}") from None
        if self.stop.is_set():
            return
        await self._serving()

    async def _listen(self) -> None:
        """Bind the metrics, gRPC and HTTP ports (a port in use is a ``StartupError`` naming
        its flag) and start the gRPC server, NOT_SERVING."""
        config = self.config
        metrics_host = config.metrics_host or config.host
        try:
            self._metrics_http = MetricsHttp(self.metrics.registry, metrics_host,
                                             config.metrics_port)
            self.metrics_port = await self._metrics_http.start()
        except OSError as exc:
            raise StartupError(_cannot_listen(
                "--metrics-port", metrics_host, config.metrics_port, exc,
                "--metrics-host" if config.metrics_host else "--host")) from None
        address = f"{config.host}:{config.grpc_port}"
        try:
            self.grpc_port = self.grpc.add_secure_port(address, config.tls.credentials()) \
                if config.tls else self.grpc.add_insecure_port(address)
        except RuntimeError:
            await self._close_http()
            raise StartupError(
                f"--grpc-port {config.grpc_port}: cannot listen on {address}: the port is in "
                "use (another server, perhaps a stale one of ours) or the address is not this "
                "machine's. Stop the other process or pick another port; --reuse-port shares "
                "a port with another server on purpose") from None
        if self._http is not None:
            try:
                self.http_port = await self._http.start()
            except OSError as exc:
                await self._close_http()
                raise StartupError(_cannot_listen("--http-port", config.host, config.http_port,
                                                  exc, "--host") + " (or --no-http)") from None
            log.info("HTTP (KServe v2 REST) listening on %s:%d (%s)", config.host,
                     self.http_port, "TLS" if config.tls else "plaintext")
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        self.listening.set()
        log.info("gRPC listening on %s:%d (%s; %s; NOT_SERVING until models are loaded)",
                 config.host, self.grpc_port,
                 "plaintext" if not config.tls else
                 "TLS, client certificates required" if config.tls.client_ca else "TLS",
                 "no auth" if not config.auth_token else
                 "bearer token required except for " + ", ".join(("health", *config.auth_open)))

    async def _serving(self) -> None:
        """Go SERVING: readiness on, the log line, the ready file."""
        config = self.config
        statuses = self.router.statuses()
        ready = [s.name for s in statuses if s.state == VersionState.READY]
        failed = [s.name for s in statuses if s.state == VersionState.FAILED]
        self.lifecycle.advance(Phase.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving gRPC on %s:%d%s, metrics on http://%s:%d/metrics; models ready: %s%s",
                 config.host, self.grpc_port,
                 f", HTTP on {config.host}:{self.http_port}" if self.http_port else "",
                 config.metrics_host or config.host, self.metrics_port,
                 ", ".join(ready) or "none",
                 f"; failed: {', '.join(failed)}" if failed else "")
        if config.ready_file:
            _write_ready_file(config.ready_file, {
                "grpc_port": self.grpc_port, "metrics_port": self.metrics_port,
                "http_port": self.http_port or None,
                "pid": os.getpid(), "models_ready": ready, "models_failed": failed})
        if config.model_control is ModelControlMode.POLL:
            self._poller = asyncio.create_task(
                _poll(self.sync, config.poll_interval_s, self.stop))
        if self.token_file is not None:
            self._token_watch = asyncio.create_task(_watch_token(self.token_file, self.stop))

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._metrics_http is not None:
            await self._metrics_http.close()
            self._metrics_http = None

    async def wait(self) -> None:
        await self.stop.wait()

    def end_shutdown_delay(self) -> None:
        """Cut ``--shutdown-delay-s`` short (an embedding program, or a test, that knows its
        balancer has caught up); the drain that follows is unchanged."""
        self._delay_over.set()

    async def shutdown(self) -> None:
        """Readiness off first (health NOT_SERVING, ServerReady false), then, after
        ``--shutdown-delay-s``, new calls are refused UNAVAILABLE while accepted ones finish
        (up to the grace period); queued batches drain, engines are released."""
        config = self.config
        loop = asyncio.get_running_loop()
        log.info("shutting down: readiness off, refusing new requests, finishing in-flight "
                 "ones (grace %.0f s; a second signal exits at once)", config.shutdown_grace_s)
        if config.ready_file:
            config.ready_file.unlink(missing_ok=True)
        self.lifecycle.advance(Phase.DRAINING)
        await self.health.enter_graceful_shutdown()  # first: before a scan in progress ends
        for task in (self._poller, self._token_watch):
            if task is not None:
                await task
        if config.shutdown_delay_s > 0:
            log.info("readiness is off; still serving for %.1f s (--shutdown-delay-s)",
                     config.shutdown_delay_s)
            try:
                await asyncio.wait_for(self._delay_over.wait(), config.shutdown_delay_s)
            except TimeoutError:
                pass
        # our handlers refuse new calls with UNAVAILABLE while accepted ones finish; then gRPC
        # stops (calls still running after the grace are cancelled)
        started = loop.time()
        log.info("now refusing new calls (UNAVAILABLE); finishing the accepted ones")
        self.lifecycle.advance(Phase.STOPPING)
        grace = config.shutdown_grace_s
        # the drain ends when the accepted calls are done: calls refused meanwhile never extend
        # it (clients retrying in a loop would keep the server up for the whole grace)
        drained = await self.admission.drain(grace)
        if not drained:
            log.warning("requests still running after the %.0f s grace are cancelled", grace)
            self.admission.answer_refusals()
        else:  # refusals held until gRPC's GOAWAY: a retry never races its shutdown
            self.admission.hold_refusals()
            await asyncio.sleep(SETTLE_S)
        if self._http is not None:
            await self._http.stop_listening()
        # drained, only held refusals are left: their answers must outlive the GOAWAY wait
        floor = SETTLE_S + GOAWAY_S + 0.5 if drained else 0.0
        stopping = asyncio.create_task(
            self.grpc.stop(max(floor, grace - (loop.time() - started))))
        if drained:
            await asyncio.sleep(GOAWAY_S)
            self.admission.answer_refusals()
        await stopping
        if self._http is not None:  # before the models go: nothing may reach them after this
            await self._http.close()
            self._http = None
        try:  # what is left is at most the batches computing now
            await asyncio.wait_for(self.sync.close(), timeout=10)
        except TimeoutError:
            log.error("models did not unload within 10 s of the grace period; exiting anyway")
        self._decode_pool.shutdown()
        await self._close_http()
        self.lifecycle.advance(Phase.STOPPED)
        log.info("stopped")


class StartupError(Exception):
    """The server cannot start as configured (a port it cannot bind): a usage error."""


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully (see
    ``Server.shutdown``). A second signal during the shutdown exits at once."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second %s during shutdown: exiting now, in-flight requests are lost",
                        sig.name)
            logging.shutdown()
            os._exit(128 + sig.value)
        log.info("%s received", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    server = Server(config, stop)
    if server.token_file is not None:  # SIGHUP: reload the token file now
        loop.add_signal_handler(signal.SIGHUP, server.token_file.check, True)
    await server.start()
    await server.wait()
    await server.shutdown()


def _cannot_listen(flag: str, host: str, port: int, exc: OSError, host_flag: str) -> str:
    """Why a port could not be bound, and what to change: the port, or the address."""
    where = f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc})"
    if exc.errno == errno.EADDRINUSE:
        return where + "; is another server using it? Pick another port (0 = any free one)"
    if exc.errno == errno.EACCES:
        return where + "; ports below 1024 need privileges: pick a port above 1023"
    return where + f"; is {host_flag} an address of this machine? (0.0.0.0: every interface)"


def _write_ready_file(path: Path, content: dict[str, object]) -> None:
    """Write-then-rename: a reader sees no file or the whole document, never half of it. A
    failure is logged, never fatal: the server serves whether or not a script is told."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(content) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("could not write --ready-file %s: %s (serving anyway)", path, exc)
        tmp.unlink(missing_ok=True)


TOKEN_CHECK_S = 2.0  # how often the token file is checked for a change


async def _watch_token(token_file: TokenFile, stop: asyncio.Event) -> None:
    while True:
        try:
            await asyncio.wait_for(stop.wait(), TOKEN_CHECK_S)
            return
        except TimeoutError:
            pass
        await asyncio.get_running_loop().run_in_executor(None, token_file.check)


async def _poll(sync: RepositorySync, interval_s: float, stop: asyncio.Event) -> None:
    """Rescan the repository every ``interval_s`` until ``stop``; a failed scan is logged and
    retried at the next tick, never fatal."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        except TimeoutError:
            pass
        try:
            await sync.poll()
        except Exception:
            log.exception("repository poll failed; retrying in %.1f s", interval_s)
