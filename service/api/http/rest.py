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
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from ... import package_version
from ...core.inference import InferenceCore
from ...core.messages import DEFAULT_TOP_K, ClassifyCall, EmbedCall
from ...errors import ErrorCode, InvalidInput, LimitExceeded, client_error
from ...format import triton_config
from ...lifecycle import Lifecycle
from ...limits import ServerLimits
from ...logs import REQUEST_ID, printable, request_id
from ...models.control import ModelControl
from ..auth import TokenCheck
from ..calls import CallHandler
from ..kserve_protocol import EXTENSIONS, parse_version
from ..methods import METHODS
from .body import BODY, HEADER_LENGTH, IMAGES, BodyReader, HttpError, json_only
from .json_body import parse_json
from .messages import (
    JSON,
    REQUEST_ID_HEADER,
    client_id,
    deadline,
    digits,
    error_reply,
    json_reply,
    names,
    query_bool,
    query_int,
)
from .openapi import openapi_document
from .rest_wire import (
    RestInfer,
    classify_response,
    embed_response,
    index_json,
    infer_request,
    infer_response,
    metadata_json,
    statistics_json,
)

log = logging.getLogger(__name__)

HTTP_STATUS = {ErrorCode.CANCELLED: 499,  # nginx's "client closed request": never seen by it
               ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.NOT_FOUND: 404,
               ErrorCode.RESOURCE_EXHAUSTED: 429, ErrorCode.DEADLINE_EXCEEDED: 504,
               ErrorCode.UNAVAILABLE: 503, ErrorCode.FAILED_PRECONDITION: 409,
               ErrorCode.INTERNAL: 500}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_RPC = web.RequestKey("rpc", str)  # the method's name in metrics and the access log


