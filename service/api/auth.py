"""Access control of the gRPC port: an optional bearer token checked in one interceptor
(docs/security.md; TLS is the process's: ``tls``).

Every RPC belongs to one access class. ``health`` (gRPC health, KServe ServerLive/ServerReady/
ModelReady) is always open so that probes work; ``repository`` (KServe RepositoryIndex/Load/
Unload) always needs the token when one is set; ``inference``, ``metadata`` and ``statistics``
need it unless the operator opens them (``--auth-open``), e.g. behind a mesh that authenticates
callers itself. Anything not listed (reflection, a future RPC) counts as ``metadata``.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from .methods import OPENABLE, Access

log = logging.getLogger(__name__)

TOKEN_ENV = "VISIONSERVE_AUTH_TOKEN"


def load_token(token_file: Path | None) -> str | None:
    """The bearer token from ``token_file`` (first line) or else $VISIONSERVE_AUTH_TOKEN, both
    trimmed the same way (surrounding whitespace, a trailing newline from ``echo`` or a
    Kubernetes secret, is not part of the token); None when neither is set (auth off)."""
    if token_file is not None:
        lines = read_secret(token_file, "--auth-token-file").decode().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"--auth-token-file {token_file} is empty; put the token on its "
                             "first line")
        return token
    raw = os.environ.get(TOKEN_ENV)
    if raw is None:
        return None
    token = raw.strip()
    if not token:
        raise ValueError(f"{TOKEN_ENV} is set but empty; unset it (no auth) or set the token")
    return token


class TokenCheck:
    """The bearer token in use and the access classes open without it; both front ends ask it
    (the gRPC interceptor, ``grpc/auth.py``, and the HTTP middleware)."""

    def __init__(self, token: str, open_classes: tuple[str, ...] = ()) -> None:
        unknown = set(open_classes) - set(OPENABLE)
        if unknown:
            raise ValueError(f"--auth-open {sorted(unknown)[0]!r} is not allowed; choose from "
                             f"{list(OPENABLE)} (health is always open, repository never)")
        self._expected = token.encode()  # replaced whole by set_token: calls see old or new
        self._open = {Access.HEALTH.value, *open_classes}

    def set_token(self, token: str) -> None:
        """Rotate the token (the file was reloaded): from now on only the new one is valid."""
        self._expected = token.encode()

    def is_open(self, access: str) -> bool:
        """Whether calls of this access class pass without the token."""
        return access in self._open

    def valid(self, presented: str | bytes) -> bool:
        """``Bearer <token>`` (the scheme is case-insensitive, RFC 7235), compared in constant
        time."""
        try:
            text = presented.encode() if isinstance(presented, str) else presented
        except UnicodeEncodeError:  # header bytes that are not UTF-8: no token of ours
            return False
        scheme, _, token = text.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                   self._expected)


class TokenFile:
    """Watches ``--auth-token-file``: a changed file (a rotated Kubernetes secret, an edit) or a
    SIGHUP reloads it into the token check, without a restart. A file that cannot be read or is
    empty keeps the token in use (and says so in the log)."""

    def __init__(self, path: Path, check: TokenCheck) -> None:
        self._path = path
        self._check = check
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int]:
        try:
            st = self._path.stat()  # follows the symlinks a mounted secret is made of
        except OSError:
            return (0, 0, 0)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def check(self, force: bool = False) -> bool:
        """Reload when the file changed (or ``force``); True when a new token is in use."""
        stamp = self._stamp()
        if stamp == self._seen and not force:
            return False
        self._seen = stamp
        try:
            token = load_token(self._path)
        except ValueError as exc:
            log.error("auth token not reloaded, the previous one stays in use: %s", exc)
            return False
        self._check.set_token(token or "")
        log.info("auth token reloaded from %s", self._path)
        return True


def read_secret(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
