#!/usr/bin/env bash
# The measurements behind docs/benchmarks.md, on an otherwise idle machine (~30 min on 2 cores).
# Needs the default models exported (make serve does it, or `visionserve export lenet5 resnet18
# resnet50 mobilenet_v3_small`) and, for the Triton peer, a venv with nvidia-pytriton at
# $ANCHORS_DIR/venv-triton (see docs/benchmarks.md). Writes docs/bench/<model>.{json,md,png}
# (the figures docs/benchmarks.md quotes).
set -euo pipefail
cd "$(dirname "$0")/../.."
VS=${VS:-.venv/bin/visionserve}
COMMON=(--api kserve --peer triton --duration-s "${DURATION:-4}" --warmup-s 1 --repeats "${REPEATS:-3}")
run() { # model, extra args...
  local m=$1; shift
  "$VS" bench --model "$m" "${COMMON[@]}" "$@" --json "docs/bench/$m.json" \
      --markdown "docs/bench/$m.md" --plot "docs/bench/$m.png"
}
models=${MODELS:-lenet5 resnet18 resnet50 mobilenet_v3_small}
for m in $models; do
  case $m in
    lenet5) run lenet5 --input float32,uint8 --batching on --concurrency 1,4,16,64;;
    resnet18) run resnet18 --input float32 --concurrency 1,4,16,32,64;;
    resnet50) run resnet50 --input float32,jpeg --concurrency 1,4,16,32,64;;
    mobilenet_v3_small) run mobilenet_v3_small --input uint8,jpeg --concurrency 1,4,16,32,64;;
    decode) "$VS" bench-decode --model resnet50 --json docs/bench/decode.json \
              --markdown docs/bench/decode.md;;
    # the CPU precision ladder (exports its INT8/BF16 variants into model_repo where missing;
    # needs the openvino extra: make setup installs it)
    ladder) "$VS" bench-ladder --models resnet50,resnet18,mobilenet_v3_small,efficientnet_lite0 \
              --concurrency 1,8,16 --json docs/bench/ladder.json --markdown docs/bench/ladder.md;;
    # the load signal (utilization vs CPU, queue, p99 at 10-150 % of capacity), ~7 min
    signal) "$VS" bench-signal --models resnet18,mobilenet_v3_small --json docs/bench/signal.json \
              --markdown docs/bench/signal.md --plot docs/images/signal.png;;
    # balancing: an even fleet vs one slow replica, round robin vs weighted_round_robin, ~4 min
    fleet) "$VS" bench-fleet --model resnet18 --json docs/bench/fleet.json \
              --markdown docs/bench/fleet.md;;
  esac
done
