"""Where a version's weights came from, as ``visionserve export`` recorded it in the version's
``export.json``: shown beside every model (ListModels/GetModel, KServe's model config, REST
metadata, the CLI), so that a random-weight model never answers in the same confident table as
a real one without saying so."""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_RECORD = "export.json"
MAX_RECORD_BYTES = 1 << 20  # a record is a few KiB; a larger file is not one of ours
RANDOM = "random weights"  # how every description of a random init starts


def weights_of(version_dir: Path) -> str:
    """One line: ``random weights (…): answers and labels are meaningless``, ``pretrained:
    <source>``, ``file <name> (sha256 …)``, or ``unknown (…)`` for a version not made by
    export."""
    path = version_dir / EXPORT_RECORD
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read(MAX_RECORD_BYTES + 1)[:MAX_RECORD_BYTES])
        source = record["weights_source"]
        text = str(source["source"])
    except FileNotFoundError:
        return "unknown (no export.json: not made by visionserve export)"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown (export.json unreadable)"
    kind = source.get("kind") or ("random" if text.startswith("seeded random init")
                                  else "file" if text.startswith("file ") else "pretrained")
    if kind == "random":
        return f"{RANDOM} ({text}): answers and labels are meaningless"
    if kind == "file":
        digest = str(source.get("sha256") or "")[:12]
        return f"{text} (sha256 {digest}…)" if digest else text
    return f"pretrained: {text}"


def is_random(weights: str) -> bool:
    return weights.startswith(RANDOM)
