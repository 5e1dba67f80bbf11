"""Reading an HTTP request's body, within the server's limits, before the request holds an
inference slot: 413 from the declared ``Content-Length`` before anything is read, the bytes
read whole within the limit (the listener's timers bound how long they take), gzip/deflate
decompressed with the limit applied to what it decompresses to (a bomb costs at most the
limit), and a JSON body held to ``--max-json-bytes`` (large tensors go as binary data). The
image files of a classify/embed request are the body itself, or the parts of a
multipart/form-data body parsed from the bytes read (a preamble or parts past the limit were
never read)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ...engine.preprocess import EncodedImage
from ...errors import ClientGone, InvalidInput, LimitExceeded
from ...limits import ServerLimits
from ...logs import printable

# file signatures of the formats the server decodes (a raw image body is recognised by them:
# ``curl --data-binary`` labels it application/x-www-form-urlencoded)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_COMPRESSED = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
# methods whose body is JSON alone (held to --max-json-bytes; ModelInfer without binary data too)
_JSON_BODIES = {"http.RepositoryIndex", "http.RepositoryModelLoad", "http.RepositoryModelUnload"}
BODY = web.RequestKey("body", bytes)  # read by ``upload`` before the call is admitted
IMAGES = web.RequestKey("images", list)
BINARY_HINT = ("send large tensors as binary data after the JSON header "
               "(Inference-Header-Content-Length; tritonclient: binary_data=True)")


def json_only(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request of ``method`` (``http.<Method>``) has a body of JSON alone."""
    return method in _JSON_BODIES or (method == "http.ModelInfer" and HEADER_LENGTH not in headers)


