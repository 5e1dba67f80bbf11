"""What the CLI prints on stdout: tables for people, JSON for scripts.

A table is sized to the terminal when stdout is one, and never cut when it is a pipe or a file
(rich would otherwise assume 80 columns and shorten names to ``resnet…``). ``json`` output is one
JSON document on stdout; logs and progress always go to stderr, so ``visionserve models -o json
| jq`` reads only the document.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

OUTPUT_FORMATS = ("table", "json")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    # a pipe has no width: wide enough that no cell is ever shortened
    Console(width=None if sys.stdout.isatty() else 10_000).print(table)


def print_json(document: Any) -> None:
    """One JSON document and a newline on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def message_dict(message: Any) -> dict[str, Any]:
    """A reply as our JSON (as REST writes it, not protobuf's own JSON mapping): field names
    as in the .proto, versions and other 64-bit integers as numbers, enums by name, defaults
    included; a dict to print or extend."""
    from ..format.triton_config import proto_json

    return proto_json(message)
