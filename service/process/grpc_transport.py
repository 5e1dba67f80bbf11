"""The gRPC server's HTTP/2 transport limits (docs/security.md, "gRPC transport")."""

from __future__ import annotations

from ..limits import ServerLimits


def transport_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """HTTP/2 limits per connection (docs/security.md, "gRPC transport"), where gRPC's own
    defaults are unbounded streams per connection and connections kept for ever."""
    options = [
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        # keepalive pings: at most one per 5 min without data; a client that pings more often
        # twice is disconnected (GOAWAY ENHANCE_YOUR_CALM); no pings without calls
        ("grpc.http2.min_ping_interval_without_data_ms", 5 * 60 * 1000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_metadata_size", 16 * 1024),  # request headers (metadata) of a call, bytes
        # streams count against max_concurrent_streams while HTTP/2 has them open, not until
        # Python frees them: gRPC's "overload protection" (on by default) counts the latter and
        # resets the surplus (REFUSED_STREAM: UNAVAILABLE "Stream removed", which says nothing);
        # overload is refused by our admission instead, RESOURCE_EXHAUSTED with a reason
        ("grpc.http.overload_protection", 0),
    ]
    if limits.connection_idle_s:  # an idle connection is closed (GOAWAY)
        options.append(("grpc.max_connection_idle_ms", int(limits.connection_idle_s * 1000)))
    if limits.connection_age_s:  # clients reconnect: a load balancer spreads them again
        options += [("grpc.max_connection_age_ms", int(limits.connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms",
                     int(limits.connection_age_grace_s * 1000))]
    return options
