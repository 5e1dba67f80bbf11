"""KServe v2 / Open Inference Protocol, driven by Triton's own unmodified client.

tritonclient defines the `inference.*` protobuf symbols in this process's default descriptor
pool; the server (with its own `inference.*`, from visionserve.inference) runs in a subprocess,
so the two never meet. This module must never import visionserve.inference.
"""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys

import grpc
import numpy as np
import pytest

from conftest import ROOT, OrtReference, embeddings, encode, photo, softmax, tensor_image
from visionserve.service.format.model_format import EMBEDDING, INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton(server):
    client = tc.InferenceServerClient(server.address)
    yield client
    client.close()


def fp32_input(x: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput(INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def jpeg_input(*images: bytes) -> tc.InferInput:
    tensor = tc.InferInput(INPUT, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def good_infer(triton) -> None:
    x = np.zeros((1, 1, 32, 32), np.float32)
    assert triton.infer("lenet5", [fp32_input(x)]).as_numpy(LOGITS).shape == (1, 10)


def test_health_metadata_config_and_repository_index(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("resnet18") and triton.is_model_ready("resnet18", "1")
    assert not triton.is_model_ready("resnet18", "9") and not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta.name == "visionserve"
    # Triton's extension names, kept literal: clients test for these exact spellings
    assert {"classification", "model_repository", "statistics"} <= set(meta.extensions)
    model = triton.get_model_metadata("resnet18")
    assert model.versions == ["1"] and model.platform == "onnxruntime_onnx"
    # every form the one input accepts, the model's own FP32 first
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        (INPUT, "FP32", [-1, 3, 224, 224]), (INPUT, "UINT8", [-1, 224, 224, 3]),
        (INPUT, "UINT8", [-1, 3, 224, 224]), (INPUT, "BYTES", [-1])]
    assert [(t.name, list(t.shape)) for t in model.outputs] == \
        [(LOGITS, [-1, 1000]), (EMBEDDING, [-1, 512])]
    config = triton.get_model_config("resnet18").config
    assert config.max_batch_size == 32 and config.input[0].dims == [3, 224, 224]
    assert config.HasField("dynamic_batching")
    assert config.parameters["visionserve.input_forms"].string_value == (
        "FP32 [-1, 3, 224, 224], UINT8 [-1, 224, 224, 3], UINT8 [-1, 3, 224, 224] or "
        "BYTES [-1] (encoded images)")
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    index = {(m.name, m.version): m.state for m in triton.get_model_repository_index().models}
    assert index[("resnet18", "1")] == "READY" and index[("lenet5", "1")] == "READY"


def test_every_rpc_is_accounted_probes_and_index_included(server, triton):
    """Liveness, readiness, model readiness, server metadata and the repository index are
    counted in the request histogram like every other RPC (with their status code)."""
    calls = {"ServerLive": triton.is_server_live, "ServerReady": triton.is_server_ready,
             "ModelReady": lambda: triton.is_model_ready("lenet5"),
             "ServerMetadata": triton.get_server_metadata,
             "RepositoryIndex": triton.get_model_repository_index}
    # the method label is the RPC's name in the KServe proto: each key must be one of its RPCs
    rpcs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert set(calls) <= set(rpcs), set(calls) - set(rpcs)
    name = "visionserve_request_duration_seconds_count"
    before = {m: server.metric(name, method=m, code="OK") for m in calls}
    for call in calls.values():
        assert call()
    assert not triton.is_model_ready("nope")  # an answer (ready: false), not an error
    for method in calls:
        expected = 2 if method == "ModelReady" else 1
        assert server.metric(name, method=method, code="OK") - before[method] == expected


def test_model_config_is_the_config_pbtxt_export_wrote(triton, exported_repo):
    """One renderer: what KServe ModelConfig answers is the config.pbtxt beside the model, and
    the served version's provenance (the parameter ``weights``)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    written = text_format.Parse((exported_repo / "lenet5" / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
    served = triton.get_model_config("lenet5").config
    assert served.parameters["weights"].string_value.startswith("random weights (seeded")
    del served.parameters["weights"]
    assert served == written
    assert written.platform == "onnxruntime_onnx" and written.default_model_filename == \
        "model.onnx"


def test_an_engine_folder_is_described_as_tensorrt_on_gpu():
    script = ("import dataclasses, pathlib; "
              "from visionserve.service.format.model_config import ModelConfig; "
              "from visionserve.service.format.triton_config import model_config; "
              "c = ModelConfig.from_toml("
              "pathlib.Path('tests/fakes/model_repo/lenet5/config.toml')); "
              "m = model_config('e', dataclasses.replace(c, backend='tensorrt'), 10, 84); "
              "g = m.instance_group[0]; "
              "print(m.platform, m.backend, m.default_model_filename, type(g).Kind.Name(g.kind))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["tensorrt_plan", "tensorrt", "model.plan", "KIND_GPU"], \
        out.stderr


def test_infer_fp32_raw_equals_the_in_process_engine(triton, exported_repo):
    engine = OrtReference(exported_repo / "resnet18" / "1" / "model.onnx")
    x = np.random.default_rng(11).standard_normal((3, 3, 224, 224), dtype=np.float32)
    result = triton.infer("resnet18", [fp32_input(x)], request_id="k1")
    logits, embedding = engine(x)
    np.testing.assert_allclose(result.as_numpy(LOGITS), logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy(EMBEDDING), embedding, rtol=1e-4, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("resnet18", "1", "k1")


def test_infer_with_typed_contents_equals_raw(server, triton):
    x = np.random.default_rng(12).standard_normal((1, 1, 32, 32), dtype=np.float32)
    raw = triton.infer("lenet5", [fp32_input(x)]).as_numpy(LOGITS)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    request = service_pb2.ModelInferRequest(model_name="lenet5", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name=INPUT, datatype="FP32", shape=[1, 1, 32, 32],
            contents=service_pb2.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    reply = stub.ModelInfer(request)
    typed = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(1, 10)
    np.testing.assert_array_equal(typed, raw)


def test_bytes_input_of_a_real_jpeg_equals_the_classify_path(server, triton):
    data = encode(photo("chelsea"))
    result = triton.infer("resnet18", [jpeg_input(data)], outputs=[
        tc.InferRequestedOutput(LOGITS, class_count=5), tc.InferRequestedOutput(EMBEDDING)])
    classes = [s.decode().split(":", 2) for s in result.as_numpy(LOGITS)[0]]
    ours = server.stub.Classify(pb.ClassifyRequest(model="resnet18", top_k=5,
                                                   images=[pb.Image(encoded=data)]))
    assert [int(c[1]) for c in classes] == [c.index for c in ours.results[0].classes]
    assert [c[2] for c in classes] == [c.label for c in ours.results[0].classes]
    # the classification extension returns raw output values, as Triton does (no softmax)
    values = np.array([float(c[0]) for c in classes])
    embed = embeddings(server.stub.Embed(pb.EmbedRequest(model="resnet18",
                                                         images=[pb.Image(encoded=data)])))
    np.testing.assert_allclose(result.as_numpy(EMBEDDING), embed, rtol=1e-5, atol=1e-6)
    full = triton.infer("resnet18", [jpeg_input(data)]).as_numpy(LOGITS)[0]
    np.testing.assert_allclose(values, np.sort(full)[::-1][:5], atol=1e-6)
    np.testing.assert_allclose(softmax(full)[[int(c[1]) for c in classes]],
                               [c.score for c in ours.results[0].classes], rtol=1e-4)


def test_uint8_nhwc_input_is_normalized_by_the_server(server, triton):
    pixels = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    tensor = tc.InferInput(INPUT, list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    got = triton.infer("resnet18", [tensor]).as_numpy(EMBEDDING)
    ours = embeddings(server.stub.Embed(pb.EmbedRequest(
        model="resnet18", images=[tensor_image(p) for p in pixels])))
    np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-6)


def test_concurrent_async_infers_and_classify_calls_batch_together(server_factory,
                                                                     exported_repo):
    import tritonclient.grpc.aio as atc

    # the instance waits for all 48 images, so the calls of both APIs batch together whenever
    # they arrive: an event, not a race of arrival against compute (the minute bounds the wait;
    # no golden check: its own batches, through the same batcher, would wait as long)
    server = server_factory(("resnet18",), {"resnet18": {
        "max_batch_size": 48, "batching.preferred_batch_sizes": [48],
        "batching.max_queue_delay_ms": 60_000.0}}, "--golden-check", "off")
    engine = OrtReference(exported_repo / "resnet18" / "1" / "model.onnx")
    rng = np.random.default_rng(21)
    xs = [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(48)]
    batches_before = server.metric("visionserve_batch_size_count", model="resnet18")

    async def run() -> tuple[list[np.ndarray], list[pb.ClassifyResponse]]:
        client = atc.InferenceServerClient(server.address)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VisionServiceStub(channel)
            infers = [client.infer("resnet18", [fp32_input(x)]) for x in xs[:32]]
            classifies = [stub.Classify(pb.ClassifyRequest(model="resnet18",
                                                           images=[tensor_image(x[0])]))
                          for x in xs[32:]]
            results = await asyncio.gather(*infers, *classifies)
        await client.close()
        return [r.as_numpy(LOGITS) for r in results[:32]], list(results[32:])

    logits, classified = asyncio.run(run())
    for x, got in zip(xs[:32], logits, strict=True):
        np.testing.assert_allclose(got, engine(x)[0], rtol=1e-4, atol=1e-5)
    for x, reply in zip(xs[32:], classified, strict=True):
        expected = np.argsort(-softmax(engine(x)[0][0]))[:5]
        assert [c.index for c in reply.results[0].classes] == list(expected)
    batches = server.metric("visionserve_batch_size_count", model="resnet18") - batches_before
    assert batches == 1, "ModelInfer and Classify requests were not batched together"


def test_statistics_count_the_calls_made(triton):
    def stats():
        return triton.get_inference_statistics("lenet5", "1").model_stats[0]

    before = stats()
    for n in (1, 3):
        triton.infer("lenet5", [fp32_input(np.zeros((n, 1, 32, 32), np.float32))])
    refused(triton.infer, "lenet5", [fp32_input(np.zeros((1, 1, 32, 31), np.float32))])
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    # two requests, sent one after the other: at least two executions, each in batch_stats
    assert after.execution_count - before.execution_count >= 2 and after.batch_stats
    assert after.inference_count - before.inference_count == 4
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count


def test_stream_infer_answers_every_request_and_reports_errors_per_request(triton):
    replies: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for i in range(6):
            x = np.full((1, 1, 32, 32), i, np.float32)
            triton.async_stream_infer("lenet5", [fp32_input(x)], request_id=f"s{i}")
        triton.async_stream_infer("nope", [fp32_input(np.zeros((1, 1, 32, 32), np.float32))],
                                  request_id="bad")
        got = [replies.get(timeout=60) for _ in range(7)]
    finally:
        triton.stop_stream()
    ok = {r.get_response().id for r, e in got if e is None}
    errors = [str(e) for r, e in got if e is not None]
    assert ok == {f"s{i}" for i in range(6)}
    assert len(errors) == 1 and "nope" in errors[0]


def test_classify_stream_answers_by_request_id(server):
    image = pb.Image(tensor=pb.Tensor(shape=[1, 32, 32], dtype=pb.DTYPE_UINT8,
                                      data=bytes(1024)))
    requests = [pb.ClassifyRequest(model="lenet5", images=[image], request_id=f"c{i}")
                for i in range(5)]
    requests.append(pb.ClassifyRequest(model="lenet5", request_id="empty"))
    replies = {r.request_id: r for r in server.stub.ClassifyStream(iter(requests))}
    assert set(replies) == {f"c{i}" for i in range(5)} | {"empty"}
    assert all(len(replies[f"c{i}"].response.results) == 1 for i in range(5))
    assert replies["empty"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images is empty" in replies["empty"].error_message


def test_a_request_the_model_cannot_answer_is_refused_before_any_compute(triton):
    """Requested outputs are checked before the batcher: no batch runs for a request naming an
    output the model lacks (the version's execution count does not move)."""
    def executions() -> int:
        return triton.get_inference_statistics("lenet5", "1").model_stats[0].execution_count

    before = executions()
    x = fp32_input(np.zeros((1, 1, 32, 32), np.float32))
    err = refused(triton.infer, "lenet5", [x], outputs=[tc.InferRequestedOutput(LOGITS),
                                                         tc.InferRequestedOutput("nope")])
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output 'nope'" in \
        err.message() and "model lenet5 version 1" in err.message()
    assert executions() == before
    good_infer(triton)
    assert executions() == before + 1


@pytest.mark.parametrize("case", ["unknown model", "unknown version", "bad version",
                                  "datatype", "shape", "missing input", "wrong name",
                                  "size mismatch", "unknown output"])
def test_bad_requests_get_a_clear_status_and_the_next_request_succeeds(triton, case):
    x = np.zeros((1, 1, 32, 32), np.float32)
    if case == "unknown model":
        err = refused(triton.infer, "nope", [fp32_input(x)])
        assert err.status() == "StatusCode.NOT_FOUND" and "nope" in err.message()
    elif case == "unknown version":
        err = refused(triton.infer, "lenet5", [fp32_input(x)], model_version="4")
        assert err.status() == "StatusCode.NOT_FOUND" and "version 4" in err.message()
    elif case == "bad version":
        err = refused(triton.infer, "lenet5", [fp32_input(x)], model_version="latest")
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
    elif case == "datatype":
        tensor = tc.InferInput(INPUT, [1, 1, 32, 32], "INT32")
        tensor.set_data_from_numpy(np.zeros((1, 1, 32, 32), np.int32))
        err = refused(triton.infer, "lenet5", [tensor])
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert "datatype INT32" in err.message() and "FP32 [-1, 1, 32, 32]" in err.message()
    elif case == "shape":
        err = refused(triton.infer, "lenet5", [fp32_input(np.zeros((1, 1, 28, 28), np.float32))])
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert "shape [1, 28, 28]" in err.message() and "[1, 32, 32]" in err.message()
    elif case == "missing input":
        err = refused(triton.infer, "lenet5", [])
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert "expected exactly one input 'input'" in err.message()
    elif case == "wrong name":
        tensor = tc.InferInput("pixels", [1, 1, 32, 32], "FP32")
        tensor.set_data_from_numpy(x)
        err = refused(triton.infer, "lenet5", [tensor])
        assert "unknown input 'pixels'" in err.message()
    elif case == "size mismatch":
        tensor = fp32_input(x)
        tensor.set_shape([2, 1, 32, 32])
        err = refused(triton.infer, "lenet5", [tensor])
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert "holds 4096 bytes" in err.message() and "needs 8192" in err.message()
    elif case == "unknown output":
        err = refused(triton.infer, "lenet5", [fp32_input(x)],
                      outputs=[tc.InferRequestedOutput("probabilities")])
        assert "unknown output 'probabilities'" in err.message()
    else:
        pytest.fail(f"unhandled case {case}")
    good_infer(triton)


def test_load_and_unload_are_refused_unless_model_control_is_explicit(triton):
    err = refused(triton.load_model, "lenet5")
    assert err.status() == "StatusCode.FAILED_PRECONDITION"
    assert "--model-control explicit" in err.message()
    err = refused(triton.unload_model, "lenet5")
    assert "--model-control explicit" in err.message()
    good_infer(triton)


def test_explicit_model_control_loads_and_unloads_on_request(server_factory):
    srv = server_factory(("lenet5", "resnet18"), None, "--model-control", "explicit",
                         "--trust-network",
                         "--load-model", "lenet5")
    client = tc.InferenceServerClient(srv.address)
    try:
        assert client.is_model_ready("lenet5") and not client.is_model_ready("resnet18")
        x = np.zeros((1, 3, 224, 224), np.float32)
        assert refused(client.infer, "resnet18", [fp32_input(x)]).status() == \
            "StatusCode.NOT_FOUND"
        client.load_model("resnet18")
        assert client.infer("resnet18", [fp32_input(x)]).as_numpy(LOGITS).shape == (1, 1000)
        client.unload_model("resnet18")
        assert not client.is_model_ready("resnet18")
        err = refused(client.infer, "resnet18", [fp32_input(x)])  # not ready: retry once loaded
        assert err.status() == "StatusCode.UNAVAILABLE" and "unloaded" in err.message()
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index == {"lenet5": "READY", "resnet18": "UNAVAILABLE"}
        client.load_model("resnet18")
        assert client.is_model_ready("resnet18")
        assert refused(client.load_model, "vgg99").status() == "StatusCode.NOT_FOUND"
        good_infer(client)
    finally:
        client.close()
