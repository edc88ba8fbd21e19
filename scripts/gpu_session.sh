#!/usr/bin/env bash
# Issue 12's GPU run, on the GPU machine (torch 2.11.0+cu130 installed, no registry),
# with .gpu/headroom and .whl/ carried from scripts/gpu_prepare.sh. Writes to $OUT:
#   env.txt              the device, driver, CUDA, cuDNN and package versions
#   cuda_context.json    the CUDA context and workspaces per lazy-loading setting
#   cuda_reference.json  PyTorch's own peaks for the zoo configurations and W1-W3, W5
#   accuracy-cuda-headroom.md  `headroom accuracy --device cuda`: W1-W5 before and
#                        after, estimate vs the trainer's allocated, reserved and NVML
#   session.log          everything printed
# REHEARSE=1 runs the same steps on this machine's CPU, with tiny sizes, in seconds.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
t0=$(date +%s)
step() { echo "== $(( $(date +%s) - t0 )) s: $*"; }

if [ "${REHEARSE:-0}" = 1 ]; then
  source scripts/env.sh
  PY=${PY:-$HOME/.cache/headroom/ref/bin/python3}
  DEVICE=cpu
  QUICK=--quick
else
  PY=python3
  DEVICE=cuda
  QUICK=
  step "wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
HEADROOM=${HEADROOM:-.gpu/headroom}
[ -x "$HEADROOM" ] || HEADROOM="$CARGO_TARGET_DIR/debug/headroom"
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "environment"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for n in ("torchvision", "timm", "monai", "transformers", "open_clip"):
    try:
        print(n, __import__(n).__version__)
    except ImportError as e:
        print(n, "missing:", e)
print("cuda available", torch.cuda.is_available())
PY
  "$HEADROOM" --version
  "$HEADROOM" probe --model mlp --device "$DEVICE" --steps 2 --json | head -c 600; echo
} | tee "$OUT/env.txt"

step "PyTorch's own peaks and the CUDA context (scripts/cuda_reference.py)"
PYTHONUNBUFFERED=1 "$PY" scripts/cuda_reference.py --device "$DEVICE" $QUICK --out "$OUT"

step "the trainer against its estimate (headroom accuracy)"
if [ "$DEVICE" = cuda ]; then
  "$HEADROOM" accuracy --device cuda:0 --steps 6 --out "$OUT/accuracy-cuda-headroom.md"
else
  # The CPU rehearsal: one small plan through the same measuring path.
  "$HEADROOM" probe --model small_cnn --device cpu --steps 3 --json > "$OUT/probe-cpu.json"
fi
step "done"
ls -la "$OUT"
sleep 1  # let tee write the last lines
