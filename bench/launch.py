"""Start the servers a bench run talks to, each in its own process, and wait until they serve.

``start_visionserve`` is the one way our tools start a server from Python (the bench, the swap
script, the tests): it passes ``--ready-file`` and waits for that JSON document, which the server
writes (atomically) only once every model loaded at start-up is ready, with the ports it bound.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from visionserve.service.cli.mistakes import CommandError
from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.repository import version_numbers

TRITON_PEER = Path(__file__).with_name("triton_peer.py")
# a repository made by ``single_model_repo`` links into the source repository on purpose
LINKED_REPO = ("--allow-symlinks-outside-repo",)


@dataclass
class Launched:
    """A server subprocess: its ports and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int
    metrics_port: int = 0
    ready_file: Path | None = None  # visionserve's --ready-file
    http_port: int = 0  # its HTTP (REST) port; 0 = none

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_visionserve(repo: Path, *extra_args: str, name: str = "visionserve",
                      env: dict[str, str] | None = None, log_path: Path | None = None,
                      python_args: tuple[str, ...] = (), cwd: Path | None = None,
                      ready_timeout_s: float = 300.0,
                      command: tuple[str, ...] = ()) -> Launched:
    """``visionserve serve --repo REPO`` on loopback (plus ``extra_args``), returned once it is
    SERVING. Its gRPC, HTTP and metrics ports are 0 (the server binds any free one, so no port is
    picked here and raced for by another process before the server binds it); the ports it
    bound are read back from its ``--ready-file``. ``command`` replaces ``python -m
    visionserve.service.cli`` (e.g. the console script of another venv)."""
    if log_path is None:
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        os.close(fd)
        log_path = Path(path)
    ready_file = log_path.with_name(log_path.name + ".ready.json")
    ready_file.unlink(missing_ok=True)
    launcher = list(command) or [sys.executable, *python_args, "-m", "visionserve.service.cli"]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [*launcher, "serve", "--repo", str(repo), "--host", "127.0.0.1", "--grpc-port", "0",
             "--http-port", "0", "--metrics-port", "0", "--ready-file", str(ready_file),
             *extra_args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if ready_file.exists() and process.poll() is None:
            ready = json.loads(ready_file.read_text())
            if ready["pid"] != process.pid:
                raise RuntimeError(f"{ready_file} was written by process {ready['pid']}, not by "
                                   f"{name} ({process.pid})")
            return Launched(name, process, log_path, ready["grpc_port"], ready["metrics_port"],
                            ready_file, http_port=ready.get("http_port") or 0)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} before "
                               f"serving; its log ({log_path}) ends:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{name} was not serving after {ready_timeout_s:.0f} s; see {log_path}")


def checkout_env(checkout: Path, workdir: Path) -> dict[str, str]:
    """The environment that makes ``python -m visionserve.service.cli`` run the server code of
    another checkout of this project (e.g. a ``git worktree`` of an earlier commit, to measure
    before and after in one run): a ``PYTHONPATH`` folder linking its packages under
    ``visionserve``, found before this install's editable finder. The rest (export, bench)
    stays this checkout's."""
    shim = workdir / "checkout-path" / "visionserve"
    shim.mkdir(parents=True, exist_ok=True)
    for name, folder in (("service", "service"), ("v1", "proto/visionserve/v1"),
                         ("inference", "proto/visionserve/inference")):
        link = shim / name
        if not link.exists():
            link.symlink_to((checkout / folder).resolve(), target_is_directory=True)
    return {"PYTHONPATH": str(shim.parent)}


