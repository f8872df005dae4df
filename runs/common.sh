# Shared start of the runs/*.sh scripts; they source it right after `set -euo pipefail`:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# It moves to the repo root, pins one OpenMP thread per process (torchrun ranks share the node's cores), creates the
# artifact root, reads NPROC_PER_NODE, and defines the helpers the scripts print and launch with.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

# One process: plain python (fast start, no process group); more: torchrun on this node.
launch() {
    if [ "$NPROC_PER_NODE" = "1" ]; then
        python -m "$@"
    else
        torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m "$@"
    fi
}

# Sequences per GPU per micro-step by depth for the sweeps, so bigger models fit in 80 GB (gradient accumulation
# keeps the total batch). EXTRA_ARGS come later on the command line, so --device-batch-size there overrides this.
device_batch_size() {
    if [ "$1" -lt 20 ]; then echo 32; elif [ "$1" -lt 28 ]; then echo 16; else echo 8; fi
}
