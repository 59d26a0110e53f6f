#!/usr/bin/env bash
# Writes docs/fast_cifar/: the README's "Beyond the lab" runs of train_cifar_fast.py, one after another, each
# into its own folder with its log (the trained models are left out). Run from the repository root, on an
# otherwise idle machine, with the CIFAR-10 batches in DATA (default: data):
#   bash docs/fast_cifar/make_runs.sh [DATA]
set -eu
PY=${PY:-.venv/bin/python}
DATA=${1:-data}
OUT=docs/fast_cifar
run() {
  name=$1; shift
  log=$(mktemp)
  echo "\$ python train_cifar_fast.py --data-dir $DATA $*" > "$log"
  "$PY" train_cifar_fast.py --data-dir "$DATA" --save-dir "$OUT" --run-name "$name" --overwrite "$@" >> "$log" 2>&1
  mv "$log" "$OUT/$name/train.log"
  rm -f "$OUT/$name"/model_seed*.pt
}
run cpu_budget600 --time-budget 600 --seeds 3   # the CPU preset, sized to 600 s
run gpu_on_cpu --preset gpu --device cpu        # the GPU preset's exact schedule, on the CPU
run cpu --seeds 3                               # the CPU preset: 7 epochs, bfloat16 where the CPU computes it
run cpu_fp32 --precision fp32                   # the same in float32