def single_model_repo(repo: Path, model: str, dst: Path, *, max_batch_size: int | None = None,
                      overrides: dict[str, str] | None = None) -> Path:
    """A repository holding only ``model``'s newest version (linked, not copied), optionally with
    ``max_batch_size`` overridden ("batching off" is the same server with ``max_batch_size = 1``)
    and other config keys (``{"instance_count": "2", "onnxruntime.intra_op_threads": "1"}``,
    values in TOML syntax), checked like any config.toml. Serve it with ``LINKED_REPO`` among
    the server's flags: its files are links out of it.
    """
    src = repo / model
    versions = version_numbers(src)
    if not versions:
        raise CommandError(f"no version of {model} in {repo}; run `visionserve export "
                           f"{model} --repo {repo}` first")
    config = ModelConfig.from_toml(src / "config.toml")
    if overrides:
        raw = tomllib.loads(config.to_toml())
        for key, text in overrides.items():
            section, _, leaf = key.rpartition(".")
            value = tomllib.loads(f"v = {text}")["v"]
            (raw.setdefault(section, {}) if section else raw)[leaf] = value
        config = ModelConfig.from_dict(raw, f"{model} config with {overrides}")
    if max_batch_size is not None:
        batching = config.batching
        preferred = tuple(b for b in batching.preferred_batch_sizes if b <= max_batch_size)
        config = dataclasses.replace(
            config, max_batch_size=max_batch_size,
            warmup_batch_sizes=tuple(b for b in config.warmup_batch_sizes
                                     if b <= max_batch_size) or (1,),
            batching=dataclasses.replace(batching, preferred_batch_sizes=preferred))
    out = dst / model
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.toml").write_text(config.to_toml())
    for extra in src.iterdir():  # labels and other model-level files
        if extra.is_file() and extra.name != "config.toml":
            (out / extra.name).symlink_to(extra.resolve())
    newest = versions[-1]
    (out / str(newest)).symlink_to((src / str(newest)).resolve(), target_is_directory=True)
    return dst


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (Linux /proc), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def free_port() -> int:
    """A port free now: another process may take it before the caller's child binds it. Only
    for peers that cannot bind port 0 and report what they bound (Triton, below); a visionserve
    server binds port 0 and says its ports in its --ready-file (``start_visionserve``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_triton_python() -> Path:
    anchors = Path(os.environ.get("ANCHORS_DIR", Path.home() / ".cache/visionserve-anchors"))
    return anchors / "venv-triton" / "bin" / "python"


def check_triton_python(python: Path) -> None:
    """The peer's interpreter is there, or a ``CommandError`` saying how to make it."""
    if not python.exists():
        raise CommandError(
            f"--peer triton: no Python with nvidia-pytriton at {python}; create one with "
            f"`python3.11 -m venv {python.parent.parent} && {python.parent}/pip install "
            "nvidia-pytriton onnxruntime numpy`, or pass --triton-python")


def start_triton(python: Path, onnx_path: Path, model: str, *, input_name: str,
                 shape: tuple[int, int, int], dtype: str, mean: tuple[float, ...],
                 std: tuple[float, ...], batching: bool, max_batch_size: int, threads: int,
                 ready_timeout_s: float = 300.0) -> Launched:
    """The real ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, serving the same ONNX
    file through its Python backend and dynamic batcher (see ``triton_peer.py``), run by the
    interpreter of a venv that has ``nvidia-pytriton`` (its pins clash with ours)."""
    check_triton_python(python)
    # picked here, not port 0: PyTriton's tritonserver is given its ports and reports none back
    # (its READY line carries no port)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log_path = Path(tempfile.mkstemp(prefix=f"triton-{model}-", suffix=".log")[1])
    env = dict(os.environ)
    # The backend stub links libpython: it must find the venv interpreter's own copy first.
    libdir = subprocess.run([str(python), "-c", "import sysconfig;print(sysconfig."
                             "get_config_var('LIBDIR') or '')"], capture_output=True,
                            text=True, check=False).stdout.strip() or sysconfig.get_config_var(
                                "LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = ":".join([libdir, *filter(None, env.get(
            "LD_LIBRARY_PATH", "").split(":"))])
    args = [str(python), str(TRITON_PEER), "--onnx", str(onnx_path), "--model-name", model,
            "--input-name", input_name, "--shape", ",".join(map(str, shape)), "--dtype", dtype,
            "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)),
            "--batching", "on" if batching else "off", "--max-batch", str(max_batch_size),
            "--threads", str(threads), "--grpc-port", str(grpc_port),
            "--http-port", str(http_port), "--metrics-port", str(metrics_port)]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + ready_timeout_s
    name = f"triton (batching {'on' if batching else 'off'})"
    while time.monotonic() < deadline:
        if "READY" in log_path.read_text(errors="replace"):
            return Launched(name, process, log_path, grpc_port, metrics_port)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited before serving; its log ({log_path}) ends:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{name} was not serving after {ready_timeout_s:.0f} s; see {log_path}")
