"""A bad model folder fails that model alone (issue 17), through a real server and the repository on
disk: at start-up and while polling, every fault gets a reason naming the file relative to the
repository and the other models load, update and serve; a broken newest version leaves the newest
one that loads serving; paths stay inside the repository; requests during start-up get only codes
a client retries."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, encode, eventually, make_repo, photo, start_server
from visionserve.service.repository import scan
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

LENET_X = np.zeros((1, 32, 32), np.float32)  # CHW for lenet5's one channel
POLL = ("--poll-interval-s", "0.3")
# 150 examples under the default hypothesis profile ("ci": 100; see tests/conftest.py), ten
# times that under "long"
EXAMPLES = 150 * settings.default.max_examples // 100


def classify(srv, model: str = "lenet5", version: int = 0, timeout: float = 30):
    return srv.stub.Classify(pb.ClassifyRequest(model=model, version=version, images=[pb.Image(
        tensor=pb.Tensor(shape=[1, 32, 32], dtype=pb.DTYPE_FLOAT32, data=LENET_X.tobytes()))]),
        timeout=timeout)


def model(srv, name: str) -> pb.ModelInfo:
    return srv.stub.GetModel(pb.GetModelRequest(model=name), timeout=10)


def versions(info: pb.ModelInfo) -> dict[int, tuple[int, str]]:
    return {v.version: (v.state, v.reason) for v in info.versions}


# --- the faults: each function breaks a copy of lenet5 named after it ---------------------------

def labels_not_utf8(folder: Path) -> str:
    (folder / "labels.txt").write_bytes(b"\xff\xfe\x00not text")
    return "labels_not_utf8/labels.txt is not UTF-8 text"


def labels_unreadable(folder: Path) -> str:
    (folder / "labels.txt").unlink()
    (folder / "labels.txt").mkdir()  # unreadable as a file, whoever runs the test
    (folder / "labels.txt" / "x").write_text("x")
    return "labels_unreadable/labels.txt cannot be read"


def config_is_a_directory(folder: Path) -> str:
    (folder / "config.toml").unlink()
    (folder / "config.toml").mkdir()
    return "config_is_a_directory/config.toml: cannot be read (Is a directory)"


def warmup_not_a_table(folder: Path) -> str:
    text = (folder / "config.toml").read_text()
    (folder / "config.toml").write_text("warmup = 5\n" + text.replace("[warmup]", "[unused]"))
    return "warmup_not_a_table/config.toml: [warmup] must be a table, got 5"


def batch_sizes_not_numbers(folder: Path) -> str:
    text = (folder / "config.toml").read_text()
    (folder / "config.toml").write_text(re.sub(r"(?m)^preferred_batch_sizes = .*$",
                                               'preferred_batch_sizes = ["a"]', text))
    return "batching.preferred_batch_sizes must be a list of int, got ['a']"


def version_named_superscript_two(folder: Path) -> str:
    (folder / "1").rename(folder / "²")  # "²".isdigit() is true; int("²") raises
    return "no version folder with a model.onnx under version_named_superscript_two"


def labels_linked_outside(folder: Path) -> str:
    secret = folder.parent.parent / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (folder / "labels.txt").unlink()
    (folder / "labels.txt").symlink_to(secret)
    return ("labels_linked_outside/labels.txt resolves outside the repository (a symbolic "
            "link); refused. If your volume layout links outside on purpose, start the server "
            "with --allow-symlinks-outside-repo")


def model_file_linked_outside(folder: Path) -> str:
    outside = folder.parent.parent / "weights.onnx"
    shutil.copy(folder / "1" / "model.onnx", outside)
    (folder / "1" / "model.onnx").unlink()
    (folder / "1" / "model.onnx").symlink_to(outside)
    return "model_file_linked_outside/1/model.onnx resolves outside the repository"


FAULTS = (labels_not_utf8, labels_unreadable, config_is_a_directory, warmup_not_a_table,
          batch_sizes_not_numbers, version_named_superscript_two, labels_linked_outside,
          model_file_linked_outside)


def break_copies(exported_repo: Path, repo: Path) -> dict[str, str]:
    """One broken copy of lenet5 per fault, plus a model folder linked to /etc. Each is made
    beside the repository and moved in whole, as a poll may scan at any moment."""
    expected = {}
    staging = repo.parent / "staging"
    staging.mkdir(exist_ok=True)
    for fault in FAULTS:
        shutil.copytree(exported_repo / "lenet5", staging / fault.__name__)
        expected[fault.__name__] = fault(staging / fault.__name__)
        (staging / fault.__name__).rename(repo / fault.__name__)
    (repo / "etc").symlink_to("/etc", target_is_directory=True)
    expected["etc"] = "etc resolves outside the repository (a symbolic link); refused"
    return expected


def assert_failed_alone(srv, expected: dict[str, str]) -> None:
    assert classify(srv).results  # the good model serves
    for name, reason in expected.items():
        info = model(srv, name)
        assert info.state == pb.MODEL_STATE_FAILED, (name, info)
        assert reason in info.reason, (name, info.reason)
        assert str(ROOT) not in info.reason and "/tmp" not in info.reason  # no host paths
        with pytest.raises(grpc.RpcError) as err:
            classify(srv, name)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name


def test_every_bad_folder_fails_alone_at_start_up(exported_repo, tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    expected = break_copies(exported_repo, repo)
    srv = start_server(repo, tmp_path / "server.log")
    try:
        assert_failed_alone(srv, expected)
        assert srv.metric("visionserve_model_load_failures_total", model="config_is_a_directory") \
            == 1
    finally:
        srv.stop()


def test_bad_folders_appearing_while_polling_never_stop_other_models_updating(exported_repo,
                                                                              tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    srv = start_server(repo, tmp_path / "server.log", *POLL)
    try:
        expected = break_copies(exported_repo, repo)
        eventually(lambda: {m.name for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
                   >= set(expected), "the bad folders to be scanned")
        publish_copy(repo / "lenet5", 1, 2)  # a new version of the good model still lands
        eventually(lambda: classify(srv).version == 2, "lenet5 version 2 to serve")
        assert_failed_alone(srv, expected)
    finally:
        srv.stop()


def publish_copy(folder: Path, source: int, version: int) -> None:
    """Publish a copy of one version as another, the way export does (a hidden folder, renamed)."""
    tmp = folder / f".tmp-{version}"
    shutil.copytree(folder / str(source), tmp)
    tmp.rename(folder / str(version))


def test_a_broken_newest_version_leaves_the_newest_that_loads_serving(exported_repo, tmp_path):
    """Cold start with version 2 corrupt: version 1 serves and version 2 is reported failed (the
    reason in GetModel, the state metric); fixing version 2's file retries it on the next poll,
    and it replaces version 1."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    publish_copy(repo / "lenet5", 1, 2)
    good = (repo / "lenet5" / "2" / "model.onnx").read_bytes()
    (repo / "lenet5" / "2" / "model.onnx").write_bytes(good[: len(good) // 2])  # cut short
    srv = start_server(repo, tmp_path / "server.log", *POLL)
    try:
        assert classify(srv).version == 1
        states = versions(model(srv, "lenet5"))
        assert states[1][0] == pb.MODEL_STATE_READY
        assert states[2][0] == pb.MODEL_STATE_FAILED and "model.onnx" in states[2][1]
        assert srv.metric("visionserve_model_state", model="lenet5", version="2",
                          state="failed") == 1
        with pytest.raises(grpc.RpcError) as err:
            classify(srv, version=2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model lenet5 version 2 failed to load" in err.value.details()
        assert "serving version 1 in place of a newer version that failed" in srv.log()
        (repo / "lenet5" / "2" / "model.onnx").write_bytes(good)  # completed: same name
        eventually(lambda: classify(srv).version == 2, "the fixed version 2 to serve")
        eventually(lambda: set(versions(model(srv, "lenet5"))) == {2}, "version 1 to retire")
    finally:
        srv.stop()


def test_any_file_of_a_failed_version_changing_retries_it(exported_repo, tmp_path):
    """A version whose labels.txt is not UTF-8 fails; rewriting only that file retries it."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    labels = repo / "lenet5" / "1" / "labels.txt"
    exported = labels.read_text()
    labels.write_bytes(b"\xff\xfe")
    srv = start_server(repo, tmp_path / "server.log", *POLL)
    try:
        state, reason = versions(model(srv, "lenet5"))[1]
        assert state == pb.MODEL_STATE_FAILED
        assert "lenet5/1/labels.txt is not UTF-8 text" in reason
        labels.write_text(exported)  # other labels would miss the golden check
        eventually(lambda: model(srv, "lenet5").state == pb.MODEL_STATE_READY,
                   "the version to load once its labels are fixed")
        assert classify(srv).results[0].classes[0].label in exported.split()
    finally:
        srv.stop()


def test_links_outside_are_followed_only_when_the_operator_says_so(exported_repo, tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    outside = tmp_path / "shared-labels.txt"
    outside.write_text("\n".join(f"shared {i}" for i in range(10)) + "\n")
    (repo / "lenet5" / "labels.txt").unlink()
    (repo / "lenet5" / "labels.txt").symlink_to(outside)
    (repo / "lenet5" / "1" / "labels.txt").unlink(missing_ok=True)
    shutil.rmtree(repo / "lenet5" / "1" / "golden")  # hand-assembled: labels from elsewhere
    srv = start_server(repo, tmp_path / "server.log", "--allow-symlinks-outside-repo")
    try:
        assert classify(srv).results[0].classes[0].label.startswith("shared ")
    finally:
        srv.stop()


def test_model_control_refuses_an_empty_name_and_load_parameters(exported_repo, tmp_path):
    from tritonclient.grpc import service_pb2 as kpb
    from tritonclient.grpc import service_pb2_grpc as kpb_grpc

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "explicit",
                       "--trust-network")
    try:
        stub = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
        for call, request in ((stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest()),
                              (stub.RepositoryModelUnload, kpb.RepositoryModelUnloadRequest())):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "model_name is empty" in err.value.details()
        index = stub.RepositoryIndex(kpb.RepositoryIndexRequest()).models
        assert "" not in [m.name for m in index]  # no phantom model for the repository root
        with_config = kpb.RepositoryModelLoadRequest(model_name="lenet5")
        with_config.parameters["config"].string_param = '{"max_batch_size": 1}'
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(with_config, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "RepositoryModelLoad parameters (config) are not supported" in err.value.details()
    finally:
        srv.stop()


def test_start_up_answers_only_what_clients_retry(exported_repo, tmp_path):
    """Clients calling from the moment the port opens, while three models load (ResNet-18 warms
    up at batch 32 three times: seconds): every answer is OK or UNAVAILABLE (retry), never
    FAILED_PRECONDITION or NOT_FOUND; each client ends with 20 answers."""
    models = ("lenet5", "mobilenet_v3_small", "resnet18")
    repo = make_repo(exported_repo, tmp_path / "repo", models,
                     {"resnet18": {"warmup.batch_sizes": [1, 32, 32, 32]}})
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "visionserve.service.cli", "serve", "--repo", str(repo),
         "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    codes: Counter[str] = Counter()

    def listening() -> re.Match | None:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        return re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", log_path.read_text())

    def hammer(port: int, name: str) -> None:
        # should a connection fail, reconnect within 50 ms (gRPC's default backoff is a second
        # and more, which would skip the start-up window)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 50)])
        stub = pb_grpc.VisionServiceStub(channel)
        request = pb.ClassifyRequest(model=name, images=[pb.Image(encoded=JPEG)])
        ok = 0
        while ok < 20:
            try:
                stub.Classify(request, timeout=60, wait_for_ready=True)
                codes["OK"] += 1
                ok += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    break
        channel.close()

    try:
        # the port it bound (0: any free one) is logged once it listens, before the models load
        # (the ready file comes only once they have): the clients start at that event
        port = int(eventually(listening, "the gRPC port to open", timeout=120)[1])
        loading = "serving gRPC on" not in log_path.read_text()
        threads = [threading.Thread(target=hammer, args=(port, n)) for n in models
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] == 120, codes
    # the window was there and the clients met it: they started while the models loaded
    # (ResNet-18's three warm-ups at batch 32: seconds), which the log said when they started
    assert loading and codes["UNAVAILABLE"] > 0, (loading, codes)


JPEG = encode(photo("chelsea")[::4, ::4])


# --- the repository fuzzed: random trees never stop the scan ------------------------------------

NAMES = st.sampled_from(["config.toml", "labels.txt", "model.onnx", "1", "2", "²", "01", "-1",
                         ".tmp-3", "_x", "x", "model.onnx.data"])
CONFIG_LINES = st.sampled_from([
    "max_batch_size = 4", "max_batch_size = 'a'", "warmup = 5", "[warmup]\nbatch_sizes = [1]",
    "[batching]\npreferred_batch_sizes = ['a']", "[input]\nmean = [1]", "[input]\nheight = -1",
    "backend = 'onnxruntime'", "backend = 3", "[version_policy]\nlatest = 0",
    "[version_policy]\nspecific = [1.5]", "[onnxruntime]\nproviders = [1]", "= =", "[",
    "description = '\u00e9'", "instance_count = 1e9", "[input]\nraw_dtypes = ['int4']"])


@st.composite
def trees(draw):
    """A model folder: random files and folders, random (often broken) config lines."""
    entries = draw(st.lists(st.tuples(NAMES, st.sampled_from(["file", "dir", "bytes"]),
                                      st.lists(CONFIG_LINES, max_size=4),
                                      st.lists(NAMES, max_size=3)), max_size=6))
    return entries


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folders=st.lists(trees(), min_size=1, max_size=3))
def test_random_repository_trees_never_stop_the_scan(exported_repo, tmp_path_factory, folders):
    """Beside random folders (files and folders with names the scanner looks for, configs of
    random and broken lines), a good model still scans as loadable; each other one gets a reason
    of its own (not the catch-all), and no reason names a host path."""
    repo = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(exported_repo / "lenet5", repo / "good")
    for m, entries in enumerate(folders):
        model_dir = repo / f"m{m}"
        model_dir.mkdir()
        for name, kind, lines, children in entries:
            path = model_dir / name
            if path.exists():
                continue
            if kind == "dir":
                path.mkdir()
                for child in children:
                    if not (path / child).exists():
                        (path / child).write_text("\n".join(lines))
            elif kind == "bytes":
                path.write_bytes(bytes(range(256)) * 2)
            else:
                path.write_text("\n".join(lines))
    entries = {e.name: e for e in scan(repo)}
    assert sorted(entries) == ["good", *(f"m{m}" for m in range(len(folders)))]
    good = entries.pop("good")
    assert not good.error and [v.version for v in good.versions] == [1]
    for entry in entries.values():
        assert entry.config is not None or entry.error
        assert "its folder could not be read" not in entry.error, entry.error
        assert str(repo) not in entry.error and "/tmp" not in entry.error, entry.error
        for reason in entry.version_errors.values():
            assert str(repo) not in reason and "/tmp" not in reason, reason


@pytest.mark.slow  # an export under strace: ~50 s
def test_export_flushes_every_file_and_folder_before_the_rename_that_publishes(tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (.ci/run installs it)")
    trace = tmp_path / "trace"
    result = subprocess.run(
        [strace, "-f", "-e", "trace=fsync,rename,renameat,renameat2", "-o", str(trace),
         sys.executable, "-m", "visionserve.service.cli", "export", "lenet5", "--repo",
         str(tmp_path / "repo")],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    calls = [line for line in trace.read_text().splitlines() if "fsync" in line or "rename" in line]
    publish = next(i for i, line in enumerate(calls) if ".tmp-1-" in line and "rename" in line
                   and '/1"' in line)
    assert sum("fsync(" in line for line in calls[:publish]) >= 4, calls  # files and folders
    assert any("fsync(" in line for line in calls[publish + 1:]), calls  # the model folder


def test_an_engine_reason_never_names_a_host_path_outside_the_repository(exported_repo,
                                                                         tmp_path):
    """ONNX Runtime refuses an initializer stored outside the model's folder, and its message
    names the resolved path on the host; clients see the reason without it."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    onnx_file = repo / "lenet5" / "1" / "model.onnx"
    graph = onnx.load(onnx_file)
    convert_model_to_external_data(graph, all_tensors_to_one_file=True, location="w.bin",
                                   size_threshold=1024)  # the weights, not shape constants
    onnx.save(graph, onnx_file)
    elsewhere = tmp_path / "weights-elsewhere.bin"  # outside the repository
    (onnx_file.parent / "w.bin").rename(elsewhere)
    graph = onnx.load(onnx_file, load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../weights-elsewhere.bin"  # leaves the folder: refused
    onnx_file.write_bytes(graph.SerializeToString())
    srv = start_server(repo, tmp_path / "server.log")
    try:
        info = model(srv, "lenet5")
        assert info.state == pb.MODEL_STATE_FAILED, info
        assert "/tmp" not in info.reason and str(tmp_path) not in info.reason, info.reason
        assert "<a path outside the repository>" in info.reason, info.reason
        assert str(tmp_path) in srv.log()  # the operator's log keeps the full path
    finally:
        srv.stop()


def mutated_configs():
    """The real exported config, one value replaced by an arbitrary TOML literal."""
    text = (ROOT / "model_repo" / "lenet5" / "config.toml").read_text()
    lines = text.splitlines()
    values = [i for i, line in enumerate(lines) if " = " in line]
    literals = st.sampled_from(["-1", "0", "1e400", "'x'", "[]", "['a', 1]", "[[1]]", "true",
                                "{}", "{a = 1}", "1979-05-27", "nan", "inf", "9" * 30, "''",
                                "[1, 2.5]", '"\\u00e9"'])
    return st.tuples(st.sampled_from(values), literals).map(
        lambda change: "\n".join(
            line if i != change[0] else line.split(" = ")[0] + " = " + change[1]
            for i, line in enumerate(lines)))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=mutated_configs())
def test_mutated_configs_fail_their_model_with_a_reason_of_their_own(exported_repo,
                                                                    tmp_path_factory, config):
    repo = tmp_path_factory.mktemp("mutated")
    shutil.copytree(exported_repo / "lenet5", repo / "m")
    (repo / "m" / "config.toml").write_text(config)
    (entry,) = scan(repo)
    if entry.config is None:
        assert entry.error.startswith("m/config.toml: "), entry.error
        assert "its folder could not be read" not in entry.error
