#!/usr/bin/env bash
# Prints the planner's performance figures for docs/performance.md, measured side by
# side in one run: the release bundle's size raw and gzipped, one estimate per zoo model
# and the advisor's search natively, and, in headless Chromium, the time from navigation
# to the first estimate and the advisor's 10,000-combination search.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh >/dev/null
source scripts/env.sh
trunk build --release >/dev/null 2>&1
echo "## Release bundle (planner-web/dist)"
echo
echo "| file | bytes | gzip -9 bytes |"
echo "|---|---:|---:|"
total=0; total_gz=0
for f in planner-web/dist/*.wasm planner-web/dist/*.js planner-web/dist/*.css planner-web/dist/index.html; do
  raw=$(stat -c %s "$f"); gz=$(gzip -9 -c "$f" | wc -c)
  total=$((total + raw)); total_gz=$((total_gz + gz))
  echo "| $(basename "$f" | sed -E 's/-[0-9a-f]{8,}//') | $raw | $gz |"
done
echo "| all | $total | $total_gz |"
echo
# A 100 MB exported model with its weights, from the cached torch (hand-written: torch alone).
pt2_dir=$(mktemp -d)
"$HEADROOM_TORCH_VENV/bin/python" scripts/own_models.py --export "$pt2_dir" --weights --only big_mlp 2>/dev/null
HEADROOM_BENCH_PT2="$pt2_dir/big_mlp.pt2" cargo run --release -q -p headroom-shared --example bench
rm -rf "$pt2_dir"
echo
cargo build -q
cargo test -q -p headroom-tests --test e2e the_planner_explains >/dev/null 2>&1
echo "## In headless Chromium (target/e2e-perf.json)"
echo
echo '```json'
cat target/e2e-perf.json
echo
echo '```'
