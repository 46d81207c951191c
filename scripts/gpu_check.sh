#!/usr/bin/env bash
# The GPU path, checked in one command on the first GPU this project gets (at most 8 minutes on one GPU):
#   bash scripts/gpu_check.sh OUT_DIR
# Needs no install step (PYTHONPATH=.), no FFCV and no network: the resident loader reads .npz arrays. It uses
#   - full-size synthetic arrays it makes itself (timing), and
#   - gpu_data/: a small real subset (7,000 train / 2,000 test images, ~28 MB) made on a development machine
#     with `python scripts/make_gpu_subset.py` and carried to the GPU machine (learning check; skipped if absent).
# Every step has a timeout; a failed step is recorded in OUT_DIR/steps.jsonl and the next one runs. The report:
# OUT_DIR/report.json and report.md. Steps, most valuable first: environment, the cuda-marked tests, a short real
# run, sync/recompile/graph-break counts, a 20-step profile, the step benchmark, edge modes.
set -u
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
synth="$out/synthetic"

# The whole check keeps to GPU_CHECK_BUDGET seconds (default 480: one device call, leaving time to fix something
# and run it again in a 15-minute session): each step's timeout is cut to what is left, and a step that would get
# less than 20 s is skipped (recorded with rc -1). The report is written in any case.
budget=${GPU_CHECK_BUDGET:-480}
began=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to OUT_DIR/NAME.log, record the exit status
  local name=$1 limit=$2 start rc left
  shift 2
  start=$(date +%s)
  left=$((budget - (start - began)))
  if [ "$left" -lt 20 ]; then
    printf '{"step": "%s", "rc": -1, "seconds": 0, "skipped": "budget spent"}\n' "$name" >>"$out/steps.jsonl"
    echo "[$name] skipped: GPU_CHECK_BUDGET spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -s TERM -k 15 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$out/steps.jsonl"
  echo "[$name] exit $rc after $(($(date +%s) - start)) s (log: $out/$name.log)"
}

train() {  # train NAME SECONDS OPTIONS...: a run into OUT_DIR/runs/NAME
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$py" -m fastcifar.train --data.loader resident --run.progress off \
    --out-dir "$out/runs" --name "$name" --overwrite "$@"
}

rm -f "$out/steps.jsonl"
step env 60 "$py" scripts/gpu_check.py env "$out"
step cuda_tests 200 "$py" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
if [ -f gpu_data/train.npz ]; then
  train real 120 --data.data_dir gpu_data --epochs 10 --schedule.peak_epoch 2
fi
step synth 60 "$py" scripts/gpu_check.py synth "$out" "$synth"
train synthetic 90 --data.data_dir "$synth" --epochs 3 --schedule.peak_epoch 1
step counts 90 "$py" scripts/gpu_check.py counts "$out" "$synth"
step profile 90 "$py" scripts/gpu_check.py profile "$out" "$synth"
step step_bench 120 "$py" -m benchmarks.run --sections step,physics --device cuda --data-dir "$synth" \
  --out-dir "$out" --markdown ''
edge_data=${synth}
[ -f gpu_data/train.npz ] && edge_data=gpu_data
train edge_fp16 60 --data.data_dir "$edge_data" --epochs 2 --schedule.peak_epoch 1 --precision fp16
train edge_deterministic 60 --data.data_dir "$edge_data" --epochs 1 --schedule.peak_epoch 1 --run.deterministic true
train edge_graphs_tta 90 --data.data_dir "$edge_data" --epochs 1 --schedule.peak_epoch 1 --precision fp32 \
  --run.compile_mode reduce-overhead --data.test_flip true --data.test_translate 1
# SIGTERM in the middle of a run, then --resume: the run must finish with all its epochs
step edge_sigterm 60 timeout -s TERM 25 "$py" -m fastcifar.train --data.loader resident --run.progress off \
  --data.data_dir "$synth" --epochs 6 --schedule.peak_epoch 1 --out-dir "$out/runs" --name edge_resume --overwrite
step edge_resume 90 "$py" -m fastcifar.train --resume "$out/runs/edge_resume"
"$py" scripts/gpu_check.py report "$out"
