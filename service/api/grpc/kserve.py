"""``inference.GRPCInferenceService``: the KServe v2 / Open Inference Protocol, as Triton's
clients (``tritonclient.grpc``) speak it. ModelInfer meets the same batchers as Classify/Embed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.inference import model_config_pb2 as mc

from ... import package_version
from ...core.inference import InferenceCore
from ...errors import InvalidInput, VisionServeError
from ...format import triton_config
from ...lifecycle import Lifecycle
from ...logs import printable
from ...models.control import ModelControl
from ...models.routing import ServedVersion
from ...models.statistics import Duration
from ...models.views import IndexEntry, ModelMetadata, ServedConfig, TensorSpec, VersionStats
from ..calls import CallHandler, deadline_of, metadata_request_id
from ..kserve_protocol import EXTENSIONS, INDEX_STATES, parse_version
from ..streams import answer_stream
from .kserve_wire import infer_call, infer_reply
from .status import grpc_status


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """Thin: wire → typed call → core or model control → typed result → wire. Every RPC, probes
    included, goes through the call handler (request metric, access log, error mapping)."""

    def __init__(self, core: InferenceCore, control: ModelControl, calls: CallHandler,
                 lifecycle: Lifecycle) -> None:
        self._core = core
        self._control = control
        self._calls = calls
        self._lifecycle = lifecycle

    # --- health and metadata --------------------------------------------------------------

    async def ServerLive(self, request, context):
        async def work() -> tuple[kpb.ServerLiveResponse, int]:
            return kpb.ServerLiveResponse(live=True), 0

        return await self._calls.handle("ServerLive", "", context, work)

    async def ServerReady(self, request, context):
        async def work() -> tuple[kpb.ServerReadyResponse, int]:
            return kpb.ServerReadyResponse(ready=self._lifecycle.ready), 0

        return await self._calls.handle("ServerReady", "", context, work)

    async def ModelReady(self, request, context):
        async def work() -> tuple[kpb.ModelReadyResponse, int]:
            try:
                served = self._resolve(request.name, request.version)
            except VisionServeError:  # not ready, whatever the reason: an answer, not an error
                return kpb.ModelReadyResponse(ready=False), 0
            return kpb.ModelReadyResponse(ready=True), served.version

        return await self._calls.handle("ModelReady", request.name, context, work)

    async def ServerMetadata(self, request, context):
        async def work() -> tuple[kpb.ServerMetadataResponse, int]:
            return kpb.ServerMetadataResponse(name="visionserve", version=package_version(),
                                              extensions=EXTENSIONS), 0

        return await self._calls.handle("ServerMetadata", "", context, work)

    async def ModelMetadata(self, request, context):
        async def work() -> tuple[kpb.ModelMetadataResponse, int]:
            view, answered = self._control.metadata(
                request.name, parse_version(request.name, request.version))
            return model_metadata(view), answered

        return await self._calls.handle("ModelMetadata", request.name, context, work)

    async def ModelConfig(self, request, context):
        async def work() -> tuple[kpb.ModelConfigResponse, int]:
            view = self._control.served_config(
                request.name, parse_version(request.name, request.version))
            return kpb.ModelConfigResponse(config=model_config(view)), view.version

        return await self._calls.handle("ModelConfig", request.name, context, work)

    # --- inference --------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        return await self._calls.handle("ModelInfer", request.model_name, context,
                                        lambda: self._infer(request, context), request.id)

    async def ModelStreamInfer(self, requests: AsyncIterator[kpb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        async def answer(request: kpb.ModelInferRequest) -> kpb.ModelStreamInferResponse:
            try:
                reply = await self._calls.run("ModelStreamInfer", request.model_name,
                                              lambda: self._infer(request, context),
                                              request.id or stream_id)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the stream's
                _, message = grpc_status(exc)
                return kpb.ModelStreamInferResponse(
                    error_message=message, infer_response=kpb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version,
                        id=request.id))
            return kpb.ModelStreamInferResponse(infer_response=reply)

        stream_id = metadata_request_id(context)
        async for reply in answer_stream(requests, answer,
                                         self._core.limits.max_stream_inflight):
            yield reply

    async def _infer(self, request: kpb.ModelInferRequest,
                     context: grpc.aio.ServicerContext) -> tuple[kpb.ModelInferResponse, int]:
        max_images = self._core.limits.max_images_per_request
        if any(t.HasField("contents") for t in request.inputs):
            # typed contents: up to 64 MiB of values to convert, a second of CPU at worst;
            # in a thread, where numpy releases the GIL, so the loop keeps answering
            call = await asyncio.to_thread(infer_call, request, max_images)
        else:
            call = infer_call(request, max_images)
        result = await self._core.model_infer(call, deadline_of(context))
        return infer_reply(result), result.version

    # --- statistics and repository ------------------------------------------------------------

    async def ModelStatistics(self, request, context):
        async def work() -> tuple[kpb.ModelStatisticsResponse, int]:
            views = self._control.statistics(
                request.name, parse_version(request.name, request.version))
            return kpb.ModelStatisticsResponse(model_stats=[statistics(v) for v in views]), 0

        return await self._calls.handle("ModelStatistics", request.name, context, work)

    async def RepositoryIndex(self, request, context):
        async def work() -> tuple[kpb.RepositoryIndexResponse, int]:
            return repository_index(await self._control.index(request.ready)), 0

        return await self._calls.handle("RepositoryIndex", "", context, work)

    async def RepositoryModelLoad(self, request, context):
        async def work() -> tuple[kpb.RepositoryModelLoadResponse, int]:
            if request.parameters:  # Triton's config / file: overrides; never ignored silently
                raise InvalidInput(
                    f"model {printable(request.model_name)}: RepositoryModelLoad parameters "
                    f"({printable(', '.join(sorted(request.parameters)))}) are not supported: "
                    "the repository is the only source of models; publish a new version "
                    "(`visionserve export`) and load without parameters")
            await self._control.load(request.model_name, "RepositoryModelLoad", context.peer())
            return kpb.RepositoryModelLoadResponse(), 0

        return await self._calls.handle("RepositoryModelLoad", request.model_name, context,
                                        work)

    async def RepositoryModelUnload(self, request, context):
        async def work() -> tuple[kpb.RepositoryModelUnloadResponse, int]:
            await self._control.unload(request.model_name, "RepositoryModelUnload",
                                       context.peer())
            return kpb.RepositoryModelUnloadResponse(), 0

        return await self._calls.handle("RepositoryModelUnload", request.model_name, context,
                                        work)

    def _resolve(self, name: str, version_text: str) -> ServedVersion:
        return self._control.resolve(name, parse_version(name, version_text))


def model_metadata(view: ModelMetadata) -> kpb.ModelMetadataResponse:
    def tensors(specs: tuple[TensorSpec, ...]) -> list[kpb.ModelMetadataResponse.TensorMetadata]:
        return [kpb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                         shape=list(t.shape)) for t in specs]

    return kpb.ModelMetadataResponse(name=view.name, versions=[str(v) for v in view.versions],
                                     platform=view.platform, inputs=tensors(view.inputs),
                                     outputs=tensors(view.outputs))


def model_config(view: ServedConfig) -> mc.ModelConfig:
    return triton_config.model_config(view.name, view.config, view.num_classes,
                                      view.embedding_dim, view.weights)


def statistics(view: VersionStats) -> kpb.ModelStatistics:
    s = view.stats

    def d(x: Duration) -> kpb.StatisticDuration:
        return kpb.StatisticDuration(count=x.count, ns=x.ns)

    return kpb.ModelStatistics(
        name=view.name, version=str(view.version), last_inference=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        inference_stats=kpb.InferStatistics(
            success=d(s.success), fail=d(s.fail), queue=d(s.queue),
            compute_input=d(s.compute_input), compute_infer=d(s.compute_infer),
            compute_output=d(s.compute_output)),
        batch_stats=[kpb.InferBatchStatistics(batch_size=size, compute_infer=d(dur))
                     for size, dur in sorted(s.batches.items())])


def repository_index(entries: list[IndexEntry]) -> kpb.RepositoryIndexResponse:
    return kpb.RepositoryIndexResponse(models=[kpb.RepositoryIndexResponse.ModelIndex(
        name=e.name, version=str(e.version) if e.version else "",
        state=INDEX_STATES[e.state], reason=e.reason) for e in entries])
