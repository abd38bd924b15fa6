#!/usr/bin/env bash
# Issue 9, Part B in one device call: every row of the table, on one card, in one session.
#
# Here first:   bash scripts/gpu_prep.sh          (wheels into .whl/, the torch anchor into .device/)
# Device call:  run(command="bash scripts/gpu_check.sh", carry=[".whl", ".device"], timeout_s=540)
# CPU smoke:    bash scripts/gpu_check.sh --cpu-smoke   (tiny tower at 64 px, a few minutes)
# A rerun of some steps only: STEPS="3 5" bash scripts/gpu_check.sh  (default: all, 1 to 6).
#
# Prints the Part B table at the end; the log and results.jsonl land in $OUT (default
# /tmp/gpu_check_out); the work files in $WORK (default /tmp/gpu_check).
# Steps run most important first, each under its own time limit, so a cut-off call still
# reports what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0; [ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/gpu_check_out}; WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1 && [ $SMOKE = 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  [ $SMOKE = 0 ] && echo "warning: no .whl/ (run scripts/gpu_prep.sh here first); using what is installed"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
STEPS=" ${STEPS:-1 2 3 4 5 6} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
R="$WORK/results.jsonl";  # $OUT is emptied per call; a rerun on the warm machine adds to R
 CKPT="$WORK/siglip_so400m_512"; CACHE="$WORK/jax_cache"
want 3 && rm -rf "$CACHE"  # a cold compile; a rerun of step 5 alone keeps the cache
rm -rf "$WORK/e2e"; [ "$STEPS" = " 1 2 3 4 5 6 " ] && rm -f "$R"
if [ $SMOKE = 1 ]; then
  TINY=--tiny; BENCH=(--tiny --batch 8 --infer-batch 8 --steps 2 --warmup 1)
  TORCH=(--tiny --batch 8 --infer-batch 8 --steps 2); E2E=(--images 40 --batch 8 --epochs 2 --workers 2)
  LIMIT=600
else
  TINY=; BENCH=(--batch 32 --infer-batch 64 --steps 10 --warmup 2)
  TORCH=(--batch 32 --infer-batch 64 --steps 10); E2E=(--images 800 --batch 32 --epochs 3 --workers 12)
  LIMIT=180
fi

echo "== environment $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, \
'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"

want 1 && {
echo "== 1. parity: SO400M@512 pooled feature vs transformers (random weights)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $LIMIT $PY scripts/gpu_check.py parity --out "$R" \
  --ckpt "$CKPT" $TINY || echo "parity failed ($?)"
}

if ! want 2; then :
elif [ -f .device/torch_reference.py ]; then
  echo "== 2. PyTorch anchor, eager (../shared/anchors/torch_reference.py)"
  timeout $LIMIT $PY .device/torch_reference.py "${TORCH[@]}" > "$WORK/torch_eager.log" \
    || echo "torch eager failed ($?)"
  $PY scripts/gpu_check.py record --out "$R" --name torch_eager --from "$WORK/torch_eager.log"
else
  echo "== 2. skipped: no .device/torch_reference.py (run scripts/gpu_prep.sh here first)"
fi

want 3 && {
echo "== 3. bench: train batch 32 / inference batch 64, cold compile"
timeout $LIMIT $PY -m iqa_jax.bench --config configs/siglip2_gated.py "${BENCH[@]}" \
  --set compilation_cache="$CACHE" | tee "$WORK/bench_cold.log" || echo "bench failed ($?)"
$PY scripts/gpu_check.py record --out "$R" --name bench_cold --from "$WORK/bench_cold.log"
}

want 4 && {
echo "== 4. python -m iqa_jax.train end to end on synthetic JPEGs"
timeout $LIMIT $PY scripts/gpu_check.py e2e --out "$R" --ckpt "$CKPT" --work "$WORK/e2e" \
  --cache "$CACHE" $TINY "${E2E[@]}" || echo "e2e failed ($?)"
}

want 5 && {
echo "== 5. bench again: compile from the persistent cache"
timeout $LIMIT $PY -m iqa_jax.bench --config configs/siglip2_gated.py "${BENCH[@]}" \
  --set compilation_cache="$CACHE" | tee "$WORK/bench_cached.log" || echo "bench failed ($?)"
$PY scripts/gpu_check.py record --out "$R" --name bench_cached --from "$WORK/bench_cached.log"
}

if want 6 && [ -f .device/torch_reference.py ] && [ $SMOKE = 0 ]; then
  echo "== 6. PyTorch anchor, torch.compile"
  timeout $LIMIT $PY .device/torch_reference.py "${TORCH[@]}" --compile > "$WORK/torch_compile.log" \
    || echo "torch compile failed ($?)"
  $PY scripts/gpu_check.py record --out "$R" --name torch_compile --from "$WORK/torch_compile.log"
fi

$PY scripts/gpu_check.py summary --out "$R"
cp "$R" "$OUT/results.jsonl"
