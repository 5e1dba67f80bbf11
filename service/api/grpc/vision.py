"""``visionserve.v1.VisionService``: Classify, Embed, ListModels, GetModel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

from ...core.inference import InferenceCore
from ...models.control import ModelControl
from ...models.routing import ModelStatus
from ...states import VersionState
from ..calls import CallHandler, deadline_of, metadata_request_id
from ..streams import answer_stream
from .status import grpc_status
from .vision_wire import classify_call, classify_reply, embed_call, embed_reply

_STATES = {  # our version states as visionserve.v1 ModelState
    VersionState.LOADING: pb.MODEL_STATE_LOADING, VersionState.READY: pb.MODEL_STATE_READY,
    VersionState.FAILED: pb.MODEL_STATE_FAILED, VersionState.DRAINING: pb.MODEL_STATE_DRAINING,
    VersionState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


class VisionServicer(pb_grpc.VisionServiceServicer):
    def __init__(self, core: InferenceCore, control: ModelControl, calls: CallHandler) -> None:
        self._core = core
        self._control = control
        self._calls = calls
        self._max_images = core.limits.max_images_per_request

    async def Classify(self, request: pb.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        async def work() -> tuple[pb.ClassifyResponse, int]:
            result = await self._core.classify(classify_call(request, self._max_images),
                                               deadline_of(context))
            return classify_reply(result), result.version

        return await self._calls.handle("Classify", request.model, context, work,
                                        request.request_id)

    async def ClassifyStream(self, requests: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        async def answer(request: pb.ClassifyRequest) -> pb.ClassifyStreamResponse:
            async def work() -> tuple[pb.ClassifyResponse, int]:
                call = classify_call(request, self._max_images)
                result = await self._core.classify(call, deadline_of(context))
                return classify_reply(result), result.version

            try:
                reply = await self._calls.run("ClassifyStream", request.model, work,
                                              request.request_id or stream_id)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the stream's
                code, message = grpc_status(exc)
                return pb.ClassifyStreamResponse(request_id=request.request_id,
                                                 code=code.value[0], error_message=message)
            return pb.ClassifyStreamResponse(request_id=request.request_id, response=reply)

        stream_id = metadata_request_id(context)
        async for reply in answer_stream(requests, answer,
                                         self._core.limits.max_stream_inflight):
            yield reply

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        async def work() -> tuple[pb.EmbedResponse, int]:
            call = embed_call(request, self._max_images)
            result = await self._core.embed(call, deadline_of(context))
            return embed_reply(result), result.version

        return await self._calls.handle("Embed", request.model, context, work,
                                        request.request_id)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def work() -> tuple[pb.ListModelsResponse, int]:
            statuses = self._control.models()
            return pb.ListModelsResponse(models=[model_info(s, self._control.weights(s.name))
                                                 for s in statuses]), 0

        return await self._calls.handle("ListModels", "", context, work)

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async def work() -> tuple[pb.ModelInfo, int]:
            status = self._control.status(request.model)
            return model_info(status, self._control.weights(status.name)), 0

        return await self._calls.handle("GetModel", request.model, context, work)


def model_info(status: ModelStatus, weights: dict[int, str]) -> pb.ModelInfo:
    info = pb.ModelInfo(
        name=status.name, state=_STATES[status.state], reason=status.reason,
        num_classes=status.num_classes, embedding_dim=status.embedding_dim,
        versions=[pb.ModelVersion(version=v.version, state=_STATES[v.state], reason=v.reason,
                                  weights=weights.get(v.version, ""))
                  for v in sorted(status.versions.values(), key=lambda v: -v.version)])
    if status.config is not None:
        c = status.config
        info.backend = c.backend
        info.max_batch_size = c.max_batch_size
        i = c.input
        info.input.CopyFrom(pb.InputSpec(
            name=i.name, channels=i.channels, height=i.height, width=i.width, color=i.color,
            mean=list(i.mean), std=list(i.std), resize=i.resize, interpolation=i.interpolation))
    return info
