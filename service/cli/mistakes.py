"""A user's own mistakes on the command line: one clear line on stderr and exit 2, never a
traceback. Commands raise ``CommandError``; ``main`` prints it."""

from __future__ import annotations

from pathlib import Path


class CommandError(Exception):
    """A mistake in what the user asked for (a file that is not there, a missing extra): the
    message says what to do instead."""


def readable_files(paths: list[Path], what: str) -> list[Path]:
    """``paths`` when each is a readable file; else the first that is not, named."""
    for path in paths:
        if not path.exists():
            raise CommandError(f"{what} {path}: no such file")
        if path.is_dir():
            raise CommandError(f"{what} {path} is a directory: pass the files in it "
                               f"(e.g. {path}/*.jpg)")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise CommandError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    return paths


def optional_file(path: Path | None, flag: str) -> Path | None:
    """A file given to ``flag`` must be readable; None stays None."""
    if path is not None:
        readable_files([path], flag)
    return path