class RestApi:
    """Builds the aiohttp application: routes, the auth/error middleware, body reading."""

    def __init__(self, core: InferenceCore, control: ModelControl, calls: CallHandler,
                 lifecycle: Lifecycle, auth: TokenCheck | None,
                 refused: Callable[[str, str, str], None]) -> None:
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
        request[_RPC] = method
        sent_id = client_id(request)
        try:
            if self._auth is not None and not self._auth.is_open(access):
                presented = request.headers.get("Authorization")
                if presented is None or not self._auth.valid(presented):
                    self._refused(method, "UNAUTHENTICATED", "unauthenticated")
                    reason = "no Authorization header" if presented is None \
                        else "the token is not valid"
                    return error_reply(401, f"{method.removeprefix('http.')} needs a bearer token "
                                       f"({access} calls are protected on this server): "
                                       f"{reason}; send 'Authorization: Bearer <token>'",
                                  sent_id, {"WWW-Authenticate": "Bearer"})
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, method, body size
            if exc.status == 413:
                return error_reply(413, self._bodies.too_large(None, False), sent_id)
            message = {404: f"no route {printable(request.path)!r}; the API is KServe v2 "
                            "(/v2/...), see docs/rest.md",
                       405: f"{request.method} is not allowed on {printable(request.path)!r}"
                       }.get(exc.status, exc.reason)
            return error_reply(exc.status, message, sent_id,
                          {k: v for k, v in exc.headers.items() if k == "Allow"})
        except HttpError as exc:
            return error_reply(exc.status, str(exc), sent_id)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status and a message
            code, message = client_error(exc)
            status = 413 if isinstance(exc, LimitExceeded) else HTTP_STATUS[code]
            return error_reply(status, message, REQUEST_ID.get() or sent_id)
        response.headers[REQUEST_ID_HEADER] = REQUEST_ID.get() or sent_id
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
        json = self._json_body(request)
        if request.content_length is not None and \
                request.content_length > self._bodies.limit(json):
            return error_reply(413, self._bodies.too_large(request.content_length, json),
                               request.headers.get(REQUEST_ID_HEADER, ""))
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    def _json_body(self, request: web.Request) -> bool:
        """Whether the request's body is JSON alone (held to --max-json-bytes)."""
        return json_only(self._method_of(request)[1], request.headers)

    async def _run(self, request: web.Request, model: str,
                   work: Callable[[], Awaitable[tuple[Any, int]]], given_id: str = "",
                   upload: Callable[[], Awaitable[None]] | None = None) -> Any:
        return await self._calls.run(request[_RPC], model, work,
                                     given_id or request.headers.get(REQUEST_ID_HEADER, ""),
                                     upload)

    def _body(self, request: web.Request) -> Callable[[], Awaitable[None]]:
        return self._bodies.upload(request, self._json_body(request))

    def _images(self, request: web.Request, model: str) -> Callable[[], Awaitable[None]]:
        return self._bodies.upload_images(request, model)

    # --- health and metadata ---------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, bool], int]:
            return {"live": True}, 0

        return json_reply(await self._run(request, "", work))

    async def _ready(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, bool], int]:
            return {"ready": self._lifecycle.ready}, 0

        body = await self._run(request, "", work)
        return json_reply(body, 200 if body["ready"] else 503)

    async def _model_ready(self, request: web.Request) -> web.Response:
        model, version = names(request)

        async def work() -> tuple[dict[str, Any], int]:
            served = self._control.resolve(model, parse_version(model, version))
            return {"name": model, "ready": True}, served.version

        return json_reply(await self._run(request, model, work))

    async def _openapi(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, Any], int]:
            return openapi_document(), 0

        return json_reply(await self._run(request, "", work))

    async def _server_metadata(self, request: web.Request) -> web.Response:
        async def work() -> tuple[dict[str, Any], int]:
            return {"name": "visionserve", "version": package_version(),
                    "extensions": [*EXTENSIONS, "binary_tensor_data"]}, 0

        return json_reply(await self._run(request, "", work))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        model, version = names(request)

        async def work() -> tuple[dict[str, Any], int]:
            view, answered = self._control.metadata(model, parse_version(model, version))
            return metadata_json(view), answered

        return json_reply(await self._run(request, model, work))

    async def _model_config(self, request: web.Request) -> web.Response:
        model, version = names(request)

        async def work() -> tuple[dict[str, Any], int]:
            view = self._control.served_config(model, parse_version(model, version))
            return triton_config.model_config_json(view.name, view.config, view.num_classes,
                                                   view.embedding_dim, view.weights), view.version

        return json_reply(await self._run(request, model, work))

    async def _stats(self, request: web.Request) -> web.Response:
        model, version = names(request)

        async def work() -> tuple[dict[str, Any], int]:
            views = self._control.statistics(model, parse_version(model, version))
            return {"model_stats": [statistics_json(v) for v in views]}, 0

        return json_reply(await self._run(request, model, work))

    # --- repository --------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        async def work() -> tuple[list[dict[str, Any]], int]:
            body = request[BODY]
            options = parse_json(body, "RepositoryIndex") if body.strip() else {}
            ready = options.get("ready", False) if isinstance(options, dict) else None
            if not isinstance(ready, bool):
                raise InvalidInput("RepositoryIndex: the body must be {} or "
                                   "{\"ready\": true|false}")
            return [index_json(e) for e in await self._control.index(ready)], 0

        return json_reply(await self._run(request, "", work, upload=self._body(request)))

    async def _load(self, request: web.Request) -> web.Response:
        return await self._control_call(request, load=True)

    async def _unload(self, request: web.Request) -> web.Response:
        return await self._control_call(request, load=False)

    async def _control_call(self, request: web.Request, load: bool) -> web.Response:
        model = request.match_info["model"]
        rpc = "RepositoryModelLoad" if load else "RepositoryModelUnload"

        async def work() -> tuple[dict[str, Any], int]:
            body = request[BODY]
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

        return json_reply(await self._run(request, model, work, upload=self._body(request)))

    # --- inference ---------------------------------------------------------------------------
    # The body is read first (``upload``), inside the call's accounting but before it counts in
    # flight or holds an inference slot: a refusal of it is counted and logged like any failed
    # call, and a slow upload holds only its own connection.

    async def _infer(self, request: web.Request) -> web.Response:
        model, version = names(request)
        where = f"model {printable(model)}" + (f" version {printable(version)}"
                                               if version else "")
        sent: list[tuple[bytes, dict[str, str]]] = []

        async def work() -> tuple[Any, int]:
            body = request[BODY]
            length = request.headers.get(HEADER_LENGTH)
            if length is not None and (not digits(length) or int(length) > len(body)):
                raise InvalidInput(f"{where}: {HEADER_LENGTH} {printable(length)!r} is not a "
                                   f"length within the body ({len(body)} bytes)")
            if length is not None and int(length) > self._bodies.limit(json=True):
                raise LimitExceeded(f"{where}: the JSON header of {length} bytes is over the "
                                    f"limit of {self._bodies.limit(json=True)} bytes "
                                    "(--max-json-bytes); send the tensors as binary data")
            split = len(body) if length is None else int(length)
            args = (memoryview(body), split, where, model, version,
                    self._limits.max_images_per_request)
            # a large JSON body is up to seconds of parsing and numpy conversion: off the loop
            parsed = await asyncio.to_thread(_parse_infer, *args) if len(body) > 1 << 20 \
                else _parse_infer(*args)
            if parsed.call.request_id and REQUEST_ID_HEADER not in request.headers:
                REQUEST_ID.set(request_id(parsed.call.request_id))
            result = await self._core.model_infer(parsed.call,
                                                  deadline(request, parsed.timeout_us))
            reply, buffers = infer_response(result, parsed.binary_outputs)
            text = json.dumps(reply, separators=(",", ":")).encode()
            sent.append((b"".join([text, *buffers]),
                         {HEADER_LENGTH: str(len(text))} if buffers else {}))
            return None, result.version

        await self._run(request, model, work, upload=self._body(request))
        body, headers = sent[0]
        return web.Response(body=body, headers=headers,
                            content_type="application/octet-stream" if headers else JSON)

    async def _classify(self, request: web.Request) -> web.Response:
        model, version = names(request)

        async def work() -> tuple[Any, int]:
            top_k = query_int(request, "top_k", model)
            call = ClassifyCall(model=model, version=parse_version(model, version),
                                images=request[IMAGES],
                                top_k=top_k or DEFAULT_TOP_K, request_id=client_id(request))
            result = await self._core.classify(call, deadline(request))
            return classify_response(result), result.version

        return json_reply(await self._run(request, model, work,
                                          upload=self._images(request, model)))

    async def _embed(self, request: web.Request) -> web.Response:
        """Embeddings as JSON arrays, or (``?binary_data=true``) as the binary tensor data
        extension does: the JSON reply without them, then [N, D] little-endian float32."""
        model, version = names(request)
        sent: list[web.Response] = []

        async def work() -> tuple[Any, int]:
            normalize, binary = (query_bool(request, key, model)
                                 for key in ("normalize", "binary_data"))
            call = EmbedCall(model=model, version=parse_version(model, version),
                             images=request[IMAGES], normalize=normalize,
                             request_id=client_id(request))
            result = await self._core.embed(call, deadline(request))
            if not binary:
                sent.append(json_reply(embed_response(result)))
                return None, result.version
            data = np.ascontiguousarray(result.embeddings, "<f4").tobytes()
            reply = {**embed_response(result, values=False),
                     "parameters": {"binary_data_size": len(data)}}
            text = json.dumps(reply, separators=(",", ":")).encode()
            sent.append(web.Response(body=text + data, content_type="application/octet-stream",
                                     headers={HEADER_LENGTH: str(len(text))}))
            return None, result.version

        await self._run(request, model, work, upload=self._images(request, model))
        return sent[0]


def _parse_infer(body: memoryview, split: int, where: str, model: str, version: str,
                 max_images: int) -> RestInfer:
    header = parse_json(body[:split], where, "the JSON header")
    return infer_request(header, body[split:], model, version, max_images)
