"""Shared fixtures: real exported models, real servers in subprocesses, real HTTP scrapes.

The server always runs in its own process (as in production, and because Triton's client and
our KServe stubs cannot share one protobuf descriptor pool). Exported models are built once per
session with the public CLI (`visionserve export`) and copied into per-test repositories.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from visionserve.bench.launch import start_visionserve
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "tests" / ".cache"
TEST_MODELS = ("lenet5", "mobilenet_v3_small", "resnet18")
MAX_MESSAGE = 64 * 1024 * 1024

T = TypeVar("T")

INPROCESS = ROOT / "tests" / "inprocess"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The in-process tier (tests/inprocess) runs in a pytest process of its own, one that
    never imports tritonclient (tests/inprocess/conftest.py says why): a run over tests/ leaves
    it out; `pytest tests/inprocess` (`make test-unit`) runs it."""
    if collection_path != INPROCESS:
        return None
    asked = [Path(config.invocation_params.dir, a.split("::")[0]).resolve()
             for a in config.args]
    return not any(p == INPROCESS or INPROCESS in p.parents for p in asked)


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The `visionserve` console script, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "visionserve.service.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@functools.cache
def export_list(output: str = "table") -> subprocess.CompletedProcess[str]:
    """`visionserve export --list` (``output`` "table" or "json") as a script sees it: stdout a
    pipe, COLUMNS=80 (a table is never cut). Run once per output and test session: it builds
    all 42 architectures on PyTorch's meta device (15-35 s)."""
    result = run_cli("export", "--list", "-o", output, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result


# --- caches under tests/.cache, keyed by what made them ----------------------------------------

EXPORTS = CACHE / "exports"  # one folder per model export: <name>-<key16>, a model's folder
PINNED = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime")  # what export runs on
WEIGHT_SEEDS = {"resnet18": 1, "mobilenet_v3_small": 2}


def content_key(value: object) -> str:
    """sha256 of ``value`` as canonical JSON: the key of a cache entry, given what made it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pinned_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return {"python": sys.version.split()[0], **{n: installed(n) for n in names}}


def export_sources() -> dict[str, str]:
    """relative path -> sha256 of every file of export/ (modules and data, sorted by path), and of
    the modules of service/ that export/ imports (they write config.toml and the golden set)."""
    import re

    files = sorted(p for p in (ROOT / "export").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    imported: set[Path] = set()
    pattern = re.compile(r"^\s*from visionserve\.service((?:\.\w+)*) import (?:\(([^)]*)\)|(.*))",
                         re.M)
    for path in (p for p in files if p.suffix == ".py"):
        for package, listed, names in pattern.findall(path.read_text()):
            names = re.sub(r"#.*", "", listed or names)
            base = ROOT / "service" / Path(*package.split(".")[1:]) if package else \
                ROOT / "service"
            for candidate in [base] + [base / n.strip() for n in names.split(",") if n.strip()]:
                for module in (candidate.with_suffix(".py"), candidate / "__init__.py"):
                    if module.is_file():
                        imported.add(module)
    return {p.relative_to(ROOT).as_posix(): file_sha256(p) for p in files + sorted(imported)}


def _prune(folder: Path, prefix: str, keep: Path) -> None:
    """Remove the entries ``<prefix>-<16 hex>`` of ``folder`` other than ``keep`` (made by other
    versions of what they are keyed on), and their staging folders older than a day (left by a
    killed run; a younger one may be a concurrent session's)."""
    import re

    for old in folder.iterdir():
        stale_staging = old.name.startswith(f".tmp-{prefix}-") and \
            time.time() - old.stat().st_mtime > 86400
        if old != keep and (re.fullmatch(re.escape(prefix) + r"-[0-9a-f]{16}", old.name)
                            or stale_staging):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _publish_entry(staging: Path, entry: Path) -> None:
    """Move a finished ``staging`` folder to ``entry`` in one rename: an interrupted run leaves
    no half entry. If a concurrent session published the same key first, keep theirs."""
    try:
        os.rename(staging, entry)
    except OSError:
        if not entry.is_dir():
            raise


@contextlib.contextmanager
def _making(folder: Path, name: str) -> Iterator[None]:
    """Held while one session makes cache entries named ``name`` in ``folder``: a concurrent
    session (another pytest-xdist worker, another checkout's run) waits for it, then finds the
    entry made, instead of making it again. One lock file per name, kept."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f".lock-{name}").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _link_or_copy(src: str, dst: str) -> str:
    """Model files (large, never edited in place) hardlinked where the filesystem allows;
    anything small (config.toml, labels, golden set) copied, so an edit stays in its repository."""
    if os.path.getsize(src) >= 1 << 20:
        try:
            os.link(src, dst)
            return dst
        except OSError:  # another filesystem (a tmpfs /tmp), or links not allowed: copy
            pass
    return shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """State dicts made with torchvision directly (seeded), independent of our export code.
    ResNet-18's seeded init is alive as it is; MobileNet v3's is degenerate (logits ~1e-9), which
    export refuses (tests/test_real_answers.py). Cached in tests/.cache/weights-<key>, the key a
    sha256 of the torch/torchvision versions and the seeds."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    key = content_key({"versions": pinned_versions("torch", "torchvision"),
                       "seeds": WEIGHT_SEEDS})[:16]
    out = CACHE / f"weights-{key}"
    out.mkdir(parents=True, exist_ok=True)
    for name, seed in WEIGHT_SEEDS.items():
        path = out / f"{name}.pt"
        if not path.exists():
            torch.manual_seed(seed)
            model = getattr(torchvision.models, name)(weights=None)
            tmp = out / f".tmp-{name}-{os.getpid()}.pt"
            with tmp.open("wb") as f:  # a file object: the bytes do not depend on the file name
                torch.save(model.state_dict(), f)
            os.replace(tmp, path)  # whole or absent
    _prune(CACHE, "weights", out)
    return out


