#!/usr/bin/env bash
# A/B test of two pretraining recipes: train recipe A and recipe B for SEEDS seeds each (alternating), then print
# each arm's val bpb (and CORE) as mean ± 95% interval, B - A with its interval and p-value (Welch's t-test), a
# verdict line, and a plot of both arms' val bpb curves. See scripts/ab_test.py for the method.
#
#   A="--matrix-lr=0.02" B="--matrix-lr=0.03" COMMON="--depth=12" SEEDS=4 bash runs/ab.sh [NAME]
#
# Environment:
#   A, B             base_train flags of each arm (either may be empty: base_train's defaults)
#   COMMON           base_train flags of both arms (e.g. the depth and evaluation settings)
#   SEEDS            runs per arm, seeds 42, 43, ... (default 3; at least 2 for an interval)
#   NPROC_PER_NODE   GPUs per node (default 8); 1 runs plain `python -m` (no torchrun), e.g. on CPU
#   SKIP_SETUP=1     do not set up/refresh .venv (data and tokenizer must exist either way: see miniseries.sh)
#   NANOCHAT_BASE_DIR  artifact root (default ~/.cache/nanochat)
#
# Outputs: checkpoints base_checkpoints/ab_<name>_{a,b}_s<seed>/ (each with its summary.json), and in
# $NANOCHAT_BASE_DIR/ab_results/<name>/ the log of every run and ab.png. Runs made elsewhere compare with
# `python -m scripts.ab_test --a-runs DIR ... --b-runs DIR ...`.
# A tiny CPU example: do the x8 learning rates of runs/runcpu.sh beat the defaults on a short run at a tiny batch?
# (a 2-layer model, 20 steps, 3 seeds each: about 10 s per run on 2 cores)
#   SKIP_SETUP=1 NPROC_PER_NODE=1 SEEDS=3 COMMON="--depth=2 --max-seq-len=128 --device-batch-size=2 \
#     --total-batch-size=256 --num-iterations=20 --eval-every=5 --eval-tokens=2048 --core-metric-every=-1 \
#     --sample-every=-1" A="" B="--matrix-lr=0.16 --embedding-lr=2.4 --unembedding-lr=0.064 --scalar-lr=2.0" \
#     bash runs/ab.sh tiny
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # repo root, env defaults, NPROC_PER_NODE, log/launch helpers

NAME="${1:-ab}"
if [ -z "${A+set}" ] || [ -z "${B+set}" ]; then
    echo "runs/ab.sh: set A and B to the base_train flags of the two recipes (see the top of this file)" >&2
    exit 1
fi
LAUNCHER=""  # this python
[ "$NPROC_PER_NODE" = "1" ] || LAUNCHER="torchrun --standalone --nproc_per_node=$NPROC_PER_NODE"

if [ "${SKIP_SETUP:-0}" = "0" ]; then
    source dev/setup_env.sh
elif [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
fi

log "A/B test '$NAME': A=[$A] B=[$B] COMMON=[${COMMON:-}], ${SEEDS:-3} seeds per arm, $NPROC_PER_NODE process(es) per run"
python -m scripts.ab_test --name="$NAME" --a="$A" --b="$B" --common="${COMMON:-}" --seeds="${SEEDS:-3}" \
    --launcher="$LAUNCHER"
