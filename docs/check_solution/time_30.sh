#!/usr/bin/env bash
# Writes docs/check_solution/timing.txt: check_solution.py's wall time for 30 submissions (the 7 published
# solutions of tests/solutions/ and this project's layers.py, copied round robin), with net.train, and for one
# submission without it. Run from the repository root: bash docs/check_solution/time_30.sh
set -eu
PY=${PY:-.venv/bin/python}
SUBS=$(mktemp -d)
trap 'rm -rf "$SUBS"' EXIT
sources=(tests/solutions/*/)
mkdir -p "$SUBS/project" && cp layers.py hinge_loss.py "$SUBS/project/"
sources+=("$SUBS/project/")
for i in $(seq -w 1 30); do
  cp -r "${sources[$(( (10#$i - 1) % ${#sources[@]} ))]}" "$SUBS/submission_$i"
done
rm -rf "$SUBS/project"
out=docs/check_solution/timing.txt
{
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags: $(grep -o 'avx512_bf16\|avx2' /proc/cpuinfo | sort -u | xargs); cores: $(nproc); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  "$PY" check_solution.py "$SUBS"/submission_*/ --data-dir ../shared/data --markdown "$SUBS/grades.md" > /dev/null || true
  echo "30 submissions, with net.train: $(echo "$(date +%s.%N) - $start" | bc) s"
  start=$(date +%s.%N)
  "$PY" check_solution.py "$SUBS/submission_01/" --no-train > /dev/null || true
  echo "1 submission, --no-train: $(echo "$(date +%s.%N) - $start" | bc) s"
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out"
cat "$out"
