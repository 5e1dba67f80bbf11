"""A user's own mistakes on the command line end in one clear line and a usage exit status
(2, or 1 for a file that is there but wrong), never a Python traceback: every command of the CLI
is walked with the mistakes users make (a file that is not there, a folder for a file, the wrong
kind of file, a typo in a name, a peer that is not installed, a server that is not running).

Short form (``make test``, CI): every mistake of the commands that need no PyTorch, the first
two of those that do; VISIONSERVE_LONG_TESTS=1 (``make test-all``) walks them all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli import commands

from conftest import ROOT, run_cli

NO_SERVER = ("--server", "127.0.0.1:1")  # nothing listens on port 1
SERVE = ("serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder, a text file, a name that is not there."""
    folder = tmp_path_factory.mktemp("mistakes")
    (folder / "notes.txt").write_text("not an image, not weights\n")
    return {"dir": folder, "text": folder / "notes.txt", "missing": folder / "nope.jpg"}


@pytest.fixture(scope="module")
def whole_model(files: dict[str, Path]) -> Path:
    """A whole model pickled where a state_dict belongs (needs PyTorch)."""
    torch = pytest.importorskip("torch")
    import torchvision

    torch.save(torchvision.models.resnet18(), files["dir"] / "whole.pt")
    return files["dir"] / "whole.pt"


