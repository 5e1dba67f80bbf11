"""Everything `visionserve serve` runs with, as one frozen ``ServerConfig``.

Each setting is declared once, on its field (``settings.setting``): its default, its flag, its
help and its environment variable; the CLI generates `serve`'s arguments from these fields.
The cross-flag rules run when a ``ServerConfig`` is built (``__post_init__``), so a config
built by a test or an embedding program is checked as the command line's is; a broken rule is
a ``UsageError`` that names the flags.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..format.object_store import StoreUri, parse_uri
from ..format.repository import ScanRules
from ..limits import ServerLimits
from ..modes import AccessLogMode, GoldenMode, ModelControlMode
from ..settings import setting

if TYPE_CHECKING:  # tls imports grpc; the configuration does not
    from .tls import TlsConfig


class UsageError(ValueError):
    """A serve setting, or a combination of them, that cannot work (the CLI exits 2)."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `visionserve serve` runs with; the flags are generated from these fields."""

    repo: Path = setting(
        Path("model_repo"), help="model repository: a folder, or s3://BUCKET/PREFIX, gs://…, "
        "az://… (copied into --cache-dir, every version verified by its manifest; credentials "
        "and endpoint from the cloud's environment, e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID: "
        "docs/deploy.md)")
    cache_dir: Path | None = setting(
        None, metavar="DIR",
        help="with an object-store --repo: where its copy lives (created if missing; default "
             "$XDG_CACHE_HOME/visionserve/repositories). A restart serves it while the store "
             "cannot be reached, and fetches only versions whose manifest changed")
    cache_max_gb: float = setting(
        20.0, help="with an object-store --repo: the cache's bound; over it, the versions no "
                   "version policy selects now are removed, least recently selected first")
    host: str = setting("0.0.0.0", help="address to bind (gRPC, HTTP, and metrics unless "
                                        "--metrics-host)")
    metrics_host: str = setting("", help="address of the /metrics HTTP server (empty: --host), "
                                         "e.g. 127.0.0.1 or a cluster-internal address")
    grpc_port: int = setting(8001, help="0 = pick a free port, logged. Bound exclusively: a "
                                        "port in use is a start-up error (exit 2)")
    reuse_port: bool = setting(False, help="set SO_REUSEPORT on the gRPC port, so that several "
                               "servers share it and the kernel spreads connections over them "
                               "(on purpose only: a stale server would silently take a share "
                               "of the traffic)")
    http_port: int | None = setting(
        8000, help="HTTP port of the KServe v2 REST API (tritonclient.http, curl: docs/rest.md) "
                   "and the image endpoints (POST /v2/models/<m>/classify with the file as the "
                   "body); 0 = pick a free port, logged. Same TLS, token, limits and batchers "
                   "as gRPC", off="--no-http", off_help="serve no HTTP API (gRPC only; "
                                                        "/metrics stays)")
    metrics_port: int = setting(8002, help="HTTP port of /metrics; 0 = pick a free port, logged")
    limits: ServerLimits = setting(factory=ServerLimits, help="the request limits")
    preprocess_threads: int = setting(0, help="decode threads; 0 = one per core")
    model_control: ModelControlMode = setting(
        ModelControlMode.POLL,
        help="poll: rescan the repository every --poll-interval-s and serve new, changed and "
             "removed models/versions without a restart; explicit: load only --load-model "
             "models at start, then only the KServe RepositoryModelLoad/Unload RPCs change what "
             "is served (as in Triton); none: load every model once at start")
    poll_interval_s: float = setting(5.0, help="seconds between repository scans in poll mode")
    allow_symlinks_outside_repo: bool = setting(
        False, help="follow symbolic links in the repository that lead outside it (refused by "
                    "default, failing that model or version: docs/security.md); for volume "
                    "layouts that link models in from elsewhere")
    require_manifest: bool = setting(
        False, help="load only versions that carry a manifest.json (written by export: every "
                    "file's size and sha256); by default a version without one (copied by hand, "
                    "KServe's /mnt/models) loads unverified, logged. A version with a manifest "
                    "is always verified: a missing, extra, short or altered file refuses it")
    golden_check: GoldenMode = setting(
        GoldenMode.ENFORCE,
        help="before a version serves, run its golden set (exported with it: real photos and "
             "seeded tensors with PyTorch's outputs, the labels and preprocessing it was made "
             "with) through the server's own path. enforce: a version that is off beyond its "
             "tolerance does not serve (state failed, the reason says how far off; the previous "
             "version keeps serving); warn: it serves anyway, logged as an error; off: no check "
             "(docs/lifecycle.md)")
    openvino_cache_dir: Path | None = setting(
        None, metavar="DIR",
        help="models with backend = \"openvino\": keep their compiled form in DIR (created if "
             "missing; it must be writable: the repository may be read-only) and import it on "
             "reloads and restarts instead of compiling again (docs/config.md). Default: "
             "compile at every load")
    trust_network: bool = setting(
        False, help="with --model-control explicit and no token: accept that anyone who can "
                    "reach the port may load and unload every model (refused at start "
                    "otherwise)")
    load_interval_s: float = setting(
        5.0, help="with --model-control explicit: per model, after a burst of 4, at most one "
                  "RepositoryModelLoad/Unload per this many seconds (each reloads and warms up "
                  "the model); more are RESOURCE_EXHAUSTED. 0 = no limit")
    load_models: tuple[str, ...] = setting(
        (), name="--load-model", metavar="NAME", repeat=True,
        help="with --model-control explicit: a model to load at start (repeatable)")
    shutdown_grace_s: float = setting(
        30.0, help="how long in-flight requests may take to finish on SIGTERM/SIGINT (a second "
                   "signal exits at once)")
    shutdown_delay_s: float = setting(
        0.0, help="on SIGTERM, report not-ready but keep serving this long before new calls "
                  "are refused (lets Kubernetes/a mesh stop routing here first)")
    tls_cert: Path | None = setting(None, help="PEM certificate chain: serve gRPC over TLS")
    tls_key: Path | None = setting(None, help="PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(
        None, help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    auth_token_file: Path | None = setting(
        None, help="require 'authorization: Bearer <token>' metadata, the token being this "
                   "file's first line (or set VISIONSERVE_AUTH_TOKEN to the token itself); "
                   "health is always open, repository load/unload always protected. Reloaded "
                   "on SIGHUP or when the file changes")
    auth_open: tuple[str, ...] = setting(
        (), metavar="CLASSES", comma=True,
        help="with a token: comma-separated classes left open, from inference, metadata, "
             "statistics (e.g. behind a mesh that authenticates callers)")
    orca_load_reports: bool = setting(
        False, help="attach an ORCA load report (engine utilization and call rate) to every "
                    "unary gRPC reply, as trailing metadata endpoint-load-metrics-bin, for "
                    "clients that balance on load: gRPC's weighted_round_robin policy, Envoy's "
                    "client_side_weighted_round_robin (docs/deploy.md)")
    access_log: AccessLogMode = setting(
        AccessLogMode.ERRORS,
        help="one log line per request (request id, method, model, version, code, duration): "
             "for every request, only for failed ones, or none")
    ready_file: Path | None = setting(
        None, metavar="PATH",
        help="once SERVING, write {\"grpc_port\", \"http_port\", \"metrics_port\", \"pid\", "
             "\"models_ready\", \"models_failed\"} as JSON to PATH (atomically; removed when "
             "shutdown starts): how scripts learn the ports of --grpc-port 0 and when the "
             "server is ready")
    # not a flag: the token itself, read from --auth-token-file or $VISIONSERVE_AUTH_TOKEN
    # (``cli/serve_flags.py``); None = no auth
    auth_token: str | None = None

    def __post_init__(self) -> None:
        """The cross-flag rules, each a ``UsageError`` naming the flags."""
        for name, enum in (("model_control", ModelControlMode), ("golden_check", GoldenMode),
                           ("access_log", AccessLogMode)):
            try:
                object.__setattr__(self, name, enum(getattr(self, name)))
            except ValueError:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose "
                                 f"one of {', '.join(m.value for m in enum)}") from None
        for flag in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, flag)
            if port is not None and not 0 <= port <= 65535:
                raise UsageError(f"--{flag.replace('_', '-')} {port}: a TCP port is 0-65535 (0 "
                                 "= pick a free one)")
        try:
            store = parse_uri(self.repo)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if store is not None:
            _check_writable(self.store_cache_dir, "--cache-dir")
        if self.cache_max_gb <= 0:
            raise UsageError(f"--cache-max-gb {self.cache_max_gb}: give a size in GB above 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError("--tls-cert and --tls-key go together; give both (or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.auth_open and not self.auth_token:
            raise UsageError("--auth-open needs a token (--auth-token-file or "
                             "VISIONSERVE_AUTH_TOKEN)")
        if self.model_control == ModelControlMode.EXPLICIT and not self.auth_token \
                and not self.trust_network:
            raise UsageError(
                "--model-control explicit without a token lets any client that reaches the "
                "port unload every model; set a token (--auth-token-file or "
                "VISIONSERVE_AUTH_TOKEN: load/unload then need it), or pass --trust-network "
                "if only trusted clients can reach the port")
        if self.ready_file and not os.access(self.ready_file.parent, os.W_OK):
            raise UsageError(f"--ready-file {self.ready_file}: its folder does not exist or is "
                             "not writable; point it into a writable volume")
        if self.auth_token:
            from ..api.auth import TokenCheck

            try:  # the classes named exist: fail at start rather than at the first call
                TokenCheck(self.auth_token, self.auth_open)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if self.tls is not None:
            try:
                self.tls.validate()
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if self.openvino_cache_dir is not None:
            _check_writable(self.openvino_cache_dir, "--openvino-cache-dir")

    @property
    def store_uri(self) -> StoreUri | None:
        """The object store --repo names, or None for a local folder."""
        return parse_uri(self.repo)

    @property
    def store_cache_dir(self) -> Path:
        """--cache-dir, or its default."""
        if self.cache_dir is not None:
            return self.cache_dir
        home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return Path(home) / "visionserve" / "repositories"

    @property
    def scan_rules(self) -> ScanRules:
        """What a repository scan admits: links out of it, versions without a manifest."""
        return ScanRules(allow_outside=self.allow_symlinks_outside_repo,
                         require_manifest=self.require_manifest)

    @property
    def tls(self) -> TlsConfig | None:
        """The TLS material (None: plaintext)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        from .tls import TlsConfig

        return TlsConfig(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca)


def _check_writable(cache_dir: Path, flag: str) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".probe-").close()
    except OSError as exc:
        raise UsageError(
            f"{flag} {cache_dir} is not a writable directory ({exc.strerror or exc}); give "
            "one this user may write") from None
