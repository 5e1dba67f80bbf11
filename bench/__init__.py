"""``visionserve bench``: the served model measured beside its own engine and beside a peer.

A package of its own, beside the server: it depends on ``visionserve.service`` (to start and
drive servers), never the other way round, and its third-party needs come with the ``bench``
extra (``pip install 'visionserve[bench]'``). The server's CLI dispatches the ``bench*``
commands here and imports nothing of this package for any other command.

- ``cli``        — the ``bench``, ``bench-overload``, ``bench-decode``, ``bench-attacks`` commands
- ``schedule``   — Poisson arrival schedules and percentile helpers (pure functions)
- ``loadgen``    — the load generator, run in its own process (grpc.aio, closed or open loop)
- ``launch``     — starting servers: visionserve (batching on/off variants) and Triton (peer)
- ``inprocess``  — the ceiling: the same model file in an in-process ONNX Runtime session
- ``report``     — terminal table, ratios, JSON, PNG plot, markdown
- ``decoders``   — the preprocessing bench (JPEG decode + resize + normalize, per decoder)
- ``run``        — the orchestration behind ``visionserve bench``
- ``overload``   — the orchestration behind ``visionserve bench-overload``
- ``attacks``    — ``visionserve bench-attacks``: one request per class of hostile input
- ``ladder``     — ``visionserve bench-ladder``: the CPU precision ladder (ORT/OpenVINO FP32,
                   BF16, INT8), served and in-process, with agreement
"""

from __future__ import annotations

import importlib.util

# Modules the bench imports from the `bench` extra, and the distribution that provides each.
REQUIRES = {
    "tritonclient": "tritonclient[grpc]",
    "matplotlib": "matplotlib",
    "skimage": "scikit-image",
    "simplejpeg": "simplejpeg",
    "cv2": "opencv-python-headless",
}


def missing_requirements() -> list[str]:
    """The distributions of the ``bench`` extra that are not installed (empty when all are)."""
    return [dist for module, dist in REQUIRES.items() if importlib.util.find_spec(module) is None]
