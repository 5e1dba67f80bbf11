"""The one method table: every call the server answers, on every front end, with its access
class (what a bearer token protects), whether it is inference (what admission counts against
``--max-inflight-requests``), its gRPC service and its REST routes.

The token check (``auth``), admission (``admission``) and the HTTP router (``http/rest``) all
read this table; none keeps a list of its own. A method's name is what the metrics and the
access log show (``http.`` in front for the HTTP port).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Access(enum.StrEnum):
    """Access classes (docs/security.md): health is always open, repository always protected
    when a token is set; the others need it unless ``--auth-open`` names them."""

    HEALTH = "health"
    METADATA = "metadata"
    STATISTICS = "statistics"
    INFERENCE = "inference"
    REPOSITORY = "repository"


OPENABLE = (Access.INFERENCE.value, Access.METADATA.value, Access.STATISTICS.value)
KSERVE = "inference.GRPCInferenceService"
VISION = "visionserve.v1.VisionService"
HEALTH = "grpc.health.v1.Health"

_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"


@dataclass(frozen=True)
class Method:
    name: str
    access: Access
    service: str = ""  # the gRPC service ("": HTTP only)
    routes: tuple[tuple[str, str], ...] = ()  # (HTTP method, path) on the HTTP port

    @property
    def inference(self) -> bool:
        return self.access is Access.INFERENCE


def _per_model(verbs: tuple[str, ...], suffix: str) -> tuple[tuple[str, str], ...]:
    return tuple((verb, base + suffix) for base in (_MODEL, _VERSION) for verb in verbs)


# In the order the HTTP routes are registered: /v2/models/stats before /v2/models/{model}.
METHODS = (
    Method("ServerMetadata", Access.METADATA, KSERVE, (("GET", "/v2"),)),
    Method("ServerLive", Access.HEALTH, KSERVE, (("GET", "/v2/health/live"),)),
    Method("ServerReady", Access.HEALTH, KSERVE, (("GET", "/v2/health/ready"),)),
    Method("OpenAPI", Access.METADATA, "", (("GET", "/v2/openapi.json"),)),
    Method("ModelStatistics", Access.STATISTICS, KSERVE,
           (("GET", "/v2/models/stats"), *_per_model(("GET",), "/stats"))),
    Method("RepositoryIndex", Access.REPOSITORY, KSERVE, (("POST", "/v2/repository/index"),)),
    Method("RepositoryModelLoad", Access.REPOSITORY, KSERVE,
           (("POST", "/v2/repository/models/{model}/load"),)),
    Method("RepositoryModelUnload", Access.REPOSITORY, KSERVE,
           (("POST", "/v2/repository/models/{model}/unload"),)),
    Method("ModelMetadata", Access.METADATA, KSERVE, _per_model(("GET",), "")),
    Method("ModelReady", Access.HEALTH, KSERVE, _per_model(("GET",), "/ready")),
    Method("ModelConfig", Access.METADATA, KSERVE, _per_model(("GET",), "/config")),
    Method("ModelInfer", Access.INFERENCE, KSERVE, _per_model(("POST",), "/infer")),
    # PUT: what `curl -T photo.jpg` sends
    Method("Classify", Access.INFERENCE, VISION, _per_model(("POST", "PUT"), "/classify")),
    Method("Embed", Access.INFERENCE, VISION, _per_model(("POST", "PUT"), "/embed")),
    Method("ModelStreamInfer", Access.INFERENCE, KSERVE),
    Method("ClassifyStream", Access.INFERENCE, VISION),
    Method("ListModels", Access.METADATA, VISION),
    Method("GetModel", Access.METADATA, VISION),
    Method("Check", Access.HEALTH, HEALTH),
    Method("Watch", Access.HEALTH, HEALTH),
)

_BY_GRPC_NAME = {f"/{m.service}/{m.name}": m for m in METHODS if m.service}
INFERENCE_METHODS = frozenset({name for m in METHODS if m.inference
                               for name in (m.name, f"http.{m.name}")})


def access_class(full_method: str) -> Access:
    """The access class of a gRPC method such as ``/visionserve.v1.VisionService/Embed``; a
    method the table does not hold (reflection, a future RPC) counts as metadata."""
    method = _BY_GRPC_NAME.get(full_method)
    if method is None and full_method.startswith(f"/{HEALTH}/"):
        return Access.HEALTH
    return method.access if method is not None else Access.METADATA
