# Thin wrappers; the README's two commands are `make serve` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
REPO    ?= model_repo
DEFAULT_MODELS := efficientnet_lite0 lenet5 resnet18 resnet50 mobilenet_v3_small
STAMP   := $(VENV)/.installed
# the serve image's lock with OpenVINO's packages added (the openvino extra; serve.txt otherwise)
LOCK    := deploy/requirements/openvino.txt

.PHONY: setup serve models test test-unit test-integration test-fast test-heavy test-all lint lock proto bench peer-triton clean

# The serving dependencies at exactly the versions of the serve image's lock (its hashes
# stripped: pip cannot hash-check an editable install), the extras resolved around them.
$(STAMP): pyproject.toml $(LOCK)
	@echo "== setup: $(VENV) with this project and its export, dev and openvino extras:"
	@echo "   PyTorch 2.14.1 (a CUDA build that runs on CPU), ONNX Runtime, OpenVINO, the tests' tools;"
	@echo "   about 6.9 GB on disk; 4 minutes on a 2-core machine with pip's cache warm, about 20 cold (measured 2026-12-07)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --progress-bar on pip
	sed -e '/--hash=/d' -e 's/ \\$$//' $(LOCK) > $(VENV)/serve-constraints.txt
	$(BIN)/pip install --progress-bar on -c $(VENV)/serve-constraints.txt -e '.[export,dev,openvino]'
	touch $(STAMP)
	@echo "== setup done: $$(du -sh $(VENV) | cut -f1) in $(VENV)"

setup: $(STAMP)

models: setup
	@echo "== the default models into $(REPO) (those missing; the first time about 1.5 minutes)"
	$(BIN)/visionserve export --if-missing --repo $(REPO) $(DEFAULT_MODELS)

serve: models
	$(BIN)/visionserve serve --repo $(REPO)

# Two tiers, two pytest processes (tritonclient and our KServe stubs cannot share one):
# tests/inprocess runs whole servers inside pytest on a fake engine (the API, admission,
# limits, errors, lifecycle); the rest starts real server processes on real exports.
test: test-unit test-integration

test-unit: setup
	$(BIN)/python -m pytest tests/inprocess $(PYTEST_ARGS)

# The integration tier's tests mostly wait on processes (a server starting, a drain, pip):
# two pytest-xdist workers, whole files each (a file's servers are shared by its tests), keep
# both cores busy. WORKERS=0 runs it in one process.
WORKERS ?= 2
XDIST   := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

test-integration: setup
	$(BIN)/python -m pytest -m "not heavy" $(XDIST) --durations=30 $(PYTEST_ARGS)

test-fast: test-unit
	$(BIN)/python -m pytest -m "not slow and not heavy" $(XDIST) $(PYTEST_ARGS)

# The architectures marked heavy (ViT-H/14), exported and served (measured 2026-12-06: 4 min 28 s,
# the export's peak 6.0 GB).
test-heavy: setup
	$(BIN)/python -m pytest -m heavy $(PYTEST_ARGS)

# The whole suite in its long forms: all 41 non-heavy architectures (`make test` exports one
# per family and a slice of the rest, chosen by the commit) and the heavy ones; the 60 s soak,
# 10,000-input fuzz campaigns and ten times the property-test examples (random seeds).
LONG := VISIONSERVE_ARCH_ALL=1 VISIONSERVE_LONG_TESTS=1 VISIONSERVE_HYPOTHESIS_PROFILE=long
test-all: setup
	$(LONG) $(BIN)/python -m pytest tests/inprocess $(PYTEST_ARGS)
	$(LONG) $(BIN)/python -m pytest -m "" $(XDIST) --durations=30 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check service export tests bench

# Regenerate deploy/requirements/{serve,gpu}.txt after a dependency change in pyproject.toml.
# uv lives in a venv of its own: the dev venv is built from the lock, which may be stale here.
LOCK_TOOLS ?= .venv-lock
lock:
	test -x $(LOCK_TOOLS)/bin/uv || ($(PY) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install --quiet uv)
	UV=$(LOCK_TOOLS)/bin/uv PY=$(PY) bash deploy/requirements/lock.sh

proto: setup
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/visionserve/v1/*.proto proto/visionserve/inference/*.proto

ANCHORS_DIR ?= $(HOME)/.cache/visionserve-anchors

# The Triton peer of `visionserve bench --peer triton`: its own venv (PyTriton's pins clash).
peer-triton:
	test -x $(ANCHORS_DIR)/venv-triton/bin/python || $(PY) -m venv $(ANCHORS_DIR)/venv-triton
	$(ANCHORS_DIR)/venv-triton/bin/pip install --quiet nvidia-pytriton onnxruntime numpy

# Every figure of docs/benchmarks.md (~60 min on 2 cores, the precision ladder ~25 of them; run on an otherwise idle machine).
bench: models peer-triton
	$(BIN)/pip install --quiet -c $(VENV)/serve-constraints.txt -e '.[bench]'
	VS=$(BIN)/visionserve MODELS="lenet5 resnet18 resnet50 mobilenet_v3_small decode ladder signal fleet" \
		bash bench/scripts/run_all.sh

clean:
	rm -rf $(VENV) build *.egg-info tests/.cache