class HttpError(InvalidInput):
    """An HTTP-only refusal (415): its own status here, INVALID_ARGUMENT in metrics."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyReader:
    """Reads request bodies within ``limits`` (``max_message_bytes``, ``max_json_bytes``,
    images per request)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits

    def limit(self, json: bool) -> int:
        return min(self.limits.max_json_bytes, self.limits.max_message_bytes) if json \
            else self.limits.max_message_bytes

    def too_large(self, size: int | None, json: bool, decompressed: bool = False) -> str:
        what = f"the request body of {size} bytes" if size is not None else "the request body"
        what += " decompresses to" if decompressed else " is"
        if json:
            return (f"{what} over the JSON limit of {self.limit(True)} bytes "
                    f"(--max-json-bytes); {BINARY_HINT}, or split the request")
        return (f"{what} over the limit of {self.limits.max_message_bytes} bytes "
                "(--max-message-bytes); split the request")

    def upload(self, request: web.Request, json: bool) -> Callable[[], Awaitable[None]]:
        """The upload step of a call with a body (``CallHandler.run``): the body read whole
        into ``request[BODY]``, before the call holds an inference slot."""
        async def upload() -> None:
            request[BODY] = await self.read(request, json)

        return upload

    def upload_images(self, request: web.Request, model: str) -> Callable[[], Awaitable[None]]:
        """The upload step of a classify/embed call: its images into ``request[IMAGES]``."""
        async def upload() -> None:
            request[IMAGES] = await self.images(request, model)

        return upload

    async def _raw(self, request: web.Request, json: bool) -> bytes:
        """The body as sent: 413 from its declared length first, then from what arrives."""
        if request.content_length is not None and request.content_length > self.limit(json):
            raise LimitExceeded(self.too_large(request.content_length, json))
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise LimitExceeded(self.too_large(None, False)) from None
        except ConnectionError:
            raise ClientGone("the client closed the connection during the upload") from None
        except RuntimeError as exc:  # aiohttp: the connection was gone before the read began
            if str(exc) != "Connection closed.":
                raise
            raise ClientGone("the client closed the connection before its upload") from None
        if len(raw) > self.limit(json):
            raise LimitExceeded(self.too_large(len(raw), json))
        return raw

    async def read(self, request: web.Request, json: bool = False) -> bytes:
        """The body within the limit (the JSON one when ``json``), decompressed (gzip/deflate)
        with the limit applied to what it decompresses to."""
        raw = await self._raw(request, json)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding not in _COMPRESSED:
            raise HttpError(415, f"Content-Encoding {printable(encoding)!r} is not supported; "
                                 "send gzip, deflate or an uncompressed body")
        try:
            return await asyncio.to_thread(decompress, raw, encoding, self.limit(json))
        except LimitExceeded:
            raise LimitExceeded(self.too_large(None, json, decompressed=True)) from None

    async def images(self, request: web.Request, model: str) -> list[EncodedImage]:
        """The image files of a classify/embed request: the body itself (recognised by its
        signature, whatever its Content-Type), or the parts of a multipart/form-data body."""
        where = f"model {printable(model)}"
        if request.content_type.startswith("multipart/"):
            if request.headers.get("Content-Encoding", "identity").lower() not in (
                    "", "identity"):
                raise HttpError(415, f"{where}: a multipart body is read as sent: drop "
                                     "Content-Encoding (image files are compressed already)")
            return await self._parts(request, await self._raw(request, False), where)
        body = await self.read(request)
        if not body:
            raise InvalidInput(f"{where}: the request body is empty; send an image file (curl "
                               "--data-binary @photo.jpg) or multipart/form-data parts")
        if not (body.startswith(_IMAGE_MAGIC) or body[:4] == b"RIFF" and body[8:12] == b"WEBP"):
            raise InvalidInput(f"{where}: the request body is not a JPEG, PNG or WebP file "
                               f"(it starts with {body[:8].hex(' ')}); send the file's bytes "
                               "as the body, or multipart/form-data with one part per image")
        return [EncodedImage(body)]

    async def _parts(self, request: web.Request, raw: bytes, where: str) -> list[EncodedImage]:
        """The parts of a multipart body already read whole (within the limit)."""
        max_images = self.limits.max_images_per_request
        stream = StreamReader(request.protocol, max(1 << 16, len(raw)),
                              loop=asyncio.get_running_loop())
        stream.feed_data(raw)
        stream.feed_eof()
        images: list[EncodedImage] = []
        try:
            reader = MultipartReader(request.headers, stream)
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise InvalidInput(f"{where}: a multipart part is itself multipart; "
                                       "send one part per image file")
                if len(images) == max_images:
                    raise LimitExceeded(f"{where}: more than {max_images} parts, over the "
                                        "images-per-request limit; split the request")
                images.append(EncodedImage(bytes(await part.read())))
        except (ValueError, AssertionError, HttpProcessingError) as exc:  # a malformed body
            raise InvalidInput(f"{where}: malformed multipart/form-data body "
                               f"({printable(str(exc))}); send one part per image file"
                               ) from None
        if not images:
            raise InvalidInput(f"{where}: the multipart body has no parts; send one part per "
                               "image file")
        return images


def decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate body, refused once it decompresses past ``limit`` (a bomb costs at most
    ``limit`` bytes of memory). ``deflate`` is zlib-wrapped (RFC 9110), or raw as some send."""
    wbits = _COMPRESSED[encoding]
    for attempt in (wbits, -zlib.MAX_WBITS) if encoding == "deflate" else (wbits,):
        inflater = zlib.decompressobj(attempt)
        try:
            out = inflater.decompress(raw, limit + 1)
        except zlib.error as exc:
            if attempt != -zlib.MAX_WBITS and encoding == "deflate":
                continue
            raise InvalidInput(f"the request body is not valid {encoding} data ({exc}); "
                               "compress it whole, or drop Content-Encoding") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise LimitExceeded(f"the request body decompresses to over the limit of {limit} "
                                "bytes (--max-message-bytes); split the request")
        if not inflater.eof:
            raise InvalidInput(f"the {encoding} request body is truncated; send the whole "
                               "compressed stream")
        if inflater.unused_data:
            raise InvalidInput(f"the {encoding} request body has {len(inflater.unused_data)} "
                               "bytes after its compressed stream; send one stream")
        return out
    raise AssertionError("unreachable")
