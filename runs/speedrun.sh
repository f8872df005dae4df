#!/usr/bin/env bash
# Speedrun: train a GPT-2 grade chat model end to end on one 8xH100 node, then talk to it.
#
#   bash runs/speedrun.sh
#   # or, to keep it running after you disconnect and keep a log:
#   screen -L -Logfile runs/speedrun.log -S speedrun bash runs/speedrun.sh
#
# Expected time and cost (8xH100 80GB SXM, published figures for this recipe; not yet measured here):
#   environment + first shards + tokenizer   ~5 min   (the rest of the data downloads meanwhile)
#   base training (d24, data:param 8, fp8)   ~1.65 h  (time-to-GPT-2 record: CORE ~0.26)
#   base eval (CORE, bpb, samples)           ~5 min
#   SFT + chat eval                          ~15-20 min
#   total                                    ~2.1-2.3 h; at ~$24/h for the node that is ~$50-55.
# Environment:
#   NPROC_PER_NODE     GPUs to use (default 8; fewer GPUs give the same result through gradient accumulation,
#                      proportionally slower)
#   WANDB_RUN          wandb run name for base training and SFT (default "dummy" = wandb off)
#   NANOCHAT_BASE_DIR  artifact root (default ~/.cache/nanochat): data, tokenizer, checkpoints, report/
#   SKIP_SETUP=1       use the already-set-up .venv as it is
# The set-up installs the `kernels` package on a machine whose nvidia-smi lists a GPU, for Flash Attention 3 on Hopper
# (without it, or offline, attention falls back to FlexAttention and says so). The device batch is found before training
# (--device-batch-size=auto: the largest micro-batch that fits, gradient accumulation keeps the total batch), so GPUs
# with less memory need no edit; on GPUs without fp8 (before Ada / Hopper) drop --fp8.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # repo root, env defaults, NPROC_PER_NODE, log/launch helpers
WANDB_RUN="${WANDB_RUN:-dummy}"

# The best recipe we have (the 1.65 h record): depth 24, 8 tokens per scaling parameter, fp8 matmuls, as many
# sequences per GPU per micro-step as fit (the record used 16 on 80 GB; 32 does not fit); batch size, LRs and weight
# decay are derived automatically from the depth and the horizon.
BASE_TRAIN_ARGS=(--depth=24 --target-param-data-ratio=8 --device-batch-size=auto --fp8)
# Training shards: ~170 cover the d24 horizon (~5.8B tokens) with margin; 8 are enough for the tokenizer.
NUM_SHARDS=170

# ---------------------------------------------------------------------------------------------------------------------
# Environment: .venv from the pinned requirements (created on first use, refreshed when they change)
if [ "${SKIP_SETUP:-0}" = "0" ]; then
    source dev/setup_env.sh
else
    source .venv/bin/activate
fi

# Start a fresh report (header with hardware/software/git info); each stage below adds its section.
python -m nanochat.report reset

# ---------------------------------------------------------------------------------------------------------------------
# Data and tokenizer: the first shards now, the rest in the background while the tokenizer trains.
log "Downloading the first 8 shards for the tokenizer"
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n "$NUM_SHARDS" &
DATASET_DOWNLOAD_PID=$!
log "Training the tokenizer (vocab 32768) while shards download in the background (pid $DATASET_DOWNLOAD_PID)"
python -m scripts.tok_train
python -m scripts.tok_eval
echo "Waiting for dataset download to complete..."
if ! wait "$DATASET_DOWNLOAD_PID"; then
    log "ERROR: the shard download failed; re-run 'python -m nanochat.dataset -n $NUM_SHARDS' (finished shards are kept)"
    exit 1
fi

# ---------------------------------------------------------------------------------------------------------------------
# Base model: pretrain, then evaluate (CORE, train/val bpb, samples)
log "Base training: ${BASE_TRAIN_ARGS[*]} on $NPROC_PER_NODE GPUs"
launch scripts.base_train "${BASE_TRAIN_ARGS[@]}" --run="$WANDB_RUN"
# base_eval's default --split-tokens is base_train's default --eval-tokens: the same 10,240 val rows of 2,048 tokens,
# so both report the same val bpb. Target: se <= 0.005 bpb; se = (spread of the rows' bpb) / 101, so it holds for a
# spread up to 0.5 bpb (rows of 256 tokens of the CPU demo's Python docs spread 0.55; longer rows spread less).
launch scripts.base_eval --device-batch-size=16

# ---------------------------------------------------------------------------------------------------------------------
# Chat model: identity conversations (who the model is), SFT, chat evaluation.
# The identity file is fetched from the address tasks/customjson.py records; if that fails SFT uses our bundled set.
python - <<'PY' || log "WARNING: could not download identity conversations; SFT will use the bundled set"
from nanochat.common import download_file_with_lock
from tasks.customjson import IDENTITY_URL
download_file_with_lock(IDENTITY_URL, "identity_conversations.jsonl")
PY
# batch geometry, LRs and optimizer momentum are inherited from the base checkpoint
launch scripts.chat_sft --run="$WANDB_RUN"
launch scripts.chat_eval -i sft

# Talk to it:
#   python -m scripts.chat_cli -p "Why is the sky blue?"
#   python -m scripts.chat_web        # then open the printed URL

# ---------------------------------------------------------------------------------------------------------------------
# Report card: report.md in the base dir and a copy here
python -m nanochat.report generate
log "Speedrun complete: see report.md"
