"""A small blocking client for scripts and the CLI (``visionserve classify``, ``models``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def open_channel(target: str, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None) -> grpc.Channel:
    """A channel to ``target``: plaintext, or TLS when a CA (``tls_ca``, or the system's roots
    with ``tls_cert``/``tls_key`` only) or a client certificate for mutual TLS is given."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if not (tls_ca or tls_cert):
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes() if tls_ca else None,
        private_key=tls_key.read_bytes() if tls_key else None,
        certificate_chain=tls_cert.read_bytes() if tls_cert else None)
    return grpc.secure_channel(target, creds, options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class VisionClient:
    def __init__(self, target: str = "localhost:8001", timeout_s: float = 30.0,
                 channel: grpc.Channel | None = None, token: str | None = None) -> None:
        self._channel = channel or open_channel(target)
        self._stub = pb_grpc.VisionServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = auth_metadata(token)

    def classify_files(self, paths: list[Path], model: str, top_k: int = 5,
                       version: int = 0) -> pb.ClassifyResponse:
        images = [pb.Image(encoded=p.read_bytes()) for p in paths]
        return self._stub.Classify(pb.ClassifyRequest(model=model, version=version,
                                                      images=images, top_k=top_k),
                                   timeout=self._timeout_s, metadata=self._metadata)

    def embed_files(self, paths: list[Path], model: str, normalize: bool = True,
                    version: int = 0) -> pb.EmbedResponse:
        """The reply; ``tensor_to_numpy(reply.embeddings)`` is the [N, D] array."""
        images = [pb.Image(encoded=p.read_bytes()) for p in paths]
        return self._stub.Embed(pb.EmbedRequest(model=model, version=version, images=images,
                                                normalize=normalize), timeout=self._timeout_s,
                                metadata=self._metadata)

    def list_models(self) -> pb.ListModelsResponse:
        return self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout_s,
                                     metadata=self._metadata)

    def get_model(self, model: str) -> pb.ModelInfo:
        return self._stub.GetModel(pb.GetModelRequest(model=model), timeout=self._timeout_s,
                                   metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    dtype = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_UINT8: np.uint8}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def numpy_to_image(array: np.ndarray, layout: int = pb.LAYOUT_UNSPECIFIED) -> pb.Image:
    """One image as a raw tensor: float32 CHW (normalized) or uint8 (HWC or CHW)."""
    dtype = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.uint8): pb.DTYPE_UINT8}[
        array.dtype]
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Image(tensor=pb.Tensor(shape=list(array.shape), dtype=dtype, data=data,
                                     layout=layout))
