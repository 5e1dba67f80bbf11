"""The HTTP/REST front end: the KServe v2 / Open Inference Protocol REST API (as Triton's
``tritonclient.http`` speaks it, binary tensor data included) and plain image endpoints
(``POST /v2/models/{m}/classify`` with the file as the body). A third thin servicer over the same
core: same admission, batchers, call accounting, access log, limits and error messages as gRPC.

Statuses: the neutral error codes map as the standard HTTP mapping of gRPC codes does
(grpc-gateway's) with two refinements: a size limit is 413 (answered from the declared
``Content-Length``, before the body is read, and to ``Expect: 100-continue`` before it is sent),
and FAILED_PRECONDITION (a version that failed to load, a control request the server's mode
refuses) is 409, not 400: the request is right, the server's state refuses it. Every error is a
JSON ``{"error": "…"}`` with the gRPC message. docs/rest.md is the reference.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf.message import Message

from ... import package_version
from ...core.inference import InferenceCore
from ...core.messages import DEFAULT_TOP_K, ClassifyCall, EmbedCall
from ...errors import ErrorCode, InvalidInput, LimitExceeded, client_error
from ...lifecycle import Lifecycle
from ...limits import ServerLimits
from ...logs import REQUEST_ID, printable, request_id
from ...models.control import ModelControl
from ..auth import BearerTokenInterceptor
from ..calls import CallHandler
from ..grpc.kserve import EXTENSIONS, model_config, model_metadata, repository_index, statistics
from ..grpc.kserve_wire import parse_version
from ..methods import METHODS
from .body import BodyReader, HttpError
from .openapi import openapi_document
from .rest_wire import (
    RestInfer,
    classify_response,
    embed_response,
    infer_request,
    infer_response,
    parse_json,
)

log = logging.getLogger(__name__)

HTTP_STATUS = {ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.NOT_FOUND: 404,
               ErrorCode.RESOURCE_EXHAUSTED: 429, ErrorCode.DEADLINE_EXCEEDED: 504,
               ErrorCode.UNAVAILABLE: 503, ErrorCode.FAILED_PRECONDITION: 409,
               ErrorCode.INTERNAL: 500}
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
TIMEOUT_HEADER = "X-Timeout-Ms"  # the request's deadline, milliseconds from its arrival
REQUEST_ID_HEADER = "X-Request-ID"
MAX_CONNECTIONS = 1024  # open at once on the HTTP port
BODY_TIMEOUT_S = 60.0  # a request body must have arrived by then (a slow upload holds a slot)
# file signatures of the formats the server decodes (a raw image body is recognised by them:
# ``curl --data-binary`` labels it application/x-www-form-urlencoded)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_COMPRESSED = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestApi:
    """Builds the aiohttp application: routes, the auth/error middleware, body reading."""

    def __init__(self, core: InferenceCore, control: ModelControl, calls: CallHandler,
                 lifecycle: Lifecycle, auth: BearerTokenInterceptor | None,
                 refused: Callable[[str, grpc.StatusCode, str], None]) -> None:
        self._core = core
        self._control = control
        self._calls = calls
        self._lifecycle = lifecycle
        self._auth = auth
        self._refused = refused
        self._limits: ServerLimits = core.limits
        self._bodies = BodyReader(core.limits)
        # (method, canonical path) -> (access class, method name in metrics and the access log)
        self._routes: dict[tuple[str, str], tuple[str, str]] = {}

    def app(self) -> web.Application:
        # the body limit is applied by _body (declared length first, then the bytes read and
        # decompressed); aiohttp's own bound is the same number, as a backstop
        app = web.Application(middlewares=[self._errors],
                              client_max_size=self._limits.max_message_bytes)
        handlers: dict[str, Handler] = {
            "ServerMetadata": self._server_metadata, "ServerLive": self._live,
            "ServerReady": self._ready, "OpenAPI": self._openapi,
            "ModelStatistics": self._stats, "RepositoryIndex": self._index,
            "RepositoryModelLoad": self._load, "RepositoryModelUnload": self._unload,
            "ModelMetadata": self._model_metadata, "ModelReady": self._model_ready,
            "ModelConfig": self._model_config, "ModelInfer": self._infer,
            "Classify": self._classify, "Embed": self._embed}
        for method in METHODS:  # the method table: routes, access classes
            for verb, path in method.routes:
                app.router.add_route(verb, path, handlers[method.name],
                                     expect_handler=self._expect)
                self._routes[(verb, path)] = (method.access, f"http.{method.name}")
        return app

    # --- middleware: route → access class and method name; auth; errors as JSON ---------------

    def _method_of(self, request: web.Request) -> tuple[str, str]:
        info = request.match_info.route.resource
        path = info.canonical if info is not None else ""
        return self._routes.get((request.method, path), ("metadata", "http.unknown"))

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        access, method = self._method_of(request)
        request["rpc"] = method
        client_id = _client_id(request)
        try:
            if self._auth is not None and not self._auth.is_open(access):
                presented = request.headers.get("Authorization")
                if presented is None or not self._auth.valid(presented):
                    self._refused(method, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
                    reason = "no Authorization header" if presented is None \
                        else "the token is not valid"
                    return _error(401, f"{method.removeprefix('http.')} needs a bearer token "
                                       f"({access} calls are protected on this server): "
                                       f"{reason}; send 'Authorization: Bearer <token>'",
                                  client_id, {"WWW-Authenticate": "Bearer"})
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, method, body size
            if exc.status == 413:
                return _error(413, f"the request body is over the limit of "
                                   f"{self._limits.max_message_bytes} bytes "
                                   "(--max-message-bytes); split the request", client_id)
            message = {404: f"no route {printable(request.path)!r}; the API is KServe v2 "
                            "(/v2/...), see docs/rest.md",
                       405: f"{request.method} is not allowed on {printable(request.path)!r}"
                       }.get(exc.status, exc.reason)
            return _error(exc.status, message, client_id,
                          {k: v for k, v in exc.headers.items() if k == "Allow"})
        except HttpError as exc:
            return _error(exc.status, str(exc), client_id)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status and a message
            code, message = client_error(exc)
            status = 413 if isinstance(exc, LimitExceeded) else HTTP_STATUS[code]
            return _error(status, message, REQUEST_ID.get() or client_id)
        response.headers[REQUEST_ID_HEADER] = REQUEST_ID.get() or client_id
        accept = request.headers.get("Accept-Encoding", "").lower()
        if isinstance(response, web.Response) and len(response.body or b"") > 1024 \
                and ("gzip" in accept or "deflate" in accept):
            response.enable_compression()
        return response

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: a body declared over the limit is refused before it is
        sent; otherwise the client is told to go on."""
        access, _ = self._method_of(request)
        if self._auth is not None and not self._auth.is_open(access) and \
                not self._auth.valid(request.headers.get("Authorization", "")):
            return None  # no 100 Continue: the middleware answers 401 without the body
        if request.content_length is not None and \
                request.content_length > self._limits.max_message_bytes:
            return _error(413, self._bodies.too_large(request.content_length),
                          request.headers.get(REQUEST_ID_HEADER, ""))
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    async def _run(self, request: web.Request, model: str,
                   work: Callable[[], Awaitable[tuple[Any, int]]],
                   client_id: str = "") -> Any:
        return await self._calls.run(request["rpc"], model, work,
                                     client_id or request.headers.get(REQUEST_ID_HEADER, ""))

    # --- health and metadata ---------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, bool], int]:
            return {"live": True}, 0

        return _json(await self._run(request, "", work))

    async def _ready(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, bool], int]:
            return {"ready": self._lifecycle.ready}, 0

        body = await self._run(request, "", work)
        return _json(body, 200 if body["ready"] else 503)

    async def _model_ready(self, request: web.Request) -> web.Response:
        model, version = _names(request)

        async def work() -> tuple[dict[str, Any], int]:
            served = self._control.resolve(model, parse_version(model, version))
            return {"name": model, "ready": True}, served.version

        return _json(await self._run(request, model, work))

    async def _openapi(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, Any], int]:
            return openapi_document(), 0

        return _json(await self._run(request, "", work))

    async def _server_metadata(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, Any], int]:
            return {"name": "visionserve", "version": package_version(),
                    "extensions": [*EXTENSIONS, "binary_tensor_data"]}, 0

        return _json(await self._run(request, "", work))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        model, version = _names(request)

        async def work() -> tuple[dict[str, Any], int]:
            reply, answered = model_metadata(self._control, model, version)
            return proto_json(reply), answered

        return _json(await self._run(request, model, work))

    async def _model_config(self, request: web.Request) -> web.Response:
        model, version = _names(request)

        async def work() -> tuple[dict[str, Any], int]:
            served = self._control.resolve(model, parse_version(model, version))
            return proto_json(model_config(served)), served.version

        return _json(await self._run(request, model, work))

    async def _stats(self, request: web.Request) -> web.Response:
        model, version = _names(request)

        async def work() -> tuple[dict[str, Any], int]:
            served = self._control.statistics(model, parse_version(model, version))
            return {"model_stats": [proto_json(statistics(s)) for s in served]}, 0

        return _json(await self._run(request, model, work))

    # --- repository --------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        async def work() -> tuple[list[dict[str, Any]], int]:
            body = await self._bodies.read(request)
            options = parse_json(body, "RepositoryIndex") if body.strip() else {}
            ready = options.get("ready", False) if isinstance(options, dict) else None
            if not isinstance(ready, bool):
                raise InvalidInput("RepositoryIndex: the body must be {} or "
                                   "{\"ready\": true|false}")
            return [proto_json(m) for m in repository_index(self._control, ready).models], 0

        return _json(await self._run(request, "", work))

    async def _load(self, request: web.Request) -> web.Response:
        return await self._control_call(request, load=True)

    async def _unload(self, request: web.Request) -> web.Response:
        return await self._control_call(request, load=False)

    async def _control_call(self, request: web.Request, load: bool) -> web.Response:
        model = request.match_info["model"]
        rpc = "RepositoryModelLoad" if load else "RepositoryModelUnload"

        async def work() -> tuple[dict[str, Any], int]:
            body = await self._bodies.read(request)
            where = f"model {printable(model)}: {rpc}"
            options = parse_json(body, where) if body.strip() else {}
            if not isinstance(options, dict):
                raise InvalidInput(f"{where}: the body must be a JSON object (or empty)")
            parameters = options.get("parameters") or {}
            if not load and isinstance(parameters, dict):
                # tritonclient.http always sends it; no model here has dependents (ensembles)
                parameters = {k: v for k, v in parameters.items() if k != "unload_dependents"}
            if parameters:  # Triton's config / file: overrides; never ignored silently
                keys = ", ".join(sorted(parameters)) if isinstance(parameters, dict) else "?"
                raise InvalidInput(
                    f"{where}: parameters ({printable(keys)}) are not supported: the "
                    "repository is the only source of models; publish a new version "
                    "(`visionserve export`) and load without parameters")
            if load:
                await self._control.load(model, rpc, request.remote or "")
            else:
                await self._control.unload(model, rpc, request.remote or "")
            return {}, 0

        return _json(await self._run(request, model, work))

    # --- inference ---------------------------------------------------------------------------
    # The body is read inside the call's accounting: an upload counts against the in-flight
    # limit, and a refusal of it is counted and logged like any failed call.

    async def _infer(self, request: web.Request) -> web.Response:
        model, version = _names(request)
        where = f"model {printable(model)}" + (f" version {printable(version)}"
                                               if version else "")
        sent: list[tuple[bytes, dict[str, str]]] = []

        async def work() -> tuple[Any, int]:
            body = await self._bodies.read(request)
            length = request.headers.get(HEADER_LENGTH)
            if length is not None and (not _digits(length) or int(length) > len(body)):
                raise InvalidInput(f"{where}: {HEADER_LENGTH} {printable(length)!r} is not a "
                                   f"length within the body ({len(body)} bytes)")
            split = len(body) if length is None else int(length)
            args = (memoryview(body), split, where, model, version,
                    self._limits.max_images_per_request)
            # a large JSON body is up to seconds of parsing and numpy conversion: off the loop
            parsed = await asyncio.to_thread(_parse_infer, *args) if len(body) > 1 << 20 \
                else _parse_infer(*args)
            if parsed.call.request_id and REQUEST_ID_HEADER not in request.headers:
                REQUEST_ID.set(request_id(parsed.call.request_id))
            result = await self._core.model_infer(parsed.call,
                                                  self._deadline(request, parsed.timeout_us))
            reply, buffers = infer_response(result, parsed.binary_outputs)
            text = json.dumps(reply, separators=(",", ":")).encode()
            sent.append((b"".join([text, *buffers]),
                         {HEADER_LENGTH: str(len(text))} if buffers else {}))
            return None, result.version

        await self._run(request, model, work)
        body, headers = sent[0]
        return web.Response(body=body, headers=headers,
                            content_type="application/octet-stream" if headers else _JSON)

    async def _classify(self, request: web.Request) -> web.Response:
        model, version = _names(request)

        async def work() -> tuple[Any, int]:
            top_k = _query_int(request, "top_k", model)
            call = ClassifyCall(model=model, version=parse_version(model, version),
                                images=await self._bodies.images(request, model),
                                top_k=top_k or DEFAULT_TOP_K, request_id=_client_id(request))
            result = await self._core.classify(call, self._deadline(request))
            return classify_response(result), result.version

        return _json(await self._run(request, model, work))

    async def _embed(self, request: web.Request) -> web.Response:
        """Embeddings as JSON arrays, or (``?binary_data=true``) as the binary tensor data
        extension does: the JSON reply without them, then [N, D] little-endian float32."""
        model, version = _names(request)
        sent: list[web.Response] = []

        async def work() -> tuple[Any, int]:
            normalize, binary = (_query_bool(request, key, model)
                                 for key in ("normalize", "binary_data"))
            call = EmbedCall(model=model, version=parse_version(model, version),
                             images=await self._bodies.images(request, model), normalize=normalize,
                             request_id=_client_id(request))
            result = await self._core.embed(call, self._deadline(request))
            if not binary:
                sent.append(_json(embed_response(result)))
                return None, result.version
            data = np.ascontiguousarray(result.embeddings, "<f4").tobytes()
            reply = {**embed_response(result, values=False),
                     "parameters": {"binary_data_size": len(data)}}
            text = json.dumps(reply, separators=(",", ":")).encode()
            sent.append(web.Response(body=text + data, content_type="application/octet-stream",
                                     headers={HEADER_LENGTH: str(len(text))}))
            return None, result.version

        await self._run(request, model, work)
        return sent[0]

    def _deadline(self, request: web.Request, timeout_us: int = 0) -> float | None:
        """The request's deadline (``X-Timeout-Ms``, Triton's ``timeout`` parameter in
        microseconds; the earlier of the two) as a time.monotonic() instant."""
        limits = []
        text = request.headers.get(TIMEOUT_HEADER)
        if text is not None:
            try:
                ms = float(text)
            except ValueError:
                ms = -1.0
            if not ms > 0 or ms != ms or ms == float("inf"):
                raise InvalidInput(f"{TIMEOUT_HEADER} {printable(text)!r} is not a number of "
                                   "milliseconds > 0")
            limits.append(ms / 1000)
        if timeout_us:
            limits.append(timeout_us / 1e6)
        return time.monotonic() + min(limits) if limits else None


