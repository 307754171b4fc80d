#!/usr/bin/env bash
# GPU smoke test of the scale paths that CPU tests can only configure: a few steps of the tiny CLIP bench recipe
# (experiments/clip/bench_tiny.yaml) on one GPU under DDP, FSDP (FSDP1), FSDP2 and DeepSpeed ZeRO-2, in fp32,
# bf16-mixed and 16-mixed, printing images/s for each (ThroughputMonitor's perf/samples_per_sec, last window).
#
#   bench/gpu_smoke.sh [STEPS]        # default 30 steps per run; PY=/path/to/python to choose the interpreter
#
# Without a CUDA GPU it says so and exits 0 (the CPU paths - DDP and FSDP2 on 2 gloo processes, resume, the NaN
# guard - are covered by `make test`). DeepSpeed is pip-installed when missing; where that fails the run is skipped.
# Data: 2048 generated image-caption pairs (tests/conftest.py's shapes), so nothing is downloaded. Exit code 1 when
# any run failed; each run's log is printed when it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STEPS=${1:-30}
BATCH=256

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_smoke: no CUDA GPU here, nothing to run (CPU scale paths are tested by \`make test\`)."
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$WORK/shards" <<'EOF'
import sys

sys.path.insert(0, "tests")
from conftest import generate_shards

generate_shards(sys.argv[1], n=2048, per_shard=512, image_size=64, num_classes=8)
EOF

images_per_second() {  # the last perf/samples_per_sec logged by a run's CSVLogger
  "$PY" - "$1" <<'EOF'
import csv, sys

rows = [row for row in csv.DictReader(open(sys.argv[1])) if row.get("perf/samples_per_sec")]
print(f"{float(rows[-1]['perf/samples_per_sec']):.0f}" if rows else "n/a")
EOF
}

failures=0
results=()
run() {  # run FRAGMENT PRECISION
  local name="$1-$2"
  if "$PY" -m vlp_lightning.cli fit --config experiments/clip/bench_tiny.yaml --config "experiments/trainer/$1.yaml" \
      --trainer.accelerator gpu --trainer.devices 1 --trainer.precision "$2" --trainer.max_steps "$STEPS" \
      --trainer.log_every_n_steps 1 --trainer.enable_progress_bar false \
      --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$WORK/logs" \
      --trainer.logger.name "$name" --experiment "$name" \
      --checkpoint.dirpath "$WORK/checkpoints/$name" --data.init_args.batch_size "$BATCH" \
      --data.init_args.train_shards "$WORK/shards/train-{000000..000003}.tar" >"$WORK/$name.log" 2>&1; then
    local rate
    rate=$(images_per_second "$WORK/logs/$name/version_0/metrics.csv")
    results+=("$(printf '%-18s %-11s %8s images/s' "$1" "$2" "$rate")")
  else
    failures=$((failures + 1))
    results+=("$(printf '%-18s %-11s   FAILED (log above)' "$1" "$2")")
    echo "===== $name failed; its log:"
    tail -n 40 "$WORK/$name.log"
  fi
}

run ddp 32-true
run ddp bf16-mixed
run ddp 16-mixed
run fsdp bf16-mixed
run fsdp2 bf16-mixed
if "$PY" -c 'import deepspeed' 2>/dev/null || "$PY" -m pip install -q deepspeed; then
  run deepspeed_stage2 bf16-mixed
else
  results+=("$(printf '%-18s %-11s   skipped (deepspeed could not be installed)' deepspeed_stage2 bf16-mixed)")
fi

echo
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
echo "gpu_smoke: tiny CLIP, batch $BATCH, $STEPS steps on $device"
printf '%s\n' "${results[@]}"
exit $((failures > 0))
