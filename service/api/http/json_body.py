"""JSON request bodies whose cost is bounded before they are parsed: containers and strings
counted on the bytes (each costs a Python object once parsed: ~56 bytes for the 3 bytes of
``[],``), their size bounded by ``--max-json-bytes`` (``body``), and a key given twice in one
object refused, not last-wins (two parsers reading one body differently is how requests are
smuggled past a proxy's checks)."""

from __future__ import annotations

import json
from typing import Any

from ...errors import InvalidInput, LimitExceeded
from ...logs import printable

# a request has a few dozen of each; BYTES data up to --max-images-per-request strings; nested
# ``data`` one array per row (21,600 for 32 images of 3×224×224)
MAX_JSON_CONTAINERS = 1 << 16
MAX_JSON_STRINGS = 1 << 16


def parse_json(body: bytes | memoryview, where: str, what: str = "the request body") -> Any:
    """JSON whose cost is bounded before it is parsed (containers and strings counted on the
    bytes; its size is bounded by --max-json-bytes), duplicate keys refused (not last-wins)."""
    text = bytes(body)
    containers, strings = text.count(b"[") + text.count(b"{"), text.count(b'"') // 2
    if containers > MAX_JSON_CONTAINERS or strings > MAX_JSON_STRINGS:
        raise LimitExceeded(f"{where}: {what} holds {containers} arrays and objects and "
                            f"{strings} strings, over the limits of {MAX_JSON_CONTAINERS} "
                            f"and {MAX_JSON_STRINGS}; send a flat \"data\" array, or the "
                            "tensors as binary data (Inference-Header-Content-Length)")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        pos = f" at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
    except DuplicateKey as exc:
        raise InvalidInput(f"{where}: {what} has the key {printable(str(exc))!r} twice in one "
                           "object; send each key once") from None
    except (ValueError, RecursionError) as exc:  # an integer of 4,300+ digits; deep nesting
        detail, pos = ("nested too deeply" if isinstance(exc, RecursionError)
                       else "a number too long"), ""
    raise InvalidInput(f"{where}: {what} is not JSON we can read ({detail}{pos}); send a "
                       "KServe v2 inference request: {\"inputs\": [{\"name\", \"shape\", "
                       "\"datatype\", \"data\"}]}")


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKey(key)
    return obj
