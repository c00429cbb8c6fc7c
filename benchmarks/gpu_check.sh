#!/usr/bin/env bash
# Everything a lent GPU should show for the fused step, in under 8 minutes (each part has its own time limit):
#   1. every kernel `python -m hf_win.optim.kernels.aot` compiles (optimizer x mode x precision x flags x
#      clipping) compiled and launched on the device against foreach, 8 processes (PASS/FAIL)
#   2. Triton kernel against foreach on ViT-B-sized shapes: every optimizer x mode, fp32 and bf16 (PASS/FAIL)
#   3. steps under torch.cuda.set_sync_debug_mode("error"): no host-device synchronisation in a step
#   4. first fused step with an empty Triton cache, then cached (two fresh processes), ViT-B shapes
#   5. step time on ViT-B/16's parameter shapes (86.6M, 152 tensors), every optimizer x mode
#   6. step time on a 1.3B decoder's shapes (GPT-2 style: d=2048, 24 layers, vocab 50304, context 2048,
#      tied head: 1.32B parameters, 292 tensors; see benchmarks/step_time.py gpt_shapes)
#   7. host cost: 1,000 tensors of 1,000 elements and 10,000 of 10, AdamW-Win x modes
#   8. FSDP2 (fully_shard, 1-GPU mesh) stepped by the Triton kernel on the local shards against the
#      unsharded model (benchmarks/gpu_check_dist.py)
# Step times are CUDA-event medians with their ratio to torch.optim.AdamW(fused=True) in the same process,
# the GB/s the floor's bytes imply and the device's copy bandwidth measured in the same run.
# Results: benchmarks/results/*_cuda.md (each with the machine and the command) and gpu_check_cuda.log,
# copied to "$OUT" when it is set. Run from anywhere:  bash benchmarks/gpu_check.sh
# Needs python3 with torch (CUDA) and triton; imports hf_win.optim / hf_win.registry only.
# GPU_CHECK_CPU_SMOKE=1: the same commands on CPU with tiny shapes (Triton's interpreter), results in a temp
# folder: a check of this script on a machine without a GPU, not a measurement.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export KINETO_LOG_LEVEL=5
PY="${PYTHON:-python3}"
RES=benchmarks/results
DEV=(--device cuda); VIT=vit_b; GPT=gpt_1_3b; TINY=(); MATRIX=(--workers 8); MANY=""
BUDGET=465          # seconds for all parts together (8 minutes = 480, less a margin to copy results)
CHILD=24; LIMIT=0   # first-step: seconds per process; LIMIT > 0 replaces every part's own timeout
if [[ "${GPU_CHECK_CPU_SMOKE:-0}" == 1 ]]; then
    export TRITON_INTERPRET=1
    RES=$(mktemp -d); DEV=(--device cpu); VIT=tiny; GPT=tiny; TINY=(--tiny --optimizers adamw_win --modes win)
    MATRIX=(--tiny --workers 2); MANY=tiny
    BUDGET=1800; CHILD=600; LIMIT=600  # the interpreter is slow; nothing here is timed
fi
mkdir -p "$RES"
LOG="$RES/gpu_check_${DEV[1]}.log"
: > "$LOG"
START=$SECONDS
FAILED=()

part() {  # part NAME SECONDS command...: run under `timeout`, never past the overall budget
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - (SECONDS - START) ))
    if (( left < 20 )); then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; FAILED+=("$name (skipped)"); return
    fi
    (( LIMIT > 0 )) && limit=$LIMIT
    (( limit > left )) && limit=$left
    echo "== $name (timeout ${limit}s, $(( SECONDS - START ))s elapsed): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( SECONDS - t0 ))s" | tee -a "$LOG"
    (( rc != 0 )) && FAILED+=("$name (exit $rc$( (( rc == 124 || rc == 137 )) && echo ', timed out'))")
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -5
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())" 2>&1
} | tee -a "$LOG"

part matrix 110 "$PY" benchmarks/gpu_check.py matrix "${DEV[@]}" "${MATRIX[@]}" --out "$RES"
part correctness 65 "$PY" benchmarks/gpu_check.py correctness "${DEV[@]}" "${TINY[@]}" --out "$RES"
part sync 25 "$PY" benchmarks/gpu_check.py sync "${DEV[@]}" --out "$RES"
part first-step 45 "$PY" benchmarks/gpu_check.py first-step "${DEV[@]}" --params "$VIT" "${TINY[@]}" \
    --child_timeout "$CHILD" --out "$RES"
part step-time-vit-b 65 "$PY" benchmarks/step_time.py "${DEV[@]}" --params "$VIT" --paths triton foreach \
    --repeats 20 --warmup 3 --no_memory --out "$RES"
part step-time-gpt-1.3b 65 "$PY" benchmarks/step_time.py "${DEV[@]}" --params "$GPT" \
    --optimizers adamw_win lamb_win adan_win --modes win win2 none --paths triton --baselines fused \
    --repeats 15 --warmup 3 --no_memory --out "$RES"
for SET in many_1000x1000 many_10000x10; do
    part "host-cost-$SET" 20 "$PY" benchmarks/step_time.py "${DEV[@]}" --params "${MANY:-$SET}" \
        --optimizers adamw_win --modes win win2 none --paths triton --baselines fused --repeats 10 --warmup 2 \
        --no_memory --tag "$SET" --out "$RES"
done

# --- distributed (FSDP2 on the Triton kernel; the dist branch's section) ---
dist_checks() {
    part fsdp2-triton 50 "$PY" benchmarks/gpu_check_dist.py "${DEV[@]}" --out "$RES"
}
dist_checks

echo "== total $(( SECONDS - START ))s; ${#FAILED[@]} part(s) failed or timed out: ${FAILED[*]:-none}" | tee -a "$LOG"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/results"
    echo "copying results to $OUT/results" | tee -a "$LOG"
    cp "$RES"/*_"${DEV[1]}"*.md "$RES"/*_"${DEV[1]}"*.csv "$LOG" "$OUT/results/" 2>/dev/null
fi
(( ${#FAILED[@]} == 0 ))