def _parse_infer(body: memoryview, split: int, where: str, model: str, version: str,
                 max_images: int) -> RestInfer:
    header = parse_json(body[:split], where, "the JSON header")
    return infer_request(header, body[split:], model, version, max_images)


def _client_id(request: web.Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER, "")[:256]


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")


def _digits(text: str) -> bool:
    """ASCII digits of an int64 (``"²".isdigit()`` is true too)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _query_bool(request: web.Request, key: str, model: str) -> bool:
    text = request.query.get(key, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise InvalidInput(f"model {printable(model)}: query parameter {key} must be true or "
                           f"false, got {printable(text)!r}")
    return text in ("true", "1")


def _query_int(request: web.Request, key: str, model: str) -> int:
    text = request.query.get(key, "0")
    if not _digits(text):
        raise InvalidInput(f"model {printable(model)}: query parameter {key} must be an "
                           f"integer >= 0, got {printable(text)!r}")
    return int(text)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":"), allow_nan=False).encode(),
                        status=status, content_type=_JSON)


def _error(status: int, message: str, request_id: str,
           headers: dict[str, str] | None = None) -> web.Response:
    response = _json({"error": message}, status)
    response.headers.update(headers or {})
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def proto_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST JSON writes it: field names as in the .proto, 64-bit
    integers as numbers (protobuf's own JSON writes them as strings), enums by name, scalars
    and lists even when empty or zero (``"fail": {"count": 0, "ns": 0}``); unset messages and
    oneof members left out."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            out[field.name] = {k: _scalar(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        elif (entry is not None or field.containing_oneof is not None) \
                and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return proto_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
