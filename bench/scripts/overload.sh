#!/usr/bin/env bash
# Regenerates docs/bench/overload/: MobileNet v3 small (uint8, KServe), open loop at 2x its
# measured capacity for 20 s between two 10 s phases at half of it, with the defaults, with
# a 500 ms client deadline, and without the server-wide in-flight limit (for comparison).
set -euo pipefail
cd "$(dirname "$0")/../.."
VS=${VS:-.venv/bin/visionserve}
OUT=docs/bench/overload
mkdir -p "$OUT"
common=(--model mobilenet_v3_small --repo "${REPO:-model_repo}" --duration-s 20 --calm-s 10)
$VS bench-overload "${common[@]}" --json "$OUT/default.json" --markdown "$OUT/default.md"
cap=$(python3 -c "import json; print(json.load(open('$OUT/default.json'))['capacity_requests_per_s'])")
$VS bench-overload "${common[@]}" --capacity "$cap" --deadline-ms 500 \
  --json "$OUT/deadline500.json" --markdown "$OUT/deadline500.md"
$VS bench-overload "${common[@]}" --capacity "$cap" --serve-args "--max-inflight-requests 0" \
  --json "$OUT/no-inflight-limit.json" --markdown "$OUT/no-inflight-limit.md"
