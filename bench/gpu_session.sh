#!/bin/bash
# The prepared GPU session of bench/RESULTS.md ("Next GPU session"), one call per argument:
#   bash bench/gpu_session.sh 1         # the public code's step (bench/public_step.py), then ref_eager,
#                                       # ref_conv_embed, ref_compile_graph, ref_compile_graph_overlap,
#                                       # ref_compile, then the GPU tests in what is left of 560 s
#                                       # (run's timeout_s 590)
#   bash bench/gpu_session.sh 2 SECONDS # on the machine call 1 warmed: ref_compile_augment_graph, ref_graph,
#                                       # paper_graph, paper_nockpt, then bench/patch_embed_bench.py, within
#                                       # SECONDS (timeout_s SECONDS + 30)
# Through the device tool with carry [".whl", ".public"]: .whl holds the omegaconf, antlr4 and timm wheels
# (the machine has torch but not these), .public/DEO-FM a checkout of the public code
# (git clone https://github.com/wolfilip/DEO-FM .public/DEO-FM). Name kind nvidia-h100-x1 (issue 10's GPU)
# when status lists it; the call may still land on an H200, so the public code's step is measured first,
# on the same GPU, and every ratio is taken against it (gpu_step --public-json). Results go to /tmp/g (the compile caches beside them are large);
# the JSONs are copied to $OUT every 10 s and when the script ends, so a call killed at its time limit
# still brings back what finished. DEO_GPU_SESSION_SMOKE=1 runs the same calls on a CPU with --smoke
# (tiny sizes, compiled variants cut at once), to check the script before spending device time on it.
set -u
if ! { [ "${1:-}" = 1 ] && [ $# = 1 ]; } && ! { [ "${1:-}" = 2 ] && [[ "${2:-}" =~ ^[0-9]+$ ]] && [ $# = 2 ]; }; then
  echo "usage: bash bench/gpu_session.sh 1 | bash bench/gpu_session.sh 2 SECONDS" >&2
  exit 2
fi
S=""; CW=220; PB=""
# smoke: the public step at gpu_step's smoke batch, so that the two records pair
[ -n "${DEO_GPU_SESSION_SMOKE:-}" ] && S="--smoke" && CW=0 && PB="--batch 4"
mkdir -p /tmp/g "${OUT:-/tmp/g/out}"
# the records only: not the .tmp files of their atomic writes, nor the compile caches beside them
save() { cp /tmp/g/gpu.json /tmp/g/gpu.json.*.json /tmp/g/public.json "${OUT:-/tmp/g/out}/" 2>/dev/null; }
(while sleep 10; do save; done) >/dev/null 2>&1 &
COPIER=$!
trap 'kill $COPIER 2>/dev/null; save' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
  1)
    # about 40-60 s; a public step that hangs must leave the candidate its 270 s
    timeout 100 python3 bench/public_step.py $S $PB --public-repo .public/DEO-FM --out /tmp/g/public.json
    # the eager step and its patch-embedding baseline side by side (about 25 s each), then the candidate for
    # 2x: it compiles cold, the others reuse the caches (ref_compile, last, may be cut). The
    # budget is what the public step left of 450 s (at most 390), less a margin for the last record
    budget=$(( 450 - SECONDS )); [ "$budget" -gt 390 ] && budget=390
    python3 bench/gpu_step.py --only ref_eager,ref_conv_embed,ref_compile_graph,ref_compile_graph_overlap,ref_compile \
      --steps 15 \
      --compile-warmup-s $CW --budget-s "$budget" --public-json /tmp/g/public.json --out /tmp/g/gpu.json $S
    left=$(( 560 - SECONDS ))
    if [ "$left" -gt 45 ]; then
      timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider tests/train/test_step.py \
        tests/models/test_student.py tests/models/test_layer_norm.py tests/models/test_patch_embed.py 2>&1 | tail -15
    else
      echo "no time left for the GPU tests ($left s)"
    fi
    ;;
  2)
    budget=$2
    rm -f /tmp/g/gpu.json.*.json  # call 1's records came back already; $OUT takes at most 8 files
    # in priority order (the budget may end early). --keep-caches: on the machine call 1 warmed, the compiled
    # augmentation's variant reuses the step's compiled regions
    python3 bench/gpu_step.py --only ref_compile_augment_graph,ref_graph,paper_graph,paper_nockpt --steps 15 \
      --compile-warmup-s $(( CW ? 120 : 0 )) --budget-s $(( budget - 25 )) --keep-caches \
      --public-json /tmp/g/public.json --out /tmp/g/gpu.json $S
    # the patch embedding alone, both paths side by side (a few seconds; printed in the call's output)
    timeout 25 python3 bench/patch_embed_bench.py $( [ -n "$S" ] && echo --batch 4 --reps 3 )
    ;;
esac
