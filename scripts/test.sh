#!/usr/bin/env bash
# Runs every test: formatting, unit tests, the agent over a real WebSocket with real
# libtorch, the CLI, and the planner in headless Chromium. Installs what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
source scripts/env.sh
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "formatting"
cargo fmt --all --check
step "planner bundle (trunk)"
trunk build --release
step "agent binary (the end-to-end tests start it)"
cargo build -p headroom-agent
step "tests"
cargo test --workspace
