"""Everything `visionserve serve` runs with, as one frozen ``ServerConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..limits import ServerLimits
from ..modes import GoldenMode

if TYPE_CHECKING:  # tls imports grpc; the configuration does not
    from .tls import TlsConfig


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `visionserve serve` runs with; the CLI's flags take their defaults from here."""

    repo: Path = Path("model_repo")
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    # the KServe v2 REST API and image endpoints (api/rest.py), as Triton's 8000; None = off
    http_port: int | None = 8000
    metrics_port: int = 8002
    limits: ServerLimits = field(default_factory=ServerLimits)
    preprocess_threads: int = 0  # 0 = one per core
    # poll: rescan the repository every poll_interval_s (the default: a published version is
    # served without a restart) | explicit: only the load/unload RPCs change what is served
    # | none: load once at start
    model_control: str = "poll"
    poll_interval_s: float = 5.0
    load_models: tuple[str, ...] = ()  # explicit mode: models to load at start
    load_interval_s: float = 5.0  # explicit mode: per model, one load/unload per this (burst 4)
    # follow symbolic links that leave the repository (refused by default: a labels.txt or a
    # model folder linked to /etc would be read and served)
    allow_symlinks_outside_repo: bool = False
    # every version loaded first computes its golden set (service/models/golden.py): enforce (a miss
    # keeps it out of routing) | warn (it serves anyway, loudly) | off
    golden_check: GoldenMode = GoldenMode.ENFORCE
    # OpenVINO's compiled models are kept here and imported on reload/restart (None: compiled
    # at every load); a writable directory of its own: the repository may be read-only
    openvino_cache_dir: Path | None = None
    shutdown_grace_s: float = 30.0
    # readiness off, still serving, for this long before new calls are refused: time for a
    # load balancer (Kubernetes endpoints, a mesh) to stop sending new work here
    shutdown_delay_s: float = 0.0
    metrics_host: str = ""  # "" = the same address as gRPC
    reuse_port: bool = False  # SO_REUSEPORT on the gRPC port: several servers share it
    tls: TlsConfig | None = None
    auth_token: str | None = None  # bearer token; None = no auth
    # where it came from, when a file: reloaded on SIGHUP or when the file changes
    auth_token_file: Path | None = None
    auth_open: tuple[str, ...] = ()  # access classes open without the token (auth.OPENABLE)
    access_log: str = "errors"  # all | errors | off (--access-log)
    # written once SERVING (ports, pid, models), removed when shutdown starts (--ready-file)
    ready_file: Path | None = None