def export_args(name: str, weights_dir: Path) -> list[str]:
    """The CLI arguments of a test model's export (after ``export NAME --repo R --version 1``).
    LeNet-5 takes seeded random weights: its default (trained on digits at export) costs
    training time and no test of this repository depends on it (tests/test_real_answers.py
    exports the trained one itself)."""
    if name == "resnet18":  # test_classify compares it with torchvision directly
        return ["--weights", str(weights_dir / f"{name}.pt")]
    if name == "lenet5":
        return ["--random-weights"]
    return []


def cached_export(name: str, args: list[str], sources: dict[str, str]) -> Path:
    """The model folder of ``visionserve export NAME ARGS`` from tests/.cache/exports/, made
    there first if absent. Keyed by a sha256 of what made it: the export code (``sources``), the
    pinned versions, the architecture, the arguments, and the weights file's content."""
    import tempfile

    keyed_args = list(args)  # a weights file counts by its content, not its path
    for i in range(1, len(args)):
        if args[i - 1] == "--weights":
            keyed_args[i] = file_sha256(Path(args[i]))
    key = content_key({"architecture": name, "args": keyed_args, "sources": sources,
                       "versions": pinned_versions(*PINNED)})[:16]
    entry = EXPORTS / f"{name}-{key}"
    if entry.is_dir():  # an entry exists only whole (see _publish_entry)
        return entry
    with _making(EXPORTS, name):
        if entry.is_dir():  # made by a concurrent session meanwhile
            return entry
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=EXPORTS))
        try:
            result = run_cli("export", name, "--repo", str(staging), "--version", "1", *args)
            assert result.returncode == 0, result.stderr[-3000:]
            _publish_entry(staging / name, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return entry


@pytest.fixture(scope="session")
def exported_repo(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the test models exported through the CLI: each export cached across
    runs under tests/.cache/exports/ (keyed by content, see cached_export), the session's
    repository assembled from them (model files hardlinked where possible, the rest copied)."""
    sources = export_sources()
    repo = tmp_path_factory.mktemp("exported") / "repo"
    entries = {name: cached_export(name, export_args(name, weights_dir), sources)
               for name in TEST_MODELS}
    for name, entry in entries.items():
        shutil.copytree(entry, repo / name, copy_function=_link_or_copy)
    for name, entry in entries.items():
        _prune(EXPORTS, name, entry)
    return repo


def make_repo(src: Path, dst: Path, models: tuple[str, ...] = TEST_MODELS,
              overrides: dict[str, dict[str, object]] | None = None) -> Path:
    """Copy models from ``src`` into a fresh repository, editing their config.toml."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in models:
        shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        if overrides and name in overrides:
            edit_config(dst / name, overrides[name])
    return dst


def edit_config(model_dir: Path, values: dict[str, object]) -> None:
    """Set keys of a model's config.toml (``"batching.max_queue_delay_ms": 2.0``), in place."""
    path = model_dir / "config.toml"
    data = tomllib.loads(path.read_text())
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[leaf] = value
    path.write_text(_to_toml(data))


def _to_toml(data: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


class ServerClients:
    """Clients of a running server (gRPC channel and stub, the metrics scrape), whichever tier
    runs it: a subprocess here (``Server``), or the test's own process (tests/inprocess)."""

    grpc_port: int
    metrics_port: int
    http_port: int = 0  # the REST API's port (0: served without it)

    def open_clients(self) -> None:
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.stub = pb_grpc.VisionServiceStub(self.channel)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as reply:
            return reply.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, _, val = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(val)
        return total


@dataclass
class Server(ServerClients):
    """A `visionserve serve` subprocess on loopback, with clients to talk to it."""

    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int
    metrics_port: int
    http_port: int = 0  # the REST API's port (0: served without it)
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.open_clients()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def eventually(predicate: Callable[[], T], what: str, timeout: float = 60.0,
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail naming
    ``what`` after ``timeout`` seconds. The one polling helper of the suite: a bound against a
    hang, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)
    return value


def start_server(repo: Path, log_path: Path, *extra: str, python_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    """`visionserve serve` on loopback (free ports), ready and SERVING before it is returned."""
    launched = start_visionserve(repo, *extra, env=env, log_path=log_path,
                                 python_args=python_args, cwd=ROOT, ready_timeout_s=timeout)
    server = Server(launched.process, log_path, launched.grpc_port, launched.metrics_port,
                    launched.http_port)
    health = health_pb2_grpc.HealthStub(server.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    return server


@pytest.fixture(scope="session")
def server(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared server with the test models at their exported (default) configs."""
    srv = start_server(exported_repo, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture
def server_factory(exported_repo: Path, tmp_path: Path) -> Iterator:
    """Start servers with edited configs; all stopped at the end of the test."""
    started: list[Server] = []

    def start(models: tuple[str, ...] = TEST_MODELS,
              overrides: dict[str, dict[str, object]] | None = None, *extra: str) -> Server:
        repo = make_repo(exported_repo, tmp_path / f"repo{len(started)}", models, overrides)
        srv = start_server(repo, tmp_path / f"server{len(started)}.log", *extra)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


# --- the repository under load ---------------------------------------------------------

def publish(model_dir: Path, version: int, source: Path) -> None:
    """Publish a version by hand the way export does: a hidden folder, then one rename."""
    tmp = model_dir / f".tmp-{version}"
    shutil.copytree(source, tmp)
    os.rename(tmp, model_dir / str(version))


class Load:
    """``clients`` threads calling Classify in a loop; records (client, version, error)."""

    def __init__(self, server, request: pb.ClassifyRequest, clients: int = 16) -> None:
        self.replies: list[tuple[int, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(server, request, i))
                         for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, server, request: pb.ClassifyRequest, client: int) -> None:
        while not self._stop.is_set():
            try:
                reply = server.stub.Classify(request, timeout=30)
                self.replies.append((client, reply.version, ""))
            except grpc.RpcError as err:
                self.replies.append((client, 0, f"{err.code().name}: {err.details()}"))

    def versions_seen(self) -> set[int]:
        return {v for _, v, _ in list(self.replies)}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def errors(self) -> list[str]:
        return [e for _, _, e in self.replies if e]

    def monotonic_per_client(self) -> bool:
        """Once a client got an answer from the new version, it never gets the old one."""
        last: dict[int, int] = {}
        for client, version, error in self.replies:
            if error:
                continue
            if version < last.get(client, 0):
                return False
            last[client] = version
        return True



def key_and_cert(dir_: Path, name: str, issuer: tuple | None, *, ca: bool = False,
                 server: bool = False) -> tuple:
    """A throwaway EC key and certificate written as ``dir_/name.key`` and ``name.crt``: signed
    by ``issuer`` ((key, cert), None: self-signed), a CA's with ``ca``, valid for localhost and
    127.0.0.1 with ``server``. Returns (key, cert), an ``issuer`` for the next one."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[1].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    (dir_ / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (dir_ / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


# --- images -------------------------------------------------------------------------------

def photo(name: str) -> np.ndarray:
    """A real photo shipped inside scikit-image's wheel (no download)."""
    import skimage.data

    return getattr(skimage.data, name)()


def encode(pixels: np.ndarray, fmt: str = "JPEG", **save: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def tensor_image(array: np.ndarray, layout: int = pb.LAYOUT_UNSPECIFIED) -> pb.Image:
    from visionserve.service.cli.client import numpy_to_image

    return numpy_to_image(array, layout)


def embeddings(reply: pb.EmbedResponse) -> np.ndarray:
    from visionserve.service.cli.client import tensor_to_numpy

    return tensor_to_numpy(reply.embeddings)


class OrtReference:
    """The in-process engine on the same model file: what a served result must equal."""

    def __init__(self, model_file: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self.session.run(["logits", "embedding"], {"input": batch})
        return logits, embedding


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- what a user installs ------------------------------------------------------------------

LOCK = ROOT / "deploy" / "requirements" / "serve.txt"


@pytest.fixture(scope="session")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files of this checkout that git would commit (tracked, and untracked but not
    ignored), copied: what a fresh clone holds, without this tree's build/ or caches."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    dst = tmp_path_factory.mktemp("source") / "visionserve"
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def built_wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built as the Dockerfile builds it: `pip wheel --no-deps .` (build isolation:
    setuptools comes from the registry), in a copy of the checkout so no build/ folder of ours
    can slip stale modules in."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                             "--wheel-dir", str(out), str(source_copy)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (wheel,) = out.glob("visionserve-*.whl")
    return wheel


WHEELS = CACHE / "wheels"  # one folder per set of requirements: <name>-<key16>


def download_wheels(name: str, key: str, *requirements: str) -> Path:
    """tests/.cache/wheels/<name>-<key[:16]>: the wheels of ``requirements`` (pip's arguments:
    ``-r LOCK``, or ``-c CONSTRAINTS REQ...``), downloaded once (binary only; a lock's hashes
    checked) and reused by every venv of every run until ``key``, a sha256 of what decides
    them, changes. Published whole (a staging folder, then one rename); other keys pruned."""
    import tempfile

    folder = WHEELS / f"{name}-{key[:16]}"
    if folder.is_dir():
        return folder
    with _making(WHEELS, name):
        if folder.is_dir():  # downloaded by a concurrent session meanwhile
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=WHEELS))
        try:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                                     "--only-binary=:all:", "--dest", str(staging),
                                     *requirements],
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            _publish_entry(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _prune(WHEELS, name, folder)
    return folder


@pytest.fixture(scope="session")
def lock_wheels() -> Callable[[Path], Path]:
    """``lock_wheels(LOCK)``: the folder holding the wheels of a lock file, downloaded once with
    `pip download --only-binary=:all: -r LOCK` (hash-checked) and keyed by the lock's sha256;
    a venv installs from it with `--no-index --find-links FOLDER`."""
    return lambda lock: download_wheels(lock.stem, file_sha256(lock), "-r", str(lock))


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """name -> version of every requirement pinned in a lock file (names normalized)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            req = Requirement(line.rstrip(" \\"))
            (spec,) = req.specifier
            assert spec.operator == "==", f"{lock.name}: {line} is not pinned"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


# --- hypothesis: replayable by default --------------------------------------------------------
# "ci" (the default, and always when CI=true): derandomized (a test's examples follow from its
# source: the same on every run), bounded, no wall-clock deadline, and a failure prints the
# @reproduce_failure blob that replays it. "long" (VISIONSERVE_HYPOTHESIS_PROFILE=long, outside
# CI): ten times the examples from a random seed; a failure prints its blob (or its seed) too.
# Registered here, before any test module builds its own @settings from the loaded profile.
try:
    from hypothesis import HealthCheck as _HealthCheck
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # a dev dependency: the test modules that need it skip without it
    pass
else:
    _hypothesis_settings.register_profile(
        "ci", max_examples=100, derandomize=True, print_blob=True, deadline=None,
        database=None, suppress_health_check=[_HealthCheck.too_slow])
    _hypothesis_settings.register_profile(
        "long", max_examples=1000, derandomize=False, print_blob=True, deadline=None,
        suppress_health_check=[_HealthCheck.too_slow])
    _hypothesis_settings.load_profile(
        "ci" if os.environ.get("CI") == "true"
        else os.environ.get("VISIONSERVE_HYPOTHESIS_PROFILE", "ci"))
