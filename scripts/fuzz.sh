#!/usr/bin/env bash
# Bounded-time fuzzing of what parses untrusted input (shared/src/fuzz.rs): the wire
# codec, the plan parser (text and --set pairs) and the share-link decoder, each for
# SECONDS (default 120), then the hostile-input corpus against a live agent. Prints, per
# target, the inputs tried, how many were rejected and how many panicked (must be 0).
#   scripts/fuzz.sh            # 120 s a target
#   SECONDS_PER_TARGET=600 scripts/fuzz.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh >/dev/null
source scripts/env.sh
export HEADROOM_FUZZ_SECONDS="${SECONDS_PER_TARGET:-120}"
cargo test --release -q -p headroom-shared --lib fuzz:: -- --nocapture --test-threads 1 2>&1 | grep -oE "fuzz [a-z -]+: .* panics|panicked.*|test result.*"
cargo build -q --bin headroom
cargo test -q -p headroom-tests --test e2e hostile:: -- --nocapture --test-threads 1 2>&1 | grep -oE "hostile inputs.*|load: .*|panicked.*|test result.*"
