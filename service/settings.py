"""How a server setting is declared: once, on its dataclass field, with its flag, help and
environment variable. ``ServerConfig`` and ``ServerLimits`` declare theirs with ``setting``; the
CLI generates `serve`'s arguments from them (``cli/serve_flags.py``), so a setting's name,
default, help and environment variable are written in one place."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Flag:
    """The command-line face of one setting."""

    help: str
    name: str = ""  # the flag, when it is not --<field name with dashes>
    metavar: str | None = None
    repeat: bool = False  # a list: the flag repeats (its variable is comma-separated)
    comma: bool = False  # a list given as one comma-separated value
    off: str = ""  # for an optional setting: a flag that sets it to None (--no-http)
    off_help: str = ""

    def flag(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")

    def env(self, field_name: str) -> str:
        return env_name(self.flag(field_name))


def env_name(flag: str) -> str:
    """``--grpc-port`` → ``VISIONSERVE_GRPC_PORT``."""
    return "VISIONSERVE_" + flag.removeprefix("--").upper().replace("-", "_")


def setting(default: Any = None, *, help: str, factory: Any = None, **flag: Any) -> Any:
    """A dataclass field that is a server setting (``Flag`` takes the rest)."""
    meta = {"flag": Flag(help=help, **flag)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls: type) -> list[tuple[Field[Any], Flag]]:
    """The settings of a config class, in declaration order."""
    return [(f, f.metadata["flag"]) for f in fields(cls) if "flag" in f.metadata]
