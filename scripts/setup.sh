#!/usr/bin/env bash
# Installs everything Headroom needs to build, run and test, from package registries only.
#
# Idempotent: each step checks for its result first, so a second run with nothing
# missing takes seconds. Everything slow lands in $HEADROOM_CACHE (default
# ~/.cache/headroom), outside the checkout, so fresh clones share it.
#
# Usage: scripts/setup.sh [--no-web] [--no-browser]
#   --no-web      skip the WebAssembly toolchain (trunk, wasm-bindgen-cli, wasm-opt)
#   --no-browser  skip Chromium and ChromeDriver (needed only by the browser tests)
# Prints `export` lines for scripts/env.sh to pick up; source scripts/env.sh afterwards.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=scripts/env.sh
source "$here/env.sh"

want_web=1
want_browser=1
for arg in "$@"; do
  case "$arg" in
    --no-web) want_web=0 ;;
    --no-browser) want_browser=0 ;;
    *) echo "setup: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

TORCH_VERSION=2.11.0
TRUNK_VERSION=0.21.14
BINARYEN_VERSION=132

log() { printf '\033[1;34msetup:\033[0m %s\n' "$*" >&2; }
mkdir -p "$HEADROOM_CACHE" "$HEADROOM_TOOLS/bin"

# --- system packages the steps below rely on ------------------------------------------
apt_packages=()
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_packages+=(python3-venv)
command -v g++ >/dev/null || apt_packages+=(g++)
command -v npm >/dev/null || apt_packages+=(nodejs npm)
command -v curl >/dev/null || apt_packages+=(curl)
if [ "$want_browser" = 1 ]; then
  command -v chromium >/dev/null || apt_packages+=(chromium)
  command -v chromedriver >/dev/null || apt_packages+=(chromium-driver)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  log "installing ${apt_packages[*]} from apt"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
if ! cargo fmt --version >/dev/null 2>&1; then
  log "adding rustfmt"
  rustup component add rustfmt
fi

# --- libtorch, through PyPI's torch wheel, in a venv of its own -------------------------
if [ ! -f "$HEADROOM_TORCH_VENV/.complete-$TORCH_VERSION" ]; then
  log "installing torch==$TORCH_VERSION into $HEADROOM_TORCH_VENV (about 5 GB, a minute or two)"
  rm -rf "$HEADROOM_TORCH_VENV"
  python3 -m venv "$HEADROOM_TORCH_VENV"
  "$HEADROOM_TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
  touch "$HEADROOM_TORCH_VENV/.complete-$TORCH_VERSION"
fi

if [ "$want_web" = 1 ]; then
  # --- wasm32 target ---------------------------------------------------------------------
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    log "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
  fi

  # --- trunk (0.22 needs a newer rustc than this machine's) -----------------------------
  if ! "$HEADROOM_TOOLS/bin/trunk" --version 2>/dev/null | grep -q "$TRUNK_VERSION"; then
    log "building trunk $TRUNK_VERSION (about 13 minutes on 2 cores, once)"
    cargo install --quiet --root "$HEADROOM_TOOLS" trunk --version "$TRUNK_VERSION" --locked
  fi

  # --- wasm-bindgen-cli, the exact version of the wasm-bindgen crate in Cargo.lock ------
  wb_version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$root/Cargo.lock")
  [ -n "$wb_version" ] || { echo "setup: no wasm-bindgen in Cargo.lock" >&2; exit 1; }
  if ! "$HEADROOM_TOOLS/bin/wasm-bindgen" --version 2>/dev/null | grep -q " $wb_version\$"; then
    log "building wasm-bindgen-cli $wb_version (about 9 minutes on 2 cores, once)"
    # Its lockfile pins a webpki-roots release the registry no longer serves, so build
    # from the unpacked crate after moving that one dependency back a patch release.
    src="$HEADROOM_CACHE/src/wasm-bindgen-cli-$wb_version"
    if [ ! -f "$src/Cargo.toml" ]; then
      mkdir -p "$HEADROOM_CACHE/src"
      tmp=$(mktemp -d)
      # A throwaway crate that depends on the CLI makes cargo download its .crate.
      (cd "$tmp" && cargo new --quiet fetcher && cd fetcher \
        && cargo add --quiet "wasm-bindgen-cli@=$wb_version" \
        && cargo fetch --quiet)
      crate=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "wasm-bindgen-cli-$wb_version.crate" | head -n 1)
      [ -n "$crate" ] || { echo "setup: cargo did not download wasm-bindgen-cli $wb_version" >&2; exit 1; }
      # Unpack beside, then move into place, so an interrupted run leaves nothing half-done.
      tar -xzf "$crate" -C "$tmp"
      rm -rf "$src"
      mv "$tmp/wasm-bindgen-cli-$wb_version" "$src"
      rm -rf "$tmp"
    fi
    if grep -q 'name = "webpki-roots"' "$src/Cargo.lock" && grep -A1 'name = "webpki-roots"' "$src/Cargo.lock" | grep -q '"1.0.11"'; then
      (cd "$src" && cargo update --quiet -p webpki-roots@1.0.11 --precise 1.0.10)
    fi
    (cd "$src" && cargo install --quiet --root "$HEADROOM_TOOLS" --path . --locked --bin wasm-bindgen)
  fi

  # --- wasm-opt: binaryen from npm (Debian's version 108 produces broken bundles) --------
  if [ ! -x "$HEADROOM_CACHE/npm/node_modules/.bin/wasm-opt" ]; then
    log "installing binaryen@$BINARYEN_VERSION from npm"
    mkdir -p "$HEADROOM_CACHE/npm"
    (cd "$HEADROOM_CACHE/npm" && npm install --silent --no-audit --no-fund "binaryen@$BINARYEN_VERSION" >/dev/null)
  fi
fi

log "ready (cache: $HEADROOM_CACHE)"
