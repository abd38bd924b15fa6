#!/usr/bin/env bash
# Prepares a checkout for scripts/gpu_check.sh on a lent GPU machine (issue 9, Part B).
# Run here, on the connected machine, from the repository root:   bash scripts/gpu_prep.sh
#
# The device image has jax, flax, optax, orbax, torch, transformers and peft but not grain,
# ml-collections, array-record or openpyxl (nor portpicker, et-xmlfile), and it reaches no
# registry: their x86-64 CPython 3.12 wheels go into .whl/. The PyTorch anchor
# (../shared/anchors/torch_reference.py) does not travel with the device tool and is never
# committed: it is copied into .device/. Both folders are ignored through .git/info/exclude.
# Then the device call carries them: run(command="bash scripts/gpu_check.sh",
# carry=[".whl", ".device"], timeout_s=480).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
for d in /.whl/ /.device/; do
  grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"
done

PY=${PYTHON:-python3}
WHEELS=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 openpyxl==3.1.5
        et-xmlfile==2.0.0 portpicker==1.6.0)
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
         manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
ls -l .whl

anchor=${ANCHOR:-../shared/anchors/torch_reference.py}
[ -f "$anchor" ] || anchor=/work/shared/anchors/torch_reference.py
mkdir -p .device
if [ -f "$anchor" ]; then
  cp "$anchor" .device/torch_reference.py && echo "copied $anchor -> .device/torch_reference.py"
else
  echo "warning: no torch_reference.py at ../shared/anchors (set ANCHOR=PATH); the PyTorch rows" \
       "will be skipped" >&2
fi
du -sh .whl .device
