"""A FAKE ENGINE for the in-process tier (tests/inprocess): a fixed, seeded linear model in
numpy, loaded through the server's backend-factory seam instead of ONNX Runtime.

Its outputs depend on every part of the input that a test may care about (a 4×4 grid of
per-channel means goes through a seeded projection to the embedding, and the embedding through
a second one to the logits), so "decodes like its RGB pixels" or "applies the EXIF rotation"
still mean something; nothing here proves anything about a real network (the integration tier
keeps real exports and real ONNX Runtime sessions).

Tests control it without clocks: ``Engines.hold(model)`` makes that model's batches wait until
``release``; ``Engines.batches`` records every batch size each model computed; a model file
starting with ``broken`` fails to load as a refused engine would; ``fail(model)`` makes its
next batches raise, as an engine fault would.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np

from visionserve.service.engine.backends.base import Backend, ModelOutputs
from visionserve.service.errors import BackendError
from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.repository import VersionEntry

GRID = 4  # the input is pooled to GRID × GRID per channel before the projection
HOLD_LIMIT_S = 120.0  # a held batch never waits longer than this (a forgotten release)


def fake_model_file(classes: int, embedding_dim: int, seed: int) -> bytes:
    """What the fake engine reads where ONNX Runtime would read model.onnx."""
    return json.dumps({"fake_engine": 1, "classes": classes, "embedding_dim": embedding_dim,
                       "seed": seed}).encode()


class FakeEngine(Backend):
    def __init__(self, name: str, version: int, spec: dict[str, int], engines: Engines,
                 channels: int) -> None:
        self.name, self.version, self._engines = name, version, engines
        self.num_classes = int(spec["classes"])
        self.embedding_dim = int(spec["embedding_dim"])
        rng = np.random.default_rng(int(spec["seed"]) * 1000 + version)
        features = channels * GRID * GRID
        self._project = rng.standard_normal((features, self.embedding_dim)).astype(np.float32)
        self._classify = rng.standard_normal(
            (self.embedding_dim, self.num_classes)).astype(np.float32) / 8
        self.closed = False

    def run(self, batch: np.ndarray) -> ModelOutputs:
        self._engines.entered(self.name, len(batch))
        n, c, h, w = batch.shape
        gh, gw = max(1, h // GRID), max(1, w // GRID)
        cropped = batch[:, :, :gh * GRID, :gw * GRID]
        pooled = cropped.reshape(n, c, GRID, gh, GRID, gw).mean(axis=(3, 5)).reshape(n, -1)
        embedding = np.tanh(pooled @ self._project).astype(np.float32)
        return ModelOutputs((embedding @ self._classify).astype(np.float32), embedding)

    def close(self) -> None:
        self.closed = True
        self._engines.closed.append((self.name, self.version))


class Engines:
    """The backend factory handed to ``Server``; also the tests' handle on the engines."""

    def __init__(self) -> None:
        self.batches: dict[str, list[int]] = defaultdict(list)  # model -> batch sizes run
        self.loaded: list[tuple[str, int]] = []
        self.closed: list[tuple[str, int]] = []
        self._held: dict[str, threading.Event] = {}
        self._waiting: dict[str, int] = defaultdict(int)
        self._failing: set[str] = set()
        self._loads_held: threading.Event | None = None
        self._lock = threading.Condition()

    def __call__(self, name: str, config: ModelConfig, ventry: VersionEntry) -> Backend:
        gate = self._loads_held
        if gate is not None:
            gate.wait(HOLD_LIMIT_S)
        data = Path(ventry.model_file).read_bytes()
        if data.startswith(b"broken"):
            raise BackendError(f"model {name} version {ventry.version}: the engine refused "
                               f"{ventry.model_file.name} (fake engine: the file says broken)")
        try:
            spec = json.loads(data)
        except ValueError:
            raise BackendError(f"model {name} version {ventry.version}: "
                               f"{ventry.model_file.name} is not a fake engine's file") from None
        self.loaded.append((name, ventry.version))
        return FakeEngine(name, ventry.version, spec, self, config.input.channels)

    # --- control from the test -----------------------------------------------------------

    def hold(self, model: str) -> None:
        """From now on ``model``'s batches wait (in the engine) until ``release(model)``."""
        with self._lock:
            self._held[model] = threading.Event()

    def release(self, model: str) -> None:
        with self._lock:
            gate = self._held.pop(model, None)
        if gate is not None:
            gate.set()

    def step(self, model: str) -> None:
        """The batches of ``model`` held now finish; the next ones are held again (no moment
        between in which a batch could pass)."""
        with self._lock:
            gate = self._held[model]
            self._held[model] = threading.Event()
        gate.set()

    def hold_loads(self) -> None:
        """From now on loading an engine waits until ``release_loads()`` (a slow load)."""
        self._loads_held = threading.Event()

    def release_loads(self) -> None:
        gate, self._loads_held = self._loads_held, None
        if gate is not None:
            gate.set()

    def release_all(self) -> None:
        self.release_loads()
        for model in list(self._held):
            self.release(model)

    def waiting(self, model: str) -> int:
        """Batches of ``model`` now held in the engine."""
        with self._lock:
            return self._waiting[model]

    def fail(self, model: str, failing: bool = True) -> None:
        """``model``'s batches raise (an engine fault) until ``fail(model, False)``."""
        with self._lock:
            (self._failing.add if failing else self._failing.discard)(model)

    def entered(self, model: str, size: int) -> None:
        with self._lock:
            self.batches[model].append(size)
            gate = self._held.get(model)
            failing = model in self._failing
            if gate is not None:
                self._waiting[model] += 1
                self._lock.notify_all()
        if gate is not None:
            try:
                gate.wait(HOLD_LIMIT_S)
            finally:
                with self._lock:
                    self._waiting[model] -= 1
        if failing:
            raise RuntimeError(f"fake engine fault in {model}")
