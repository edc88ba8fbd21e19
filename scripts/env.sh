# Sourced by the other scripts: where the cached toolchain lives and how to reach it.
# Safe to source from an interactive shell too.
export HEADROOM_CACHE="${HEADROOM_CACHE:-$HOME/.cache/headroom}"
export HEADROOM_TOOLS="$HEADROOM_CACHE/tools"
export HEADROOM_TORCH_VENV="$HEADROOM_CACHE/torch-2.11.0"
# tch's build script finds libtorch through this python's torch package.
export LIBTORCH_USE_PYTORCH=1
export PATH="$HEADROOM_TORCH_VENV/bin:$HEADROOM_TOOLS/bin:$HEADROOM_CACHE/npm/node_modules/.bin:$PATH"
# One target dir for every clone, so warm builds stay warm; override to isolate.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HEADROOM_CACHE/target}"
