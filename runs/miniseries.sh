#!/usr/bin/env bash
# Miniseries: train a sweep of base models over depth (the one dial that sets model size, batch, LR and horizon)
# and collect one CSV row per depth, read from base_train's summary.json, plus a table and a plot.
#
#   bash runs/miniseries.sh [SERIES_NAME]          # default name: today's date, e.g. jan11
#
# Environment:
#   SERIES_NAME      name of the series if no argument is given (default: lower-case %b%d of today)
#   SKIP_SETUP=1     skip venv setup, shard download and tokenizer training (they must already be done)
#   NPROC_PER_NODE   GPUs per node (default 8); 1 runs plain `python -m` (no torchrun), e.g. on CPU
#   WANDB_RUN        wandb run name prefix (default <series>_miniseries; "dummy" disables wandb)
#   DEPTHS           depths to train, space or comma separated (default "12 14 16 18 20 22 24 26")
#   EXTRA_ARGS       extra scripts.base_train flags, appended last so they win (e.g. --device-batch-size=8)
#   DATA_SHARDS      shards to download during setup (default 1000)
#   NANOCHAT_BASE_DIR  artifact root (default ~/.cache/nanochat)
#
# Outputs, in $NANOCHAT_BASE_DIR/<series>_miniseries_results/:
#   results.csv                 depth,model_dim,num_params,num_scaling_params,num_iterations,tokens_trained,
#                               param_data_ratio,val_bpb,core_score,train_time_sec (+ total_training_flops,
#                               wall_time_sec); core_score is empty when CORE was not computed
#   <series>_miniseries_d<N>_train.log   full log of each training run
#   miniseries.png              val bpb and CORE vs training FLOPs and vs parameters
# Re-running skips depths already in results.csv, so an interrupted or failed sweep just continues.
# A tiny CPU series (a minute or two):
#   SKIP_SETUP=1 NPROC_PER_NODE=1 WANDB_RUN=dummy DEPTHS="2 4" EXTRA_ARGS="--max-seq-len=128 \
#     --device-batch-size=2 --total-batch-size=256 --num-iterations=20 --eval-tokens=2048 --core-metric-every=-1" \
#     bash runs/miniseries.sh tiny
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # repo root, env defaults, NPROC_PER_NODE, log/launch helpers

SERIES_NAME="${1:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}"
read -r -a DEPTH_LIST <<< "${DEPTHS//,/ }"
WANDB_RUN="${WANDB_RUN:-${SERIES_NAME}_miniseries}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES_NAME}_miniseries_results"
RESULTS_FILE="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

# ---------------------------------------------------------------------------------------------------------------------
# Setup: environment, data, tokenizer (skip with SKIP_SETUP=1 when they already exist)
if [ "${SKIP_SETUP:-0}" = "0" ]; then
    source dev/setup_env.sh
    python -m nanochat.dataset -n "${DATA_SHARDS:-1000}"
    python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
elif [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
fi

log "Miniseries '$SERIES_NAME': depths ${DEPTH_LIST[*]}, $NPROC_PER_NODE process(es) per node; results: $RESULTS_FILE"

for d in "${DEPTH_LIST[@]}"; do
    if python -m scripts.sweep_results done --kind miniseries --csv "$RESULTS_FILE" --depth "$d"; then
        log "Skipping d=$d (already in results)"
        continue
    fi
    TAG="${SERIES_NAME}_miniseries_d${d}"
    RUN_NAME="${WANDB_RUN}_d${d}"
    [ "$WANDB_RUN" = "dummy" ] && RUN_NAME="dummy"
    LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
    log "Training d=$d (model tag $TAG), log: $LOG_FILE"
    START=$(date +%s)
    # CORE once at the end on all examples; no samples; checkpoint only at the end
    if ! launch scripts.base_train --depth="$d" --run="$RUN_NAME" --model-tag="$TAG" \
        --device-batch-size="$(device_batch_size "$d")" --core-metric-every=999999 --core-metric-max-per-task=-1 \
        --sample-every=-1 --save-every=-1 ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$LOG_FILE"; then
        log "ERROR: training d=$d failed; see $LOG_FILE (on OOM, pass e.g. EXTRA_ARGS=--device-batch-size=8)."
        log "Re-run the same command to continue: depths already in $RESULTS_FILE are skipped."
        exit 1
    fi
    END=$(date +%s)
    python -m scripts.sweep_results append --kind miniseries --csv "$RESULTS_FILE" \
        --summary "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG/summary.json" \
        --wall-time "$((END - START))" --since "$START"
done

log "Miniseries '$SERIES_NAME' complete. Results saved to: $RESULTS_FILE"
python -m scripts.sweep_results report --kind miniseries --csv "$RESULTS_FILE" --plot "$RESULTS_DIR/miniseries.png"
