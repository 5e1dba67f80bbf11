"""The commands that call a running server: ``classify``, ``embed``, ``models``, ``health``.

Each prints a table (people) or one JSON document (``-o json``, scripts) on stdout, logs errors
on stderr, and returns the exit status: 0 ok, 1 the call failed (or, for ``health``, the server
is not SERVING).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .mistakes import CommandError, optional_file, readable_files

log = logging.getLogger("visionserve")


def _client_channel(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import open_channel

    return open_channel(args.server, optional_file(args.tls_ca, "--tls-ca"),
                        optional_file(args.tls_client_cert, "--tls-client-cert"),
                        optional_file(args.tls_client_key, "--tls-client-key"))


def classify(args: argparse.Namespace) -> int:
    from .terminal import message_dict, print_json, print_table

    images = readable_files(args.images, "image")
    reply = _call(lambda c: c.classify_files(images, args.model, args.top_k, args.version),
                  args)
    if reply is None:
        return 1
    weights = _call(lambda c: _weights_of(c, reply.model, reply.version), args) or ""
    if args.output == "json":
        print_json({**message_dict(reply), "weights": weights})
        return 0
    for path, result in zip(args.images, reply.results, strict=True):
        print_table(f"{path} — {reply.model} v{reply.version} ({weights or 'weights unknown'})",
                    ("#", "label", "index", "score"),
                    [(rank, c.label, c.index, f"{c.score:.4f}")
                     for rank, c in enumerate(result.classes, 1)])
    return 0


def embed(args: argparse.Namespace) -> int:
    from .client import tensor_to_numpy
    from .terminal import message_dict, print_json

    images = readable_files(args.images, "image")
    reply = _call(lambda c: c.embed_files(images, args.model, not args.raw, args.version),
                  args)
    if reply is None:
        return 1
    vectors = tensor_to_numpy(reply.embeddings)
    if args.output == "json":  # the reply's mapping, with the vectors as numbers, not base64
        document = message_dict(reply)
        document["embeddings"] = {"shape": list(vectors.shape), "dtype": "float32",
                                  "values": vectors.tolist()}
        print_json(document)
        return 0
    for path, v in zip(args.images, vectors, strict=True):
        head = " ".join(f"{x:+.4f}" for x in v[:8])
        sys.stdout.write(f"{path}: dim={v.shape[0]} norm={float((v ** 2).sum() ** 0.5):.4f} "
                         f"[{head} …]\n")
    return 0


def models(args: argparse.Namespace) -> int:
    from visionserve.v1 import visionserve_pb2 as pb

    from .terminal import message_dict, print_json, print_table

    reply = _call(lambda c: c.list_models(), args)
    if reply is None:
        return 1
    if args.output == "json":
        print_json(message_dict(reply))
        return 0

    def state(value: int) -> str:
        return pb.ModelState.Name(value).removeprefix("MODEL_STATE_").lower()

    rows = []
    for m in reply.models:
        versions = ", ".join(f"{v.version}:{state(v.state)}" for v in m.versions)
        shape = f"{m.input.channels}x{m.input.height}x{m.input.width}" if m.input.name else ""
        rows.append((m.name, state(m.state), versions, shape, m.num_classes, m.embedding_dim,
                     m.max_batch_size, _newest_weights(m), m.reason))
    print_table(f"models on {args.server}", ("model", "state", "versions", "input", "classes",
                                             "embedding", "max batch", "weights (newest)",
                                             "reason"), rows)
    return 0


def _newest_weights(model) -> str:  # type: ignore[no-untyped-def]
    """Where the newest serving version's weights came from ("" when none serves)."""
    return next((v.weights for v in model.versions if v.weights), "")


def _weights_of(client, model: str, version: int) -> str:  # type: ignore[no-untyped-def]
    """Where the version that answered got its weights (GetModel), so that a random-weight
    model's answers never read like a real one's."""
    info = client.get_model(model)
    return next((v.weights for v in info.versions if v.version == version), "")


def _call(fn, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import grpc

    from ..api.auth import load_token
    from .client import VisionClient

    try:
        token = load_token(args.auth_token_file)
    except ValueError as exc:  # the file cannot be read, or holds no token
        raise CommandError(str(exc)) from None
    client = VisionClient(args.server, channel=_client_channel(args), token=token)
    try:
        return fn(client)
    except grpc.RpcError as err:
        log.error("%s: %s%s", err.code().name, err.details(),  # type: ignore[attr-defined]
                  _unreachable_hint(err, args.server))
        return None
    finally:
        client.close()


def _unreachable_hint(err, server: str) -> str:  # type: ignore[no-untyped-def]
    """What to check when no server answered at all."""
    import grpc

    if err.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (err.details() or ""):
        return (f"; is a server running at {server}? Start one with `visionserve serve`, or "
                "name it with --server HOST:PORT")
    return ""


def health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .terminal import print_json

    with _client_channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        except grpc.RpcError as err:
            sys.stderr.write(f"{args.server}: {err.code().name}: {err.details()}\n")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.output == "json":
        print_json({"server": args.server, "service": args.service, "status": status})
    else:
        sys.stdout.write(f"{args.server} {args.service or '(server)'}: {status}\n")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