# (command line with {dir}, {text}, {missing}, {whole}, {repo} placeholders, exit status,
# what the one line says)
MISTAKES = [
    (("classify", "--model", "m", "{missing}", *NO_SERVER), 2, "image {missing}: no such file"),
    (("classify", "--model", "m", "{dir}", *NO_SERVER), 2, "is a directory: pass the files in"),
    (("classify", "--model", "m", "{text}", "--tls-ca", "{missing}"), 2,
     "--tls-ca {missing}: no such file"),
    (("classify", "--model", "m", "{text}", "--auth-token-file", "{missing}"), 2,
     "--auth-token-file {missing}: cannot read it"),
    (("classify", "--model", "m", "{text}", *NO_SERVER), 1,
     "is a server running at 127.0.0.1:1? Start one with `visionserve serve`"),
    (("embed", "--model", "m", "{missing}", *NO_SERVER), 2, "image {missing}: no such file"),
    (("models", *NO_SERVER), 1, "is a server running at 127.0.0.1:1?"),
    (("health", *NO_SERVER), 1, "127.0.0.1:1: UNAVAILABLE"),
    ((*SERVE, "--repo", "{missing}"), 2, "--repo {missing}: no such folder"),
    ((*SERVE, "--repo", "{text}"), 2, "--repo {text}: not a folder"),
    ((*SERVE, "--repo", "ftp://bucket/models"), 2,
     "--repo ftp://bucket/models: ftp:// is not a repository this server reads; use a local "
     "folder or one of s3://, gs://, az://, abfs://"),
    ((*SERVE, "--repo", "s3://"), 2, "name the bucket and, optionally, a prefix"),
    ((*SERVE, "--repo", "{repo}", "--grpc-port", "99999"), 2,
     "--grpc-port 99999: a TCP port is 0-65535"),
    ((*SERVE, "--repo", "{repo}", "--max-message-bytes", "-5"), 2,
     "--max-message-bytes must be >= 0, got -5"),
    ((*SERVE, "--repo", "{repo}", "--tls-cert", "{missing}", "--tls-key", "{missing}"), 2,
     "--tls-cert {missing}: cannot read it"),
    ((*SERVE, "--repo", "{repo}", "--host", "999.1.1.1"), 2,
     "is --host an address of this machine?"),
    (("export", "lenet5", "--repo", "ftp://bucket/models"), 2,  # never a local folder "ftp:"
     "--repo ftp://bucket/models: ftp:// is not a repository this server reads"),
    (("export", "resnet18", "--repo", "{dir}", "--weights", "{whole}"), 1,
     "this file is a pickled ResNet object (torchvision.models.resnet.ResNet), not a "
     "state_dict; re-save it with torch.save(model.state_dict(), path)"),
    (("export", "resnet9000", "--repo", "{dir}"), 2,
     "unknown architecture 'resnet9000'; did you mean resnet50"),
    (("export", "lenet5", "--repo", "{dir}", "--weights", "{missing}"), 2,
     "--weights {missing}: no such file"),
    (("export", "lenet5", "--repo", "{dir}", "--weights", "{dir}"), 2,
     "--weights {dir} is a directory"),
    (("export", "lenet5", "--repo", "{dir}", "--labels", "{missing}"), 2,
     "--labels {missing}: no such file"),
    (("export", "lenet5", "--repo", "{dir}", "--weights", "{text}"), 1,
     "--weights {text} is not a PyTorch file"),
    (("train-digits", "--out", "{dir}"), 2, "--out {dir}: cannot write it (a folder)"),
    (("bench", "--model", "lenet5", "--repo", "{repo}", "--peer", "triton", "--triton-python",
      "{missing}"), 2, "--peer triton: no Python with nvidia-pytriton at {missing}"),
    (("bench", "--model", "nosuch", "--repo", "{repo}"), 2,
     "no version of nosuch in {repo}; run `visionserve export nosuch --repo {repo}` first"),
    (("bench-overload", "--model", "nosuch", "--repo", "{repo}"), 2, "no version of nosuch"),
    (("bench-attacks", "--model", "nosuch", "--repo", "{repo}"), 2,
     "nosuch/config.toml: missing"),
    (("bench-decode", "--model", "nosuch", "--repo", "{repo}"), 2, "no version of nosuch"),
    (("bench-int8", "--model", "nosuch"), 2, "unknown architecture 'nosuch'"),
    (("bench-ladder", "--model", "resnet18"), 2, "unrecognized arguments: --model resnet18"),
    (("bench-ladder", "--models", "nosuch"), 2, "unknown architecture 'nosuch'"),
    (("bench-fleet", "--model", "nosuch", "--repo", "{repo}"), 2,
     "no version of nosuch in {repo}; run `visionserve export nosuch --repo {repo}` first"),
    (("bench-signal", "--models", "nosuch", "--repo", "{repo}"), 2,
     "no version of nosuch in {repo}; run `visionserve export nosuch --repo {repo}` first"),
    (("bench-signal", "--models", "lenet5", "--repo", "{repo}", "--levels", "half"), 2,
     "--levels half: give fractions of capacity above 0"),
    (("bench-store", "--models", "lenet5,nosuch", "--repo", "{repo}"), 2,
     "no version of nosuch in {repo}; run `visionserve export nosuch --repo {repo}` first"),
    (("bench-store", "--repo", "{repo}", "--models", "lenet5", "--servers", "0"), 2,
     "--servers 0: give at least 1"),
]


LONG = os.environ.get("VISIONSERVE_LONG_TESTS") == "1"
# a command that imports PyTorch takes seconds to start: in the short form, its first two
TORCH = ("export", "train-digits", "bench-int8", "bench-ladder")
WALKED = MISTAKES if LONG else [
    m for i, m in enumerate(MISTAKES)
    if m[0][0] not in TORCH or sum(n[0][0] == m[0][0] for n in MISTAKES[:i]) < 2]


def test_every_command_is_walked_with_its_mistakes():
    assert {args[0] for args, _, _ in WALKED} == set(commands())


@pytest.mark.parametrize(("args", "status", "says"), WALKED,
                         ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _, _) in enumerate(WALKED)])
def test_a_mistake_ends_in_one_clear_line_and_no_traceback(args, status, says, files,
                                                           exported_repo, request):
    values = {**{k: str(v) for k, v in files.items()}, "repo": str(exported_repo)}
    if any("{whole}" in a for a in args):
        values["whole"] = str(request.getfixturevalue("whole_model"))
    result = run_cli(*(a.format(**values) for a in args), timeout=300)
    assert not list(ROOT.glob("*:")), "a URI became a local folder"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == status, result.stderr[-2000:]
    assert says.format(**values) in result.stderr, result.stderr[-2000:]
