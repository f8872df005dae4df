#!/usr/bin/env bash
# Scaling laws: for each fixed compute budget, train several depths with exactly that many FLOPs
# (--target-flops; the horizon follows from the budget, not from a data:param ratio) and find the size that
# minimizes validation bpb. One CSV row per (budget, depth), read from base_train's summary.json.
#
#   bash runs/scaling_laws.sh
#
# Environment:
#   LABEL            results folder label (default jan26)
#   FLOPS_BUDGETS    budgets, space or comma separated (default "1e18 2.15e18 4.64e18 1e19")
#   DEPTHS           depths per budget (default "8 10 12 14 16 18 20")
#   EVAL_TOKENS      tokens for each val bpb evaluation (default 100*524288, ~52M: a precise final number)
#   NPROC_PER_NODE   GPUs per node (default 8); 1 runs plain `python -m` (no torchrun), e.g. on CPU
#   WANDB_RUN        wandb run name prefix (default scaling_<label>; "dummy" disables wandb)
#   EXTRA_ARGS       extra scripts.base_train flags, appended last so they win
#   SKIP_SETUP=1     do not set up/refresh .venv (data and tokenizer must exist either way: see miniseries.sh)
#   NANOCHAT_BASE_DIR  artifact root (default ~/.cache/nanochat)
#
# Outputs, in $NANOCHAT_BASE_DIR/scaling_laws_results_<label>/:
#   results.csv      flops_budget,depth,model_dim,params_wte,params_value_embeds,params_lm_head,params_transformer,
#                    params_scalars,params_total,num_iterations,tokens_trained,val_bpb,core_score,train_time_sec
#                    (+ num_scaling_params,param_data_ratio,total_training_flops,wall_time_sec)
#   scaling_<budget>_d<N>_train.log    full log of each run
#   scaling_laws.png val bpb vs params per budget with a quadratic fit in log-params (star = optimum), and the
#                    fitted optimal size vs budget
# Finished (budget, depth) pairs are skipped on re-runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # repo root, env defaults, NPROC_PER_NODE, log/launch helpers

LABEL="${LABEL:-jan26}"
FLOPS_BUDGETS="${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19}"
read -r -a BUDGET_LIST <<< "${FLOPS_BUDGETS//,/ }"
DEPTHS="${DEPTHS:-8 10 12 14 16 18 20}"
read -r -a DEPTH_LIST <<< "${DEPTHS//,/ }"
EVAL_TOKENS="${EVAL_TOKENS:-$((100 * 524288))}"
WANDB_RUN="${WANDB_RUN:-scaling_${LABEL}}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
RESULTS_FILE="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

if [ "${SKIP_SETUP:-0}" = "0" ]; then
    source dev/setup_env.sh
elif [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
fi

log "Scaling laws '$LABEL': budgets ${BUDGET_LIST[*]} x depths ${DEPTH_LIST[*]}; results: $RESULTS_FILE"

for flops in "${BUDGET_LIST[@]}"; do
    for d in "${DEPTH_LIST[@]}"; do
        if python -m scripts.sweep_results done --kind scaling --csv "$RESULTS_FILE" --depth "$d" --flops-budget "$flops"; then
            log "Skipping d=$d at $flops FLOPs (already in results)"
            continue
        fi
        TAG="scaling_${flops}_d${d}"
        RUN_NAME="${WANDB_RUN}_${TAG}"
        [ "$WANDB_RUN" = "dummy" ] && RUN_NAME="dummy"
        LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
        log "Training d=$d at $flops FLOPs (model tag $TAG), log: $LOG_FILE"
        START=$(date +%s)
        # horizon from the FLOPs budget only (ratio disabled); CORE once at the end on all examples
        if ! launch scripts.base_train --depth="$d" --target-flops="$flops" --target-param-data-ratio=-1 \
            --run="$RUN_NAME" --model-tag="$TAG" --device-batch-size="$(device_batch_size "$d")" \
            --eval-tokens="$EVAL_TOKENS" --core-metric-every=999999 --core-metric-max-per-task=-1 \
            --sample-every=-1 --save-every=-1 ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$LOG_FILE"; then
            log "ERROR: training d=$d at $flops FLOPs failed; see $LOG_FILE. Re-run to continue (finished runs are skipped)."
            exit 1
        fi
        END=$(date +%s)
        python -m scripts.sweep_results append --kind scaling --csv "$RESULTS_FILE" --flops-budget "$flops" \
            --summary "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG/summary.json" \
            --wall-time "$((END - START))" --since "$START"
    done
done

log "Scaling laws '$LABEL' complete. Results saved to: $RESULTS_FILE"
python -m scripts.sweep_results report --kind scaling --csv "$RESULTS_FILE" --plot "$RESULTS_DIR/scaling_laws.png"
