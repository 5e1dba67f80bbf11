"""Reading an HTTP request's body, within the server's limits: 413 from the declared
``Content-Length`` before anything is read, a deadline for the upload (408), gzip/deflate
decompressed with the limit applied to what it decompresses to (a bomb costs at most the limit),
and the image files of a classify/embed request (the body itself, or multipart/form-data
parts)."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ...engine.preprocess import EncodedImage
from ...errors import InvalidInput, LimitExceeded
from ...limits import ServerLimits
from ...logs import printable

BODY_TIMEOUT_S = 60.0  # a request body must have arrived by then (a slow upload holds a slot)
# file signatures of the formats the server decodes (a raw image body is recognised by them:
# ``curl --data-binary`` labels it application/x-www-form-urlencoded)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_COMPRESSED = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class ClientGone(InvalidInput):
    """The client disconnected before its request was read: nobody to answer, nothing to log
    as a server error."""


class HttpError(InvalidInput):
    """An HTTP-only refusal (415): its own status here, INVALID_ARGUMENT in metrics."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyReader:
    """Reads request bodies within ``limits`` (``max_message_bytes``, images per request)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits

    @contextlib.asynccontextmanager
    async def _upload(self, request: web.Request) -> AsyncIterator[None]:
        """Reading a body: 413 from its declared length first; then within BODY_TIMEOUT_S
        (408), and a client gone mid-upload is not a server error."""
        if request.content_length is not None and \
                request.content_length > self.limits.max_message_bytes:
            raise LimitExceeded(self.too_large(request.content_length))
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                yield
        except TimeoutError:
            raise HttpError(408, f"the request body did not arrive within "
                                 f"{BODY_TIMEOUT_S:.0f} s; send it at once, or smaller") from None
        except ConnectionError:
            raise ClientGone("the client closed the connection during the upload") from None

    def too_large(self, size: int) -> str:
        return (f"the request body of {size} bytes is over the limit of "
                f"{self.limits.max_message_bytes} bytes (--max-message-bytes); split the "
                "request")

    async def read(self, request: web.Request) -> bytes:
        """The body within the limit, decompressed (gzip/deflate) with the limit applied to
        what it decompresses to: 413 from the declared length before reading anything."""
        limit = self.limits.max_message_bytes
        try:
            async with self._upload(request):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise LimitExceeded(f"the request body is over the limit of {limit} bytes "
                                "(--max-message-bytes); split the request") from None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding not in _COMPRESSED:
            raise HttpError(415, f"Content-Encoding {printable(encoding)!r} is not supported; "
                                 "send gzip, deflate or an uncompressed body")
        return await asyncio.to_thread(decompress, raw, encoding, limit)

    async def images(self, request: web.Request, model: str) -> list[EncodedImage]:
        """The image files of a classify/embed request: the body itself (recognised by its
        signature, whatever its Content-Type), or the parts of a multipart/form-data body."""
        where = f"model {printable(model)}"
        if request.content_type.startswith("multipart/"):
            return await self._parts(request, where)
        body = await self.read(request)
        if not body:
            raise InvalidInput(f"{where}: the request body is empty; send an image file (curl "
                               "--data-binary @photo.jpg) or multipart/form-data parts")
        if not (body.startswith(_IMAGE_MAGIC) or body[:4] == b"RIFF" and body[8:12] == b"WEBP"):
            raise InvalidInput(f"{where}: the request body is not a JPEG, PNG or WebP file "
                               f"(it starts with {body[:8].hex(' ')}); send the file's bytes "
                               "as the body, or multipart/form-data with one part per image")
        return [EncodedImage(body)]

    async def _parts(self, request: web.Request, where: str) -> list[EncodedImage]:
        limit, max_images = self.limits.max_message_bytes, self.limits.max_images_per_request
        if request.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
            raise HttpError(415, f"{where}: a multipart body is read as sent: drop "
                                 "Content-Encoding (image files are compressed already)")
        try:
            async with self._upload(request):
                reader = await request.multipart()
                images: list[EncodedImage] = []
                total = 0
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        raise InvalidInput(f"{where}: a multipart part is itself multipart; "
                                           "send one part per image file")
                    if len(images) == max_images:
                        raise LimitExceeded(f"{where}: more than {max_images} parts, over the "
                                            "images-per-request limit; split the request")
                    chunks = []
                    while chunk := await part.read_chunk(1 << 16):
                        total += len(chunk)
                        if total > limit:
                            raise LimitExceeded(f"{where}: the multipart body is over the "
                                                f"limit of {limit} bytes (--max-message-bytes)")
                        chunks.append(chunk)
                    images.append(EncodedImage(b"".join(chunks)))
        except (ValueError, AssertionError, HttpProcessingError) as exc:  # a malformed body
            raise InvalidInput(f"{where}: malformed multipart/form-data body ({exc}); send one "
                               "part per image file") from None
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
