#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from the pinned lock file.
# Sourced by runs/*.sh and dev/test.sh so every entry point sets up the same way on a fresh machine.
# Re-running is cheap: nothing is reinstalled unless requirements.lock or pyproject.toml changed.
set -e
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.nanochat-installed"
WANT="$(cat "$REPO_ROOT/requirements.lock" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing pinned dependencies from requirements.lock"
    "$VENV/bin/python" -m pip install -q --upgrade pip || true
    # the lock covers the dev and hf extras too, so tests/test_hf.py runs instead of skipping
    # torch is pinned exactly in the lock; on a machine with a local wheel of that version it installs from disk
    "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements.lock"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO_ROOT"
    echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
