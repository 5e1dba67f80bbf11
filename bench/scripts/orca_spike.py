"""Spike (docs/deploy.md, "Balancing on load"): does grpcio's client-side
``weighted_round_robin`` policy honour per-call ORCA load reports (the trailing metadata
``endpoint-load-metrics-bin``: a serialized ``xds.data.orca.v3.OrcaLoadReport``) that a Python
``grpc.aio`` server sends?

Two servers answer every call with a report: "busy" at application utilization 0.9, "idle" at
0.1, both at 100 requests/s. One client calls 3,000 times through a channel over both, with the
policy named on the command line; the picks of the last 2,000 calls (the weights settled) are
printed. ``weighted_round_robin`` should send ~90 % to "idle" (weights qps / utilization: 111
and 1,000); ``round_robin`` splits them evenly.

    python bench/scripts/orca_spike.py weighted_round_robin
    python bench/scripts/orca_spike.py round_robin
"""

from __future__ import annotations

import asyncio
import collections
import json
import struct
import sys

import grpc


def orca_report(application_utilization: float, rps: float) -> bytes:
    """An OrcaLoadReport, encoded by hand: rps_fractional (field 6) and
    application_utilization (field 9), both doubles."""
    return (struct.pack("<Bd", (6 << 3) | 1, rps)
            + struct.pack("<Bd", (9 << 3) | 1, application_utilization))


async def serve(name: str, utilization: float) -> tuple[grpc.aio.Server, int]:
    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata(
            (("endpoint-load-metrics-bin", orca_report(utilization, 100.0)),))
        return name.encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "spike.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def main(policy: str) -> None:
    busy, busy_port = await serve("busy", 0.9)
    idle, idle_port = await serve("idle", 0.1)
    settings = {"blackoutPeriod": "0.1s", "weightUpdatePeriod": "0.1s"} \
        if policy == "weighted_round_robin" else {}
    config = {"loadBalancingConfig": [{policy: settings}]}
    target = f"ipv4:127.0.0.1:{busy_port},127.0.0.1:{idle_port}"
    async with grpc.aio.insecure_channel(
            target, options=[("grpc.service_config", json.dumps(config))]) as channel:
        call = channel.unary_unary("/spike.Echo/Who")
        picks: collections.Counter[str] = collections.Counter()
        for i in range(3000):
            reply = await call(b"")
            if i >= 1000:
                picks[reply.decode()] += 1
    sys.stdout.write(f"{policy}: {dict(picks)}\n")
    await busy.stop(0)
    await idle.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "weighted_round_robin"))
