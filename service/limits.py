"""The server's request limits (every one a `serve` flag) and the cores it may use."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """Request limits enforced at the boundary, with safe defaults (all configurable by flags)."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_encoded_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images_per_request: int = 256
    # decoded pixels of one request's encoded images, read from their headers before any
    # decodes (~115 MP/s per core for JPEG: this is about 2 s of one core)
    max_request_pixels: int = 256_000_000
    # decoded pixels admitted for decoding and not yet decoded, server-wide
    max_decode_queue_pixels: int = 1_024_000_000
    # inference requests (Classify, Embed, ModelInfer, stream messages) in progress at once;
    # more are refused RESOURCE_EXHAUSTED at once, while health and metadata calls still pass.
    # 0 = no limit.
    max_inflight_requests: int = 64
    # messages of one stream (ClassifyStream, ModelStreamInfer) being answered or waiting to be
    # sent; at the bound the server stops reading that stream (each also counts above)
    max_stream_inflight: int = 32
    # RPCs of any kind at once, refused by gRPC itself beyond it (before Python sees them):
    # a backstop for memory. 0 = no limit.
    max_concurrent_rpcs: int = 0
    # HTTP/2, per connection (gRPC's own defaults are unbounded): calls in flight on one
    # connection; an idle connection is closed; every connection is closed (GOAWAY) at this age,
    # its calls in flight given connection_age_grace_s to finish. 0 = no idle/age limit.
    max_streams_per_connection: int = 256
    connection_idle_s: float = 15 * 60.0
    connection_age_s: float = 30 * 60.0
    connection_age_grace_s: float = 5 * 60.0

    def __post_init__(self) -> None:
        if self.max_streams_per_connection < 1:
            raise ValueError("--max-streams-per-connection must be >= 1, got "
                             f"{self.max_streams_per_connection}")
        if min(self.connection_idle_s, self.connection_age_s, self.connection_age_grace_s) < 0:
            raise ValueError("--connection-idle-s, --connection-age-s and "
                             "--connection-age-grace-s must be >= 0 (0 = no limit)")
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
