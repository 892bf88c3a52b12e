#!/bin/bash
# The prepared GPU session of bench/RESULTS.md ("Next GPU session"), one call per argument:
#   bash bench/gpu_session.sh 1         # the public code's step (bench/public_step.py), then ref_eager,
#                                       # ref_compile_graph, ref_compile_graph_overlap, ref_compile, then the
#                                       # GPU tests in what is left of 560 s (run's timeout_s 590)
#   bash bench/gpu_session.sh 2 SECONDS # on the machine call 1 warmed: ref_graph, ref_compile_augment_graph,
#                                       # paper_nockpt, paper_graph within SECONDS (timeout_s SECONDS + 30)
# Through the device tool with carry [".whl", ".public"]: .whl holds the omegaconf, antlr4 and timm wheels
# (the machine has torch but not these), .public/DEO-FM a checkout of the public code
# (git clone https://github.com/wolfilip/DEO-FM .public/DEO-FM). The lent machines are H200s, not issue
# 10's H100, so the public code's step is measured first, on the same GPU, and every ratio is taken
# against it (gpu_step --public-json). Results go to /tmp/g (the compile caches beside them are large);
# the JSONs are copied to $OUT every 10 s and when the script ends, so a call killed at its time limit
# still brings back what finished. DEO_GPU_SESSION_SMOKE=1 runs the same calls on a CPU with --smoke
# (tiny sizes, compiled variants cut at once), to check the script before spending device time on it.
set -u
case "${1:-}:${2:-}" in
  1:) ;;
  2:[0-9]*) ;;
  *) echo "usage: bash bench/gpu_session.sh 1 | bash bench/gpu_session.sh 2 SECONDS" >&2; exit 2 ;;
esac
S=""; CW=220
[ -n "${DEO_GPU_SESSION_SMOKE:-}" ] && S="--smoke" && CW=0
mkdir -p /tmp/g "${OUT:-/tmp/g/out}"
save() { cp /tmp/g/gpu.json* /tmp/g/public.json "${OUT:-/tmp/g/out}/" 2>/dev/null; }
(while sleep 10; do save; done) >/dev/null 2>&1 &
COPIER=$!
trap 'kill $COPIER 2>/dev/null; save' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
  1)
    timeout 150 python3 bench/public_step.py $S --public-repo .public/DEO-FM --out /tmp/g/public.json
    # the candidate for 2x right after the baseline: it compiles cold, the others reuse the caches. The
    # budget is what the public step left of 450 s (at most 390), less a margin for the last record
    budget=$(( 450 - SECONDS )); [ "$budget" -gt 390 ] && budget=390
    python3 bench/gpu_step.py --only ref_eager,ref_compile_graph,ref_compile_graph_overlap,ref_compile --steps 15 \
      --compile-warmup-s $CW --budget-s "$budget" --public-json /tmp/g/public.json --out /tmp/g/gpu.json $S
    left=$(( 560 - SECONDS ))
    if [ "$left" -gt 45 ]; then
      timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider tests/train/test_step.py \
        tests/models/test_student.py tests/models/test_layer_norm.py 2>&1 | tail -15
    else
      echo "no time left for the GPU tests ($left s)"
    fi
    ;;
  2)
    budget=$2
    rm -f /tmp/g/gpu.json.*.json  # call 1's records came back already; $OUT takes at most 8 files
    # --keep-caches: on the machine call 1 warmed, the compiled variant reuses its compiled regions
    python3 bench/gpu_step.py --only ref_graph,ref_compile_augment_graph,paper_nockpt,paper_graph --steps 15 \
      --compile-warmup-s $(( CW ? 120 : 0 )) --budget-s "$budget" --keep-caches --public-json /tmp/g/public.json \
      --out /tmp/g/gpu.json $S
    ;;
esac
