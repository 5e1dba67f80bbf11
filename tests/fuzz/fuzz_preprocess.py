"""Coverage-guided fuzz target (atheris/libFuzzer) of the decode/preprocess path: whatever bytes
arrive as an encoded image or a raw tensor, ``Preprocessor`` must return the model's input or
raise a ``VisionServeError`` (a documented status); any other exception, a crash or a hang is a
finding.

    python tests/fuzz/fuzz_preprocess.py -runs=100000 -max_len=65536 CORPUS_DIR
    python tests/fuzz/fuzz_preprocess.py -max_total_time=600 CORPUS_DIR   # a long campaign

``CORPUS_DIR`` may start empty; ``--seed-corpus DIR`` writes small valid JPEG/PNG/WebP/GIF files
there first. tests/test_fuzz.py runs a short campaign on every test run.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np
    from PIL import Image, ImageOps  # noqa: F401 - instrumented with the rest

    Image.init()  # imports every format plugin now, inside the instrumented block

    from visionserve.service.engine.preprocess import EncodedImage, Preprocessor, RawTensor
    from visionserve.service.errors import VisionServeError
    from visionserve.service.format.model_config import InputSpec
    from visionserve.service.limits import ServerLimits

SPEC = InputSpec(height=32, width=32, resize=36)  # small: fast iterations, same code paths
LIMITS = ServerLimits(max_encoded_image_bytes=1 << 20, max_image_pixels=4_000_000)
PREPROCESSORS = [Preprocessor("fuzz", 1, SPEC, LIMITS),
                 Preprocessor("fuzz", 1, InputSpec(height=32, width=32, resize=36,
                                                   decoder="fast", color="BGR"), LIMITS),
                 Preprocessor("fuzz", 1, InputSpec(channels=1, height=32, width=32, resize=0,
                                                   color="L", mean=(0.5,), std=(0.5,)), LIMITS)]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    prep = PREPROCESSORS[fdp.ConsumeIntInRange(0, len(PREPROCESSORS) - 1)]
    try:
        if fdp.ConsumeBool():
            image = EncodedImage(fdp.ConsumeBytes(fdp.remaining_bytes()))
        else:
            shape = tuple(fdp.ConsumeIntInRange(-2, 300) for _ in range(fdp.ConsumeIntInRange(
                0, 4)))
            image = RawTensor(shape, fdp.PickValueInList(["float32", "uint8", "int8", ""]),
                              fdp.ConsumeBytes(fdp.remaining_bytes()),
                              fdp.PickValueInList(["", "CHW", "HWC", "NHWC"]))
        batch = prep.assemble([prep.prepare(0, image)])
    except VisionServeError:
        return
    assert batch.shape == (1, *prep.spec.shape) and batch.dtype == np.float32


def seed_corpus(directory: Path) -> None:
    """Small valid files of every accepted (and one refused) format, as starting points."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    for fmt, mode, save in (("JPEG", "RGB", {}), ("JPEG", "L", {"progressive": True}),
                            ("JPEG", "CMYK", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}),
                            ("WEBP", "RGB", {"lossless": True}), ("GIF", "P", {})):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format=fmt, **save)
        # the first byte picks the preprocessor, the second "encoded": then the file
        (directory / f"seed-{fmt}-{mode}").write_bytes(b"\x00\x01" + buf.getvalue())


def main() -> None:
    if "--seed-corpus" in sys.argv:
        i = sys.argv.index("--seed-corpus")
        seed_corpus(Path(sys.argv[i + 1]))
        del sys.argv[i:i + 2]
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
