"""The OpenAPI 3.0 document of the HTTP API (``rest.py``), served at ``GET /v2/openapi.json``.
It follows the KServe v2 REST protocol and Triton's extensions (binary tensor data,
classification, statistics, repository), plus the image endpoints. tests/test_rest_fuzz.py
generates requests from it (schemathesis) and checks every answer against it: no 5xx, only
documented statuses and bodies."""

from __future__ import annotations

from typing import Any

from ... import package_version

_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string",
                                   "description": "what was wrong and what to do; the same "
                                                  "message as the gRPC status"}}}
_TENSOR_META = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}}}}
_PARAMETERS = {"type": "object", "additionalProperties": True}
_INPUT = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": ["FP32", "UINT8", "BYTES"]},
    "parameters": {"type": "object", "properties": {
        "binary_data_size": {"type": "integer", "minimum": 0}}},
    "data": {"description": "row-major values, flat or nested: numbers (FP32, UINT8) or "
                            "strings (BYTES)"}}}
_OUTPUT_REQUEST = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"},
    "parameters": {"type": "object", "properties": {
        "binary_data": {"type": "boolean"},
        "classification": {"type": "integer", "minimum": 0,
                           "description": "top-k as BYTES \"score:index:label\""}}}}}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "parameters": {"type": "object", "properties": {
        "binary_data_output": {"type": "boolean"},
        "timeout": {"type": "integer", "minimum": 0, "description": "microseconds"}}},
    "inputs": {"type": "array", "items": _INPUT},
    "outputs": {"type": "array", "items": _OUTPUT_REQUEST}}}
_INFER_RESPONSE = {"type": "object", "required": ["model_name", "model_version", "outputs"],
                   "properties": {
                       "model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string"},
                       "outputs": {"type": "array", "items": {
                           "type": "object", "required": ["name", "datatype", "shape"],
                           "properties": {**_TENSOR_META["properties"],  # type: ignore[dict-item]
                                          "parameters": _PARAMETERS,
                                          "data": {"type": "array"}}}}}}
_CLASSIFY_RESPONSE = {"type": "object", "required": ["model", "version", "results"],
                      "properties": {
                          "model": {"type": "string"}, "version": {"type": "integer"},
                          "request_id": {"type": "string"},
                          "non_finite": {"type": "boolean"},
                          "results": {"type": "array", "items": {
                              "type": "object", "properties": {"classes": {
                                  "type": "array", "items": {
                                      "type": "object", "properties": {
                                          "index": {"type": "integer"},
                                          "label": {"type": "string"},
                                          "score": {"type": "number", "nullable": True}}}}}}}}}
_EMBED_RESPONSE = {"type": "object", "required": ["model", "version", "shape"],
                   "properties": {
                       "model": {"type": "string"}, "version": {"type": "integer"},
                       "request_id": {"type": "string"}, "non_finite": {"type": "boolean"},
                       "shape": {"type": "array", "items": {"type": "integer"}},
                       "embeddings": {"type": "array", "items": {"type": "array"}}}}
_OBJECT = {"type": "object"}
_IMAGE_BODY = {"content": {
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {
        "type": "string", "format": "binary"}}}},
    "description": "one image file as the body (recognised by its signature, whatever the "
                   "Content-Type), or one multipart part per image"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(summary: str, ok: dict[str, Any], body: dict[str, Any] | None = None,
               params: tuple[str, ...] = (), query: tuple[dict[str, Any], ...] = (),
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                       for p in params] + list(query),
        "responses": {"200": ok, **(extra or {}),
                      "default": _json(_ERROR, "an error: 4xx for the client's mistakes "
                                               "(400, 401, 404, 405, 409, 413, 415, 429), 503 "
                                               "not ready or draining, 504 deadline")}}
    if body is not None:
        operation["requestBody"] = body
    return operation


def _model_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    timeout = {"name": "X-Timeout-Ms", "in": "header", "required": False,
               "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
               "description": "the request's deadline in milliseconds (504 when it passes)"}
    top_k = {"name": "top_k", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0}, "description": "0 = 5"}
    normalize = {"name": "normalize", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}}
    binary = {"name": "binary_data", "in": "query", "required": False,
              "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
              "description": "the embeddings as binary data after the JSON reply"}
    for base, params in (("/v2/models/{model}", ("model",)),
                         ("/v2/models/{model}/versions/{version}", ("model", "version"))):
        paths[base] = {"get": _operation("model metadata", _json(_OBJECT), params=params)}
        paths[f"{base}/ready"] = {"get": _operation("model readiness", _json(_OBJECT),
                                                    params=params)}
        paths[f"{base}/config"] = {"get": _operation("model configuration (Triton's "
                                                     "ModelConfig as JSON)", _json(_OBJECT),
                                                     params=params)}
        paths[f"{base}/stats"] = {"get": _operation("inference statistics", _json(_OBJECT),
                                                    params=params)}
        paths[f"{base}/infer"] = {"post": _operation(
            "inference (KServe v2; binary tensor data with Inference-Header-Content-Length)",
            {"description": "the outputs: JSON, or JSON then binary data",
             "content": {"application/json": {"schema": _INFER_RESPONSE},
                         "application/octet-stream": {"schema": {"type": "string",
                                                                 "format": "binary"}}}},
            body={"required": True, "content": {
                "application/json": {"schema": _INFER_REQUEST},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            params=params, query=(timeout,))}
        for name, schema, query in (("classify", _CLASSIFY_RESPONSE, (top_k, timeout)),
                                    ("embed", _EMBED_RESPONSE, (normalize, binary, timeout))):
            ok = _json(schema)
            if name == "embed":
                ok["content"]["application/octet-stream"] = {
                    "schema": {"type": "string", "format": "binary"}}
            operation = _operation(f"{name} image files", ok, body=_IMAGE_BODY,
                                   params=params, query=query)
            paths[f"{base}/{name}"] = {"post": operation, "put": operation}
    return paths


def openapi_document() -> dict[str, Any]:
    control = {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"parameters": {"type": "object", "maxProperties": 0}}}}}}
    unload = {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"parameters": {
            "type": "object", "additionalProperties": False,
            "properties": {"unload_dependents": {"type": "boolean"}}}}}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "visionserve HTTP API", "version": package_version(),
                 "description": "KServe v2 / Open Inference Protocol REST, with Triton's "
                                "binary tensor data and classification extensions, and image "
                                "endpoints. docs/rest.md is the guide."},
        "paths": {
            "/v2": {"get": _operation("server metadata", _json(_OBJECT))},
            "/v2/health/live": {"get": _operation("liveness", _json(_OBJECT))},
            "/v2/health/ready": {"get": _operation(
                "readiness (503 while loading and from the start of a shutdown)",
                _json(_OBJECT))},
            "/v2/openapi.json": {"get": _operation("this document", _json(_OBJECT))},
            "/v2/models/stats": {"get": _operation("every model's statistics", _json(_OBJECT))},
            "/v2/repository/index": {"post": _operation(
                "the repository's models and versions", _json({"type": "array"}),
                body={"content": {"application/json": {"schema": {
                    "type": "object", "properties": {"ready": {"type": "boolean"}}}}}})},
            "/v2/repository/models/{model}/load": {"post": _operation(
                "load a model (--model-control explicit)", _json(_OBJECT), body=control,
                params=("model",))},
            "/v2/repository/models/{model}/unload": {"post": _operation(
                "unload a model (--model-control explicit)", _json(_OBJECT), body=unload,
                params=("model",))},
            **_model_paths(),
        },
    }
