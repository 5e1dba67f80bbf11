"""`serve`'s arguments, generated from the settings ``ServerConfig`` and ``ServerLimits``
declare (``settings.setting``), and the ``ServerConfig`` that parsed arguments describe.

Each flag's default, help, choices and ``VISIONSERVE_<FLAG>`` variable come from its field;
``--help`` shows every default and variable. A variable's value is read as the flag's would be
(a list variable is comma-separated); the command line wins over it.
"""

from __future__ import annotations

import argparse
import enum
import os
import typing
from dataclasses import MISSING, Field
from typing import Any

from ..api.auth import load_token
from ..limits import ServerLimits
from ..process.server_config import ServerConfig, UsageError
from ..settings import Flag, declared, env_name

_HINTS = {cls: typing.get_type_hints(cls) for cls in (ServerConfig, ServerLimits)}


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One argument per setting, in declaration order (the limits where ``limits`` stands)."""
    for f, flag in declared(ServerConfig):
        if f.name == "limits":
            for lf, lflag in declared(ServerLimits):
                _add(parser, ServerLimits, lf, lflag)
        else:
            _add(parser, ServerConfig, f, flag)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` that ``serve``'s parsed arguments describe (its rules checked as it
    is built); a ``UsageError`` names the flag. The tests' in-process servers are built through
    here too, so a flag means the same in a test as on the command line."""
    try:
        token = load_token(args.auth_token_file)
        limits = ServerLimits(**{f.name: getattr(args, f.name)
                                 for f, _ in declared(ServerLimits)})
        values = {f.name: getattr(args, f.name) for f, _ in declared(ServerConfig)
                  if f.name != "limits"}
        values["load_models"] = tuple(values["load_models"])  # argparse appends to a list
        if getattr(args, "no_http", False):
            values["http_port"] = None
        values["auth_token_file"] = args.auth_token_file if token else None
        return ServerConfig(limits=limits, auth_token=token, **values)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _add(parser: argparse.ArgumentParser, cls: type, f: Field[Any], flag: Flag) -> None:
    kind = _kind(_HINTS[cls][f.name])
    default = f.default if f.default is not MISSING else None
    name, env = flag.flag(f.name), flag.env(f.name)
    raw = os.environ.get(env)
    metavar = flag.metavar or name.removeprefix("--").upper().replace("-", "_")
    kwargs: dict[str, Any] = {"dest": f.name, "metavar": metavar}
    if kind is bool:
        kwargs = {"dest": f.name, "action": "store_true",
                  "default": _truthy(raw) if raw is not None else default}
        shown = ""
    elif flag.repeat:
        kwargs.update(action="append", type=str,
                      default=[v for v in raw.split(",") if v] if raw is not None
                      else list(default))
        shown = ", comma-separated"
    elif flag.comma:
        kwargs.update(type=lambda text: tuple(v for v in text.split(",") if v),
                      default=raw if raw is not None else tuple(default))
        shown = ""
    else:
        kwargs.update(type=_parser_of(kind, name, env), default=raw if raw is not None
                      else default)
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            kwargs.update(choices=list(kind), metavar=None)
        shown = ""
    told = "" if default is False else f" (default: {_show(default)})"
    parser.add_argument(name, help=f"{flag.help}{told} [env {env}{shown}]", **kwargs)
    if flag.off:
        off_env = env_name(flag.off)
        off_raw = os.environ.get(off_env)
        parser.add_argument(flag.off, dest=flag.off.removeprefix("--").replace("-", "_"),
                            action="store_true",
                            default=_truthy(off_raw) if off_raw is not None else False,
                            help=f"{flag.off_help} [env {off_env}]")


def _kind(hint: Any) -> Any:
    """The type a flag converts to: ``Path | None`` → Path, ``tuple[str, ...]`` → str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return str
    return args[0] if args else hint


def _parser_of(kind: Any, flag: str, env: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {flag} (from the command "
                                             f"line or {env})") from None
    convert.__name__ = getattr(kind, "__name__", "value")  # argparse's messages name it
    return convert


def _truthy(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _show(default: Any) -> str:
    if isinstance(default, enum.Enum):
        return str(default.value)
    if default in (None, "", ()):
        return "none" if default is None else "empty"
    return str(default)

