"""Object-store URIs (``s3://``, ``gs://``, ``az://``) as repositories, through one library.

The library is obstore (Python bindings of Apache Arrow's Rust ``object_store``, the crate
behind DataFusion and delta-rs): one wheel of ~10 MB with no Python dependencies speaks S3, GCS
and Azure, reads each cloud's standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``…, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_ACCOUNT_NAME``…),
retries with backoff and exposes conditional writes (``mode="create"``: If-None-Match), which a
version number's claim needs. fsspec with s3fs/gcsfs/adlfs would pull aiobotocore, the Google and
Azure SDKs (~100 MB) for the same calls (docs/deploy.md).

Credentials and endpoints come from the environment and the clouds' own files, never from a
flag. A reason built here never carries the store's URL, a request or a credential: the
library's messages do (signed URLs, debug dumps), so they go to the log at debug level only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

# the schemes served, by the environment prefix that configures each
SCHEMES = {"s3": "AWS_", "gs": "GOOGLE_", "az": "AZURE_", "abfs": "AZURE_"}
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?:/+(.*))?")  # "s3://" is "s3:" as a Path


@dataclass(frozen=True)
class StoreUri:
    scheme: str
    bucket: str
    prefix: str  # "" or "a/b", no slashes at either end

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def cache_root(self, cache_dir: Path) -> Path:
        """Where this store's copy lives under ``--cache-dir`` (one folder per URI)."""
        return cache_dir / self.scheme / self.bucket / self.prefix


def parse_uri(repo: Path | str) -> StoreUri | None:
    """The store URI that ``repo`` names (``s3://bucket/models``, which a Path has already
    folded to ``s3:/bucket/models``), or None for a local path. Raises ValueError for a URI
    this server cannot read, saying which it can."""
    match = _URI.fullmatch(str(repo))
    if match is None:
        return None
    scheme, rest = match.group(1).lower(), (match.group(2) or "").strip("/")
    if scheme not in SCHEMES:
        raise ValueError(f"--repo {scheme}://{rest}: {scheme}:// is not a repository this server "
                         f"reads; use a local folder or one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    bucket, _, prefix = rest.partition("/")
    parts = PurePosixPath(prefix).parts if prefix else ()
    if not bucket or any(p in (".", "..") for p in parts) or "//" in prefix:
        raise ValueError(f"--repo {scheme}://{rest}: name the bucket and, optionally, a prefix: "
                         f"{scheme}://BUCKET/PREFIX")
    return StoreUri(scheme, bucket, "/".join(parts))


def open_store(uri: StoreUri) -> Any:
    """An obstore store rooted at the URI's prefix, configured from the environment. A
    plain-HTTP ``AWS_ENDPOINT_URL`` (MinIO, a test server) is allowed as the user asked for it;
    ``AWS_CA_BUNDLE`` names the PEM roots of a private HTTPS endpoint."""
    from obstore.store import from_url

    # a stalled store is noticed within a minute (read_timeout: between two reads), while a
    # 330 MB file on a slow link may take its time (timeout: the whole request)
    options: dict[str, Any] = {"connect_timeout": "5s", "read_timeout": "60s",
                               "timeout": "3600s"}
    if uri.scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint.startswith("http://"):
            options["allow_http"] = True
        if bundle := os.environ.get("AWS_CA_BUNDLE"):
            try:
                options["root_certificate"] = Path(bundle).read_bytes()
            except OSError as exc:
                raise StoreError(f"AWS_CA_BUNDLE={bundle} cannot be read ({exc.strerror}); "
                                 "point it at a PEM file of the endpoint's CA") from None
    retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=60),
             "backoff": {"init_backoff": timedelta(milliseconds=200),
                         "max_backoff": timedelta(seconds=5), "base": 2}}
    try:
        return from_url(str(uri), client_options=options, retry_config=retry)
    except library_errors() as exc:
        raise StoreError(f"the store cannot be opened ({describe(exc)})") from None


class StoreError(ConfigError):
    """The store cannot be reached or read; the message is safe to show a client."""


def library_errors() -> tuple[type[BaseException], ...]:
    """What the library raises: its own errors, and the builtins it maps some to."""
    from obstore.exceptions import BaseError

    return (BaseError, OSError, ValueError, RuntimeError)


def describe(exc: BaseException) -> str:
    """A short reason for an object-store failure, without URL, request or credential (the
    library's own message, with all three, is logged at debug level)."""
    log.debug("object store: %r", exc)
    text = str(exc)
    name = type(exc).__name__
    if name == "UnauthenticatedError" or re.search(r"\b(401|ExpiredToken|InvalidAccessKeyId|"
                                                   r"SignatureDoesNotMatch)\b", text):
        return "the credentials were refused (expired or wrong?)"
    if name == "PermissionDeniedError" or re.search(r"\b(403|AccessDenied)\b", text):
        return "access denied: the credentials may not read this bucket or prefix"
    if missing := re.search(r"(\w{1,40}) must be specified", text):  # a setting left out
        return f"its {missing.group(1).lower()} is not set"
    if code := re.search(r"<Code>(\w{1,64})</Code>", text):
        return f"the store answered {code.group(1)}"
    if status := re.search(r"status code: (\d{3}(?: [A-Za-z ]{1,40})?)", text):
        return f"the store answered HTTP {status.group(1).strip()}"
    if isinstance(exc, FileNotFoundError) or name == "NotFoundError":
        return "not found"
    if re.search(r"certificate|UnknownIssuer|\btls\b", text, re.I):
        return ("the store's TLS certificate is not trusted (AWS_CA_BUNDLE names the PEM file of "
                "a private CA)")
    if re.search(r"timed? ?out|Timeout", text, re.I):
        return "the store did not answer in time"
    if re.search(r"connect|dns|resolve|refused|unreachable", text, re.I):
        return "the store's endpoint cannot be reached"
    return f"{name} from the store library (the server's log has its details at debug level)"


def list_objects(store: Any) -> dict[str, tuple[int, str]]:
    """Every object under the store's prefix: relative key → (size, e_tag or last_modified).
    Raises StoreError (with a safe reason) when the listing fails."""
    import obstore

    found: dict[str, tuple[int, str]] = {}
    try:
        for batch in obstore.list(store, chunk_size=1000):
            for meta in batch:
                found[meta["path"]] = (int(meta["size"]),
                                       str(meta.get("e_tag") or meta["last_modified"]))
    except library_errors() as exc:
        raise StoreError(f"the store cannot be listed ({describe(exc)})") from None
    return found
