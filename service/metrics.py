"""Every Prometheus metric of the server, declared once (names are a contract: docs/metrics.md).

Metrics live in a ``CollectorRegistry`` owned by one ``Metrics`` object built in ``main`` and
passed down; nothing here is global. Labels come from the model registry, never from raw client
input (an unknown model name is reported as ``model="_unknown"``), so a hostile client cannot
blow up the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .states import VersionState
from .utilization import UtilizationCollector

# Sub-millisecond to tens of seconds: a LeNet batch takes ~0.1 ms, a ResNet-50 batch of 64 ~3 s.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNKNOWN_MODEL = "_unknown"
MODEL_STATES = tuple(VersionState)  # the state label takes each value


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Long because every series the server exports is declared here, each with its help
        text, in one place (the dashboards' contract)."""
        self.registry = registry or CollectorRegistry()
        mv = ("model", "version")
        r = self.registry
        # visionserve_engine_utilization, visionserve_engine_busy_seconds_total (utilization.py)
        self.utilization = UtilizationCollector()
        r.register(self.utilization)
        self.request_duration = Histogram(
            "visionserve_request_duration_seconds",
            "Time from receiving an RPC to sending its reply, by outcome.",
            ("model", "version", "method", "code"), buckets=DURATION_BUCKETS, registry=r)
        self.queue_duration = Histogram(
            "visionserve_queue_duration_seconds",
            "Time an image waited in its model version's batching queue.",
            mv, buckets=DURATION_BUCKETS, registry=r)
        self.preprocess_duration = Histogram(
            "visionserve_preprocess_duration_seconds",
            "Time to turn one request's images into input tensors (decode, resize, normalize).",
            mv, buckets=DURATION_BUCKETS, registry=r)
        self.compute_duration = Histogram(
            "visionserve_compute_duration_seconds",
            "Time the backend took to run one batch.", mv, buckets=DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "visionserve_batch_size", "Images per executed batch.", mv,
            buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "visionserve_queue_depth", "Images waiting in the batching queue.", mv, registry=r)
        self.queue_capacity = Gauge(
            "visionserve_queue_capacity", "Batching queue capacity, in images.", mv, registry=r)
        self.refused = Counter(
            "visionserve_requests_refused",
            "Calls refused before any handler ran: reason=\"unauthenticated\" (the token check), "
            "\"undecodable\" (not protobuf) or \"wire_limit\" (a repeated field over its limit).",
            ("method", "reason"), registry=r)
        self.decode_queue = Gauge(
            "visionserve_decode_queue_pixels",
            "Pixels of encoded images admitted for decoding and not yet decoded (bounded by "
            "--max-decode-queue-pixels).", registry=r)
        self.inflight = Gauge(
            "visionserve_inflight_requests", "RPCs being handled now.", ("method",), registry=r)
        self.expired = Counter(
            "visionserve_requests_expired",
            "Images dropped before compute because their deadline passed or the client "
            "cancelled.", (*mv, "reason"), registry=r)
        self.rejected = Counter(
            "visionserve_requests_rejected",
            "Images refused at admission with RESOURCE_EXHAUSTED: the queue was full, or the "
            "queue ahead could not be computed before the request's deadline.",
            (*mv, "reason"), registry=r)
        self.model_state = Gauge(
            "visionserve_model_state",
            "1 for the current state of each model version, 0 for the others.",
            (*mv, "state"), registry=r)
        self.model_load_seconds = Histogram(
            "visionserve_model_load_seconds", "Time to load and warm up a model version.",
            mv, buckets=DURATION_BUCKETS, registry=r)
        self.model_load_failures = Counter(
            "visionserve_model_load_failures",
            "Model versions (or whole models, version=\"\") that failed to load.", mv,
            registry=r)
        self.golden_checks = Counter(
            "visionserve_golden_checks",
            "Golden checks of loaded versions (docs/lifecycle.md), by result: passed, failed "
            "(kept out of routing, or served anyway with --golden-check warn), missing (the "
            "version has no golden set).", (*mv, "result"), registry=r)
        self.golden_check_seconds = Histogram(
            "visionserve_golden_check_seconds",
            "Time the golden check of a version took at load (its part of the load time).",
            mv, buckets=DURATION_BUCKETS, registry=r)

    def set_model_state(self, model: str, version: str, state: str) -> None:
        for s in MODEL_STATES:
            self.model_state.labels(model, version, s.value).set(1 if s == state else 0)
