#!/usr/bin/env bash
# Regenerate requirements.lock: exact versions of every runtime + dev + hf dependency, no index URLs.
# Run after changing dependencies in pyproject.toml. Uses a throwaway venv so the lock is complete.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP="$(mktemp -d)"
python3 -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install -q torch==2.13.0  # pinned first so the resolver keeps it
"$TMP/venv/bin/pip" install -q "$REPO_ROOT[dev,hf]"
{
    echo "# Exact versions for the test and CPU environments; regenerate with: bash dev/lock.sh"
    "$TMP/venv/bin/pip" freeze --all --exclude nanochat --exclude pip | sed -e 's/+cpu$//' -e '/ @ /d'
} > "$REPO_ROOT/requirements.lock"
rm -rf "$TMP"
echo "wrote requirements.lock"
