#!/bin/bash
# The prepared GPU session of bench/RESULTS.md ("Next GPU session"), one call per argument:
#   bash bench/gpu_session.sh 1   # GPU tests, then ref_eager,ref_compile_graph,ref_compile_graph_overlap,
#                                 # ref_compile (timeout_s 450)
#   bash bench/gpu_session.sh 2   # ref_eager,ref_repeat_bias,ref_graph,paper_nockpt,paper_graph,
#                                 # ref_compile_augment_graph (timeout_s 340)
# Run through the device tool with kind nvidia-h100-x1 (issue 10 is about an H100) and carry [".whl"]
# (omegaconf, antlr4 and timm wheels: the machine has torch but not these). Results go to /tmp/g (the
# compile caches beside them are large) and the JSONs are copied to $OUT every 10 s and when the script
# ends: a call killed at its time limit still brings back what finished.
set -u
mkdir -p /tmp/g "${OUT:-/tmp/g/out}"
save() { cp /tmp/g/gpu.json* "${OUT:-/tmp/g/out}/" 2>/dev/null; }
(while sleep 10; do save; done) >/dev/null 2>&1 &
COPIER=$!
trap 'kill $COPIER 2>/dev/null; save' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
  1)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/train/test_step.py \
      tests/models/test_student.py tests/models/test_layer_norm.py 2>&1 | tail -15
    # the candidate for 2x right after the baseline: it compiles cold, the others reuse the caches. The
    # budget is what the tests left of the call's 450 s, less a margin for the last variant's record
    budget=$(( 435 - SECONDS )); [ "$budget" -gt 390 ] && budget=390
    python3 bench/gpu_step.py --only ref_eager,ref_compile_graph,ref_compile_graph_overlap,ref_compile --steps 15 \
      --compile-warmup-s 220 --budget-s "$budget" --out /tmp/g/gpu.json
    ;;
  2)
    # --keep-caches: on the machine call 1 warmed, ref_compile_augment_graph reuses its compiled regions
    python3 bench/gpu_step.py --only \
      ref_eager,ref_repeat_bias,ref_graph,paper_nockpt,paper_graph,ref_compile_augment_graph --steps 15 \
      --compile-warmup-s 150 --budget-s 310 --keep-caches --out /tmp/g/gpu.json
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh 1|2" >&2
    exit 2
    ;;
esac
