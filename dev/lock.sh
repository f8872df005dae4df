#!/usr/bin/env bash
# Regenerate requirements.lock (exact versions of every runtime + dev + hf dependency) and requirements-gpu.lock (what
# the gpu extra adds on top), no index URLs. Run after changing dependencies in pyproject.toml. Uses a throwaway venv
# so the locks are complete.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP="$(mktemp -d)"
python3 -m venv "$TMP/venv"
freeze() { "$TMP/venv/bin/pip" freeze --all --exclude nanochat --exclude pip | sed -e 's/+cpu$//' -e '/ @ /d'; }
"$TMP/venv/bin/pip" install -q torch==2.13.0  # pinned first so the resolver keeps it
"$TMP/venv/bin/pip" install -q "$REPO_ROOT[dev,hf]"
{
    echo "# Exact versions for the test and CPU environments; regenerate with: bash dev/lock.sh"
    freeze
} > "$REPO_ROOT/requirements.lock"
"$TMP/venv/bin/pip" install -q "$REPO_ROOT[gpu]"
{
    echo "# The gpu extra, on top of requirements.lock (installed by dev/setup_env.sh when nvidia-smi lists a GPU); regenerate"
    echo "# with: bash dev/lock.sh"
    freeze | grep -vxF -f "$REPO_ROOT/requirements.lock"
} > "$REPO_ROOT/requirements-gpu.lock"
rm -rf "$TMP"
echo "wrote requirements.lock and requirements-gpu.lock"
