"""``visionserve bench``: the served model measured beside its own engine and beside a peer.

- ``schedule``   — Poisson arrival schedules and percentile helpers (pure functions)
- ``loadgen``    — the load generator, run in its own process (grpc.aio, closed or open loop)
- ``launch``     — starting servers: visionserve (batching on/off variants) and Triton (peer)
- ``inprocess``  — the ceiling: the same model file in an in-process ONNX Runtime session
- ``report``     — terminal table, ratios, JSON, PNG plot, markdown
- ``decoders``   — the preprocessing bench (JPEG decode + resize + normalize, per decoder)
- ``run``        — the orchestration behind ``visionserve bench``
"""
