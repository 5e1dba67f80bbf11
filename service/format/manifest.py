"""A version's manifest: ``manifest.json``, the last file an export writes into a version.

It lists every other file of the version folder (subfolders included) with its size and
sha256. A server loads a version that has one only when the folder holds exactly those files,
of those sizes (checked at every scan: a copy in progress, an rsync half done) and those
contents (checked before each load: a flipped byte, a file swapped). A version without one (a
folder copied by hand, KServe's ``/mnt/models``) loads unverified, with a log line saying so,
unless the server requires manifests (``--require-manifest``).

Every reason names the file relative to the version folder, never a host path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError

MANIFEST_FILE = "manifest.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20  # a version's manifest lists at most a thousand files
CHUNK = 1 << 20


@dataclass(frozen=True)
class ListedFile:
    path: str  # relative to the version folder, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[ListedFile, ...]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]},
            indent=2) + "\n"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_folder(version_dir: Path) -> Manifest:
    """The manifest of a version folder as it is now (every file but the manifest)."""
    files = []
    for folder, _, names in os.walk(version_dir):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(version_dir).as_posix()
            if rel != MANIFEST_FILE:
                files.append(ListedFile(rel, path.stat().st_size, sha256_of(path)))
    return Manifest(tuple(sorted(files, key=lambda f: f.path)))


def write_manifest(version_dir: Path) -> Manifest:
    """Describe ``version_dir`` and write its manifest into it (the last file written)."""
    manifest = describe_folder(version_dir)
    with open(version_dir / MANIFEST_FILE, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(version_dir: Path, where: str) -> Manifest | None:
    """The version's manifest, or None without one. Raises ConfigError (naming ``where``, the
    model and version) for a manifest that is not one."""
    path = version_dir / MANIFEST_FILE
    if not path.exists():
        return None
    fix = f"publish the version again (`visionserve export`) or remove {MANIFEST_FILE}"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ConfigError(f"{where}: {MANIFEST_FILE} is over {MAX_MANIFEST_BYTES} bytes; "
                              f"{fix}")
        document = json.loads(path.read_text(encoding="utf-8"))
        entries = document["files"]
        if document.get("format") != FORMAT or not isinstance(entries, list):
            raise ValueError("unknown format")
        files = tuple(ListedFile(_relative(e["path"]), int(e["size"]), str(e["sha256"]))
                      for e in entries)
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: {MANIFEST_FILE} cannot be read as a manifest "
                          f"({type(exc).__name__}); {fix}") from None
    return Manifest(files)


def check_listing(manifest: Manifest, sizes: dict[str, int], where: str) -> None:
    """The folder holds exactly the listed files, at the listed sizes (``sizes``: relative
    path → bytes, the manifest itself left out). Raises ConfigError naming the first file off."""
    listed = {f.path: f for f in manifest.files}
    if missing := sorted(listed.keys() - sizes.keys()):
        raise ConfigError(f"{where}: {missing[0]} is listed in {MANIFEST_FILE} but missing (a "
                          "copy still in progress?); it loads once every listed file is there")
    if extra := sorted(sizes.keys() - listed.keys()):
        raise ConfigError(f"{where}: {extra[0]} is not listed in {MANIFEST_FILE}; a version "
                          f"holds only the files its manifest lists: remove {extra[0]} or "
                          "publish the version again")
    for path, entry in sorted(listed.items()):
        if sizes[path] != entry.size:
            raise ConfigError(f"{where}: {path} is {sizes[path]} bytes, {MANIFEST_FILE} says "
                              f"{entry.size} (a partial or altered copy); it loads once the "
                              "file matches")


def verify_contents(version_dir: Path, manifest: Manifest, where: str) -> None:
    """Every listed file's sha256 matches (run before each load). Raises ConfigError."""
    for entry in manifest.files:
        try:
            actual = sha256_of(version_dir / entry.path)
        except OSError as exc:
            raise ConfigError(f"{where}: {entry.path} cannot be read to verify it "
                              f"({exc.strerror})") from None
        if actual != entry.sha256:
            raise ConfigError(f"{where}: {entry.path} does not match its sha256 in "
                              f"{MANIFEST_FILE} (altered or corrupted); refused. Publish the "
                              "version again")


def _relative(path: object) -> str:
    """A listed path: relative, "/"-separated, inside the version folder."""
    if not isinstance(path, str) or not path:
        raise ValueError("a path is not a string")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or str(pure) != path:
        raise ValueError("a path leaves the version folder")
    return path
