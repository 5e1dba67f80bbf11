# syntax=docker/dockerfile:1
# visionserve images (multi-stage):
#   docker build --target serve  -t visionserve:0.1.0 .          slim server, ONNX Runtime CPU, no PyTorch
#   docker build --target serve  --build-arg LOCK=gpu.txt -t visionserve:0.1.0-gpu .
#                                     ONNX Runtime's CUDA build (CUDA EP; CUDA and cuDNN as pip wheels,
#                                     the driver from the host). TensorRT's libraries are not in it
#   docker build --target serve  --build-arg LOCK=openvino.txt -t visionserve:0.1.0-openvino .
#                                     the default image plus OpenVINO (backend = "openvino": FP32,
#                                     BF16 on CPUs with it, INT8 QDQ; docs/config.md)
#   docker build --target export -t visionserve-export:0.1.0 .   PyTorch (CPU wheels) + the export stage
# The serve stage installs exactly deploy/requirements/$LOCK (versions and hashes, `make lock`),
# then our wheel without resolving anything. Settings are environment variables
# (VISIONSERVE_<FLAG>); the model repository is a volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY export export
COPY bench bench
COPY proto proto
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS serve
ARG LOCK=serve.txt
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VISIONSERVE_REPO=/models \
    VISIONSERVE_HTTP_PORT=8000 \
    VISIONSERVE_GRPC_PORT=8001 \
    VISIONSERVE_METRICS_PORT=8002 \
    VISIONSERVE_SHUTDOWN_GRACE_S=30
COPY deploy/requirements/${LOCK} /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
# One layer: the locked serving dependencies (wheels only, every hash checked; no compilers, no
# PyTorch), our wheel on top of them (--no-deps: nothing unlocked comes in), the user, and
# the volume's mount point (a read-only root cannot create it at run time).
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps /wheels/visionserve-*.whl \
    && python -c 'import visionserve.service.process.server, visionserve.service.cli' \
    && rm -rf /wheels /tmp/requirements.txt \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin visionserve \
    && install -d -m 0755 /models
USER 10001
VOLUME ["/models"]
EXPOSE 8000 8001 8002
# SIGTERM: health goes NOT_SERVING, in-flight requests finish within VISIONSERVE_SHUTDOWN_GRACE_S.
# Nothing is written at run time: the root filesystem may be read-only (docs/deploy.md).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["visionserve", "health"]
ENTRYPOINT ["visionserve"]
CMD ["serve"]

FROM ${PYTHON_IMAGE} AS export
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /wheels
# PyTorch's CPU wheels (the default PyPI build of torch bundles CUDA: several GB more).
# Our own wheel: its export extra pins torch and torchvision exactly.
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/visionserve-*.whl)" \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
         "${WHEEL}[export]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin visionserve
USER 10001
VOLUME ["/models"]
ENTRYPOINT ["visionserve", "export", "--repo", "/models"]
CMD ["--list"]
