#!/usr/bin/env bash
# Prepares the one GPU run of issue 12 (docs/accuracy-cuda.md) on a machine of the usual
# kind: a stripped release build of the agent in .gpu/ and the wheels the GPU machine
# lacks (MONAI, open_clip and what they need beyond its packages) in .whl/. Both folders
# are ignored by git and travel with the run as carried paths:
#   scripts/gpu_prepare.sh
#   run: carry [".gpu", ".whl"], command "scripts/gpu_session.sh", timeout 540 s
# then, back here: scripts/cuda_tables.py FILES_AT > docs/accuracy-cuda.md
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh --no-web >/dev/null
source scripts/env.sh
cargo build --release --bin headroom
mkdir -p .gpu .whl
strip -o .gpu/headroom "$CARGO_TARGET_DIR/release/headroom"
# The GPU machine runs Python 3.12; these are pure Python or manylinux wheels.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl monai==1.6.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
du -sh .gpu .whl
echo "ready: carry .gpu and .whl, run scripts/gpu_session.sh (REHEARSE=1 rehearses it here on the CPU)"
