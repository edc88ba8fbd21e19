#!/usr/bin/env bash
# Runs the product: installs what is missing, builds the planner and the agent, and
# serves the planner on loopback. Open the URL it prints (it carries the access token).
# Trains on the first CUDA GPU if there is one, otherwise on the CPU.
#
# Usage: scripts/run.sh [headroom serve options], e.g. --listen 127.0.0.1:9000
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh --no-browser
source scripts/env.sh
echo "building the planner (trunk) and the agent (cargo)…" >&2
trunk build --release >/dev/null
cargo build
exec "$CARGO_TARGET_DIR/debug/headroom" serve --web-dir "$root/planner-web/dist" "$@"
