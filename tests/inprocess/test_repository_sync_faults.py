"""A bad model folder fails that model alone (issue 17), through the whole server in this process
(on the fake engine) and the repository on disk: at start-up and while polling, every fault gets
a reason naming the file relative to the repository and the other models load, update and serve;
a broken newest version leaves the newest one that loads serving; paths stay inside the
repository unless the operator allows links out; model control refuses an empty name and load
parameters; random and mutated folder trees never stop the scan (hypothesis).

Moved from tests/test_repository_faults.py, which keeps what needs a process or a real engine:
the export's fsyncs under strace, and ONNX Runtime's own message naming a host path. Calls
during start-up: tests/inprocess/test_startup.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, eventually
from inprocess.harness import lenet5_repo, publish_fake
from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.service.format.repository import scan
from visionserve.v1 import visionserve_pb2 as pb

LENET_X = np.zeros((1, 32, 32), np.float32)  # CHW for lenet5's one channel
# every poll is a scan of the repository: a short interval is only what the waits wait for
POLL = ("--poll-interval-s", "0.1")
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


def break_copies(repo: Path) -> dict[str, str]:
    """One broken copy of lenet5 per fault, plus a model folder linked to /etc. Each is made
    beside the repository and moved in whole, as a poll may scan at any moment."""
    expected = {}
    source = lenet5_repo(repo.parent / "source") / "lenet5"
    staging = repo.parent / "staging"
    staging.mkdir(exist_ok=True)
    for fault in FAULTS:
        shutil.copytree(source, staging / fault.__name__)
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


def test_every_bad_folder_fails_alone_at_start_up(start, tmp_path):
    repo = lenet5_repo(tmp_path / "repo")
    expected = break_copies(repo)
    srv = start(repo)
    assert_failed_alone(srv, expected)
    assert srv.metric("visionserve_model_load_failures_total", model="config_is_a_directory") \
        == 1


def test_bad_folders_appearing_while_polling_never_stop_other_models_updating(start, tmp_path):
    repo = lenet5_repo(tmp_path / "repo")
    srv = start(repo, *POLL)
    expected = break_copies(repo)
    eventually(lambda: {m.name for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
               >= set(expected), "the bad folders to be scanned")
    publish_fake(repo / "lenet5", 2)  # a new version of the good model still lands
    eventually(lambda: classify(srv).version == 2, "lenet5 version 2 to serve")
    assert_failed_alone(srv, expected)


def test_a_broken_newest_version_leaves_the_newest_that_loads_serving(start, tmp_path):
    """Cold start with version 2 corrupt: version 1 serves and version 2 is reported failed (the
    reason in GetModel, the state metric); fixing version 2's file retries it on the next poll,
    and it replaces version 1."""
    repo = lenet5_repo(tmp_path / "repo")
    publish_fake(repo / "lenet5", 2)
    good = (repo / "lenet5" / "2" / "model.onnx").read_bytes()
    (repo / "lenet5" / "2" / "model.onnx").write_bytes(good[: len(good) // 2])  # cut short
    srv = start(repo, *POLL)
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


def test_any_file_of_a_failed_version_changing_retries_it(start, tmp_path):
    """A version whose labels.txt is not UTF-8 fails; rewriting only that file retries it."""
    repo = lenet5_repo(tmp_path / "repo")
    labels = repo / "lenet5" / "1" / "labels.txt"
    exported = labels.read_text()
    labels.write_bytes(b"\xff\xfe")
    srv = start(repo, *POLL)
    state, reason = versions(model(srv, "lenet5"))[1]
    assert state == pb.MODEL_STATE_FAILED
    assert "lenet5/1/labels.txt is not UTF-8 text" in reason
    labels.write_text(exported)
    eventually(lambda: model(srv, "lenet5").state == pb.MODEL_STATE_READY,
               "the version to load once its labels are fixed")
    assert classify(srv).results[0].classes[0].label in exported.split()


def test_links_outside_are_followed_only_when_the_operator_says_so(start, tmp_path):
    repo = lenet5_repo(tmp_path / "repo")
    outside = tmp_path / "shared-labels.txt"
    outside.write_text("\n".join(f"shared {i}" for i in range(10)) + "\n")
    (repo / "lenet5" / "labels.txt").unlink()
    (repo / "lenet5" / "labels.txt").symlink_to(outside)
    (repo / "lenet5" / "1" / "labels.txt").unlink(missing_ok=True)  # labels from elsewhere
    srv = start(repo, "--allow-symlinks-outside-repo")
    assert classify(srv).results[0].classes[0].label.startswith("shared ")


def test_model_control_refuses_an_empty_name_and_load_parameters(server_factory):
    srv = server_factory(("lenet5",), None, "--model-control", "explicit", "--trust-network")
    stub = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
    for call, request in ((stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest()),
                          (stub.RepositoryModelUnload, kpb.RepositoryModelUnloadRequest())):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model_name is empty" in err.value.details()
    index = stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=30).models
    assert "" not in [m.name for m in index]  # no phantom model for the repository root
    with_config = kpb.RepositoryModelLoadRequest(model_name="lenet5")
    with_config.parameters["config"].string_param = '{"max_batch_size": 1}'
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(with_config, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RepositoryModelLoad parameters (config) are not supported" in err.value.details()


# --- the repository fuzzed: random trees never stop the scan ------------------------------------

@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lenet5's folder as export leaves it, to copy beside the random ones."""
    return lenet5_repo(tmp_path_factory.mktemp("good")) / "lenet5"


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
def test_random_repository_trees_never_stop_the_scan(good_model, tmp_path_factory, folders):
    """Beside random folders (files and folders with names the scanner looks for, configs of
    random and broken lines), a good model still scans as loadable; each other one gets a reason
    of its own (not the catch-all), and no reason names a host path."""
    repo = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(good_model, repo / "good")
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


def mutated_configs():
    """The committed config, one value replaced by an arbitrary TOML literal."""
    text = (ROOT / "tests/fakes/model_repo/lenet5/config.toml").read_text()
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
def test_mutated_configs_fail_their_model_with_a_reason_of_their_own(good_model,
                                                                    tmp_path_factory, config):
    repo = tmp_path_factory.mktemp("mutated")
    shutil.copytree(good_model, repo / "m")
    (repo / "m" / "config.toml").write_text(config)
    (entry,) = scan(repo)
    if entry.config is None:
        assert entry.error.startswith("m/config.toml: "), entry.error
        assert "its folder could not be read" not in entry.error
