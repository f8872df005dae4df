#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from the pinned lock file.
# Sourced by runs/*.sh and dev/test.sh so every entry point sets up the same way on a fresh machine.
# Re-running is cheap: nothing is reinstalled unless requirements.lock, requirements-gpu.lock or pyproject.toml changed.
# On a machine where nvidia-smi lists a GPU the gpu extra comes too (requirements-gpu.lock: the `kernels` package, which
# loads Flash Attention 3 on Hopper GPUs); when it cannot be installed, attention falls back to FlexAttention.
set -e
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
LOCKS=("$REPO_ROOT/requirements.lock")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    LOCKS+=("$REPO_ROOT/requirements-gpu.lock")
fi
STAMP="$VENV/.nanochat-installed"
WANT="$(cat "${LOCKS[@]}" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing pinned dependencies from requirements.lock"
    "$VENV/bin/python" -m pip install -q --upgrade pip || true
    # the lock covers the dev and hf extras too, so tests/test_hf.py runs instead of skipping
    # torch is pinned exactly in the lock; on a machine with a local wheel of that version it installs from disk
    "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements.lock"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO_ROOT"
    if [ "${#LOCKS[@]}" -gt 1 ]; then
        echo "[setup] NVIDIA GPU found: installing the gpu extra (kernels, for Flash Attention 3) from requirements-gpu.lock"
        "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements-gpu.lock" \
            || echo "[setup] WARNING: could not install requirements-gpu.lock; attention will use FlexAttention instead of FA3"
    fi
    echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
