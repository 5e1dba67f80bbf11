"""The CLI as scripts use it: `-o json` is one JSON document on stdout (logs on stderr), piped
tables are never cut, and exit codes follow the documented rule (0 ok, 1 failed, 2 usage)."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TEST_MODELS, encode, photo, run_cli
from visionserve.service.cli import build_parser


def commands() -> list[str]:
    """Every command of the CLI, read from its parser: a new command is covered unlisted."""
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee"):
        path = folder / f"{name}.jpg"
        path.write_bytes(encode(photo(name)))
        paths.append(str(path))
    return paths


def test_help_documents_the_exit_codes_of_every_command():
    # the parser was read (and these names, which scripts type, are still there)
    assert {"serve", "export", "classify", "embed", "models", "health", "bench"} <= \
        set(commands())
    for args in ((), *((c,) for c in commands())):
        text = " ".join(run_cli(*args, "--help").stdout.split())
        assert "exit status: 0 ok, 1 failed" in text and "2 usage" in text and \
            "130 interrupted" in text, args


def test_usage_errors_exit_2_and_failed_calls_exit_1(server):
    assert run_cli("serve", "--no-such-flag").returncode == 2
    assert run_cli("classify").returncode == 2  # images and --model are required
    missing = run_cli("models", "--server", "127.0.0.1:1", "-o", "json")
    assert missing.returncode == 1 and missing.stdout == "" and "UNAVAILABLE" in missing.stderr
    unknown = run_cli("classify", str(ROOT / "README.md"), "--model", "nope",
                      "--server", server.address, "-o", "json")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "NOT_FOUND" in unknown.stderr and "nope" in unknown.stderr


def _interactive() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_an_interrupted_command_exits_130():
    """Ctrl-C while `health` waits on a server that accepted the connection but never answers.

    The command runs as from an interactive shell: SIGINT at its default and not blocked. A child
    inherits both its parent's ignored signals (POSIX shells ignore SIGINT in background jobs)
    and the forking thread's signal mask, and a process that starts with SIGINT ignored or
    blocked rightly never sees Ctrl-C: that was the test's environment, not the command."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        process = subprocess.Popen(
            [sys.executable, "-m", "visionserve.service.cli", "health", "--server",
             f"127.0.0.1:{silent.getsockname()[1]}", "--timeout-s", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_interactive)
        connection, _ = silent.accept()  # the client is inside its call now
        with connection:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_models_json_is_the_list_models_reply(server):
    result = run_cli("models", "--server", server.address, "-o", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    by_name = {m["name"]: m for m in document["models"]}
    assert set(TEST_MODELS) <= set(by_name)
    assert by_name["resnet18"]["state"] == "MODEL_STATE_READY"
    # our JSON, as REST writes it: a version is a number (protobuf's JSON mapping: a string)
    assert by_name["resnet18"]["versions"][0]["version"] == 1
    # where the weights came from: lenet5 a seeded random init, resnet18 a file of weights
    assert by_name["lenet5"]["versions"][0]["weights"].startswith(
        "random weights (seeded random init (seed ") and \
        by_name["lenet5"]["versions"][0]["weights"].endswith("answers and labels are meaningless")
    assert by_name["resnet18"]["versions"][0]["weights"].startswith("file resnet18.pt (sha256 ")
    table = run_cli("models", "--server", server.address)
    assert "resnet18" in table.stdout and "ready" in table.stdout
    assert "random weights" in table.stdout and "meaningless" in table.stdout


def test_classify_json_holds_each_files_top_k_in_order(server, photos):
    result = run_cli("classify", *photos, "--model", "resnet18", "--top-k", "3",
                     "--server", server.address, "-o", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"] == "resnet18" and len(document["results"]) == len(photos)
    assert document["version"] == 1 and document["weights"].startswith("file resnet18.pt")
    for result_ in document["results"]:
        scores = [c["score"] for c in result_["classes"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(isinstance(c["label"], str) and c["label"] for c in result_["classes"])


def test_embed_json_holds_every_vector_in_full(server, photos):
    result = run_cli("embed", *photos, "--model", "resnet18", "--server", server.address,
                     "-o", "json")
    assert result.returncode == 0, result.stderr
    embeddings = json.loads(result.stdout)["embeddings"]
    vectors = np.array(embeddings["values"], dtype=np.float32)
    assert embeddings["shape"] == [2, 512] and vectors.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_health_json(server):
    result = run_cli("health", "--server", server.address, "-o", "json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"server": server.address, "service": "",
                                         "status": "SERVING"}
    model = run_cli("health", "--server", server.address, "--service", "nope", "-o", "json")
    assert model.returncode == 1 and model.stdout == ""


def test_every_commands_help_shows_each_options_default():
    """Users asked: ``--help`` of every command (serve, export, the client and bench commands)
    shows each option's default, where it has one (a flag off by default shows none)."""
    from visionserve.bench.cli import build_parser as bench_parser
    from visionserve.service.cli import BENCH_COMMANDS

    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in sub.choices.items() if name not in BENCH_COMMANDS}
    parsers |= {name: bench_parser(name) for name in BENCH_COMMANDS}
    assert {"serve", "export", "classify", "bench", "bench-ladder"} <= set(parsers)
    for name, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (
                    None, False, [], (), argparse.SUPPRESS) and action.help != argparse.SUPPRESS:
                assert "(default: " in text.split(action.option_strings[-1], 1)[1], \
                    (name, action.option_strings)


def test_a_flag_whose_meaning_differs_by_command_reads_its_own_variable(monkeypatch):
    """export's --version names the version it publishes, classify's the one it asks for:
    a client's VISIONSERVE_CLASSIFY_VERSION never changes what export publishes."""
    monkeypatch.setenv("VISIONSERVE_CLASSIFY_VERSION", "3")
    monkeypatch.setenv("VISIONSERVE_VERSION", "9")  # the old shared name: read by neither
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["classify"].parse_args(["--model", "m", "x.jpg"]).version == 3
    assert sub.choices["export"].parse_args(["lenet5"]).version is None
    assert sub.choices["embed"].parse_args(["--model", "m", "x.jpg"]).version == 0
    assert "VISIONSERVE_EXPORT_VERSION" in " ".join(sub.choices["export"].format_help().split())
