#!/usr/bin/env bash
# The measured column of docs/official_code.md: best val SRCC/PLCC on the reduced demo
# (demo_small: 14 photos x 4 tiles, 1,120 images; tiny random tower trained whole, 10 epochs),
# seeds 8, 19, 25, the demo recipe and one official-code field switched at a time, then all.
# Usage: bash scripts/official_demo_diffs.sh OUT   (run from the repository root; ~1 min a run
# on 2 busy cores). Prints one row per variant: mean and std over seeds.
set -euo pipefail
OUT=${1:-checkpoints/official}
ROOT=$(pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT" && cd "$OUT"
[ -f demo_small/dmos.csv ] || "$PY" -c "from iqa_jax.data.demo import build_demo; build_demo('demo_small', tiles=4)"
declare -A VARIANTS=(
  [paper]=""
  [head_agm]="--config.model.head=agm"
  [margin_official_swapped]="--config.loss.margin_form=official_swapped"
  [finetune_lora_full]="--config.model.finetune=lora_full"
  [official_all]="--config.model.head=agm --config.model.finetune=lora_full --config.loss.margin_form=official_swapped --config.optim.epochs=15 --config.optim.schedule=constant"
)
for name in paper head_agm margin_official_swapped finetune_lora_full official_all; do
  for seed in 8 19 25; do
    run=runs/${name}_s${seed}
    [ -f "$run/results.json" ] && continue
    # shellcheck disable=SC2086
    "$PY" -m iqa_jax.train --config "$ROOT/configs/demo.py:epochs=10,dir=demo_small,seed=$seed" \
      --config.progress=False ${VARIANTS[$name]} --workdir "$run" > "$run.log" 2>&1
  done
done
"$PY" - <<'PY'
import json, pathlib, statistics as st
for name in ("paper", "head_agm", "margin_official_swapped", "finetune_lora_full", "official_all"):
  best = [json.loads(p.read_text())["best"] for p in sorted(pathlib.Path("runs").glob(f"{name}_s*/results.json"))]
  if not best:
    continue
  s, p = [b["srcc"] for b in best], [b["plcc"] for b in best]
  sd = lambda v: st.stdev(v) if len(v) > 1 else 0.0
  print(f"| {name} | {len(best)} | {st.mean(s):.4f} ± {sd(s):.4f} | {st.mean(p):.4f} ± {sd(p):.4f} |")
PY
