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
# The default members (shared, agent, tests), as `cargo test` builds them, so that
# dependencies are compiled once with one set of features.
cargo build
step "tests"
# The planner's rules (its form, agent addresses, chart thinning) live in `shared` and are
# tested there: its own crate holds only Leptos views and browser glue, which the
# Chromium tests exercise, so nothing compiles Leptos natively.
cargo test
