#!/usr/bin/env bash
# Build a real ComfyUI host for tests/test_real_host.py (README: "Testing inside a real ComfyUI").
#
#   scripts/host_env.sh [COMFYUI_PATH] [VENV]
#
# COMFYUI_PATH  a ComfyUI checkout, kept outside this repository; cloned (tag $COMFYUI_REF, default
#               v0.3.64) when the folder has no main.py. Default: ../ComfyUI next to this repository.
# VENV          the host's own virtual environment. Default: comfy-venv next to the checkout, where the
#               test looks for it (COMFYUI_PYTHON overrides that).
#
# ComfyUI imports torchvision unconditionally; the CPU-only torch wheel some machines prefer has no
# matching torchvision, so the host gets the regular torch build (it runs on the CPU with --cpu; ~4.8 GB).
# PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= make pip ignore a local wheel directory configured for pip.
# The test side (the Python that runs pytest) gets playwright; the browser is the system's chromium
# (Debian: apt-get install chromium); `playwright install` is never needed.
set -euo pipefail

PACK="$(cd "$(dirname "$0")/.." && pwd)"
COMFYUI_PATH="$(realpath -m "${1:-${COMFYUI_PATH:-$PACK/../ComfyUI}}")"
VENV="$(realpath -m "${2:-$(dirname "$COMFYUI_PATH")/comfy-venv}")"
COMFYUI_REF="${COMFYUI_REF:-v0.3.64}"
TEST_PYTHON="${TEST_PYTHON:-python3}"
case "$COMFYUI_PATH/" in "$PACK"/*) echo "keep the ComfyUI checkout outside this repository" >&2; exit 2;; esac

if [ ! -f "$COMFYUI_PATH/main.py" ]; then
    git clone --depth 1 --branch "$COMFYUI_REF" https://github.com/Comfy-Org/ComfyUI.git "$COMFYUI_PATH"
fi

host_pip() { PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$VENV/bin/python" -m pip "$@"; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
host_pip install --upgrade pip
host_pip install torch==2.13.0 torchvision==0.28.0
grep -v '^torch' "$COMFYUI_PATH/requirements.txt" | host_pip install -r /dev/stdin torchsde
host_pip install -r "$PACK/requirements.txt"

# The host must start with the pack loaded: a custom_nodes folder holding a link to this repository,
# mapped through extra_model_paths.yaml (ComfyUI only logs import failures, so read its log).
CHECK="$(mktemp -d)"
trap 'rm -rf "$CHECK"' EXIT
mkdir -p "$CHECK/custom_nodes" "$CHECK/user"
ln -s "$PACK" "$CHECK/custom_nodes/ComfyUI-Harmonize"
printf 'harmonize_check:\n  custom_nodes: %s\n' "$CHECK/custom_nodes" > "$CHECK/extra_model_paths.yaml"
(cd "$COMFYUI_PATH" && "$VENV/bin/python" main.py --cpu --quick-test-for-ci --disable-auto-launch \
    --user-directory "$CHECK/user" --database-url "sqlite:///$CHECK/comfyui.db" \
    --extra-model-paths-config "$CHECK/extra_model_paths.yaml") > "$CHECK/log.txt" 2>&1 \
    || { tail -n 40 "$CHECK/log.txt"; echo "ComfyUI did not start" >&2; exit 1; }
if grep -E "IMPORT FAILED|Cannot import" "$CHECK/log.txt" | grep -q "ComfyUI-Harmonize"; then
    grep -B 30 "ComfyUI-Harmonize" "$CHECK/log.txt" | tail -n 60; echo "the pack failed to import" >&2; exit 1
fi
grep -q "seconds: .*ComfyUI-Harmonize" "$CHECK/log.txt" || { tail -n 40 "$CHECK/log.txt"; exit 1; }

"$TEST_PYTHON" -m pip install playwright
command -v chromium >/dev/null || echo "no chromium on PATH: install it (Debian: apt-get install chromium)," \
    "or the test converts workflows without the front end"

echo
echo "host ready: ComfyUI $COMFYUI_PATH, python $VENV/bin/python"
echo "run:  COMFYUI_PATH=$COMFYUI_PATH COMFYUI_PYTHON=$VENV/bin/python $TEST_PYTHON -m pytest -q tests/test_real_host.py"
