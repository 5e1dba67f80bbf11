# Thin wrappers; the README's two commands are `make serve` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
REPO    ?= model_repo
DEFAULT_MODELS := lenet5 resnet18 resnet50 mobilenet_v3_small
STAMP   := $(VENV)/.installed

.PHONY: setup serve models test test-fast lint proto bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,dev]'
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(BIN)/visionserve export --if-missing --repo $(REPO) $(DEFAULT_MODELS)

serve: models
	$(BIN)/visionserve serve --repo $(REPO)

test: setup
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check service export tests bench

proto: setup
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/visionserve/v1/*.proto proto/visionserve/inference/*.proto

bench: models
	$(BIN)/visionserve bench --model resnet50 --repo $(REPO) --json bench/results/resnet50.json

clean:
	rm -rf $(VENV) build *.egg-info tests/.cache
