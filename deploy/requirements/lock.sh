#!/usr/bin/env bash
# Regenerates the serve image's locks (`make lock`): exact versions with the hashes of every
# wheel, installed with `pip install --require-hashes`. The serving dependencies are resolved
# together with the dev, export and bench extras first, so the dev venv (constrained by
# serve.txt, see the Makefile) and the image run the same versions; gpu.txt is the same set with
# ONNX Runtime's CUDA build (CUDA and cuDNN as pip wheels) in place of the CPU one; openvino.txt
# is serve.txt plus OpenVINO (the openvino extra).
set -euo pipefail
cd "$(dirname "$0")/../.."
UV=${UV:-.venv-lock/bin/uv}
PY=${PY:-python3.11}  # tomllib
target=(--python-version 3.11 --python-platform x86_64-unknown-linux-gnu)
work=.venv-lock/resolution  # a stable path: the locks' "via" notes name it
mkdir -p "$work"
"$UV" pip compile pyproject.toml --extra export --extra dev --extra bench --extra openvino \
  "${target[@]}" \
  --no-header --quiet -o "$work/dev.txt"
"$UV" pip compile pyproject.toml -c "$work/dev.txt" --generate-hashes "${target[@]}" \
  --custom-compile-command "make lock" --quiet -o deploy/requirements/serve.txt
"$PY" - "$work/gpu.in" <<'PY'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
gpu = [d.replace("onnxruntime", "onnxruntime-gpu[cuda,cudnn]", 1)
       if d.startswith("onnxruntime") else d for d in deps]
open(sys.argv[1], "w").write("\n".join(gpu) + "\n")
PY
"$UV" pip compile "$work/gpu.in" -c "$work/dev.txt" --generate-hashes "${target[@]}" \
  --custom-compile-command "make lock" --quiet -o deploy/requirements/gpu.txt
"$UV" pip compile pyproject.toml --extra openvino -c "$work/dev.txt" --generate-hashes \
  "${target[@]}" --custom-compile-command "make lock" --quiet -o deploy/requirements/openvino.txt
