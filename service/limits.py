"""The server's request limits (every one a `serve` flag) and the cores it may use."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .settings import declared, setting


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """Request limits enforced at the boundary, with safe defaults; each is a `serve` flag."""

    max_message_bytes: int = setting(
        64 * 1024 * 1024, help="largest gRPC message accepted or sent (RESOURCE_EXHAUSTED above)")
    max_encoded_image_bytes: int = setting(
        20 * 1024 * 1024, name="--max-image-bytes",
        help="largest encoded image (JPEG/PNG/WebP) accepted")
    max_image_pixels: int = setting(
        40_000_000, help="largest decoded image (width x height); checked before decoding")
    max_json_bytes: int = setting(
        8 * 1024 * 1024, help="largest JSON request body over REST (after decompression); "
                               "larger tensors go as binary data after the JSON header "
                               "(Inference-Header-Content-Length), up to "
                               "--max-message-bytes (the lower of the two applies)")
    max_images_per_request: int = setting(256, help="images in one request")
    # ~115 MP/s per core for JPEG: the default is about 2 s of one core
    max_request_pixels: int = setting(
        256_000_000, help="decoded pixels of all encoded images of one request, read from "
                          "their headers before any decodes (RESOURCE_EXHAUSTED above; >= "
                          "--max-image-pixels)")
    max_decode_queue_pixels: int = setting(
        1_024_000_000, help="decoded pixels admitted for decoding and not yet decoded, "
                            "server-wide; a request that would exceed it is refused "
                            "RESOURCE_EXHAUSTED at once (>= --max-request-pixels)")
    max_inflight_requests: int = setting(
        64, help="inference requests (Classify, Embed, ModelInfer, stream messages) in progress "
                 "at once, server-wide; more are refused RESOURCE_EXHAUSTED at once (health "
                 "and metadata calls still pass). About capacity x acceptable latency "
                 "(docs/security.md); 0 = no limit")
    max_stream_inflight: int = setting(
        32, help="messages of one stream answered or waiting to be sent at once; at the bound "
                 "the server stops reading that stream until the client reads its replies "
                 "(>= 1)")
    max_concurrent_rpcs: int = setting(
        0, help="RPCs of any kind at once, refused by gRPC before Python parses them: a memory "
                "backstop (0 = no limit; it also refuses health probes)")
    http_max_connections: int = setting(
        1024, help="connections open at once on the HTTP port, TLS handshakes included; at the "
                   "bound a new one evicts the connection that has made the least recent "
                   "progress among those waiting on their client (docs/security.md)")
    # HTTP/2, per connection (gRPC's own defaults are unbounded)
    max_streams_per_connection: int = setting(
        256, help="calls in flight on one HTTP/2 connection (more wait in the client)")
    connection_idle_s: float = setting(
        15 * 60.0, help="close a connection idle this long (0 = never)")
    connection_age_s: float = setting(
        30 * 60.0, help="close every connection at this age, so clients reconnect and a load "
                        "balancer spreads them again (0 = never)")
    connection_age_grace_s: float = setting(
        5 * 60.0, help="time the calls in flight on a connection closed for its age get to "
                       "finish")

    def __post_init__(self) -> None:
        for f, flag in declared(ServerLimits):  # a size, a count or a time: never negative
            if getattr(self, f.name) < 0:
                raise ValueError(f"{flag.flag(f.name)} must be >= 0, got {getattr(self, f.name)}")
        if self.max_streams_per_connection < 1:
            raise ValueError("--max-streams-per-connection must be >= 1, got "
                             f"{self.max_streams_per_connection}")
        if min(self.connection_idle_s, self.connection_age_s, self.connection_age_grace_s) < 0:
            raise ValueError("--connection-idle-s, --connection-age-s and "
                             "--connection-age-grace-s must be >= 0 (0 = no limit)")
        if self.http_max_connections < 1:
            raise ValueError(f"--http-max-connections must be >= 1, got "
                             f"{self.http_max_connections}")
        if self.max_json_bytes < 1:
            raise ValueError(f"--max-json-bytes must be >= 1, got {self.max_json_bytes}")
        if self.max_stream_inflight < 1:
            raise ValueError(f"--max-stream-inflight must be >= 1, got {self.max_stream_inflight}")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"--max-request-pixels {self.max_request_pixels} is below "
                             f"--max-image-pixels {self.max_image_pixels}: one image at its "
                             "limit would not fit in a request; lower --max-image-pixels too")
        if self.max_decode_queue_pixels < self.max_request_pixels:
            raise ValueError(f"--max-decode-queue-pixels {self.max_decode_queue_pixels} is below "
                             f"--max-request-pixels {self.max_request_pixels}: a request at its "
                             "budget would never fit; raise it")
        from PIL import Image

        pillow = Image.MAX_IMAGE_PIXELS
        if pillow is not None and self.max_image_pixels > pillow:
            raise ValueError(f"--max-image-pixels {self.max_image_pixels} is above Pillow's own "
                             f"decompression-bomb guard ({pillow} pixels), which would refuse "
                             "such images first; use at most that")


def cpu_count() -> int:
    """Cores this process may use (respects affinity / container cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
