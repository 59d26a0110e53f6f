#!/usr/bin/env bash
# Writes docs/resume/transcript.txt, the README's "Interrupting and resuming" example: a run stopped by
# SIGTERM mid-epoch, then resumed. Run from the repository root: bash docs/resume/make_transcript.sh
set -u
PY=${PY:-.venv/bin/python}
RUN=runs/resume-demo
rm -rf "$RUN"
{
  echo "\$ python train.py --data-dir ../shared/data --limit 10000 --epochs 2 --run-name resume-demo   # kill -TERM after 15 s"
  "$PY" train.py --data-dir ../shared/data --limit 10000 --epochs 2 --run-name resume-demo 2>&1 &
  sleep 15; kill -TERM $!; wait $!
  echo "(exit code $?)"
  echo "\$ python train.py --resume $RUN"
  "$PY" train.py --resume "$RUN" 2>&1
  echo "(exit code $?)"
} > docs/resume/transcript.txt
