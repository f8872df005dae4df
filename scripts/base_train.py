"""
Pretrain a base GPT model. One process or many (torchrun), on a laptop CPU or 8xH100, with the same code.

Examples:
    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20        # tiny CPU run
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=26                  # one 8-GPU node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 -m scripts.base_train ...
    python -m scripts.base_train --depth=12 --resume-from-step=1000               # resume a run (same flags)

The recipe: auto batch size, batch-scaled learning rates, T_epoch weight decay, warmup + warmdown LR schedule,
Muon momentum and weight-decay schedules. The script reads top-down like the other two training scripts: flags, the
checks that need only the flags, the schedules, the plan (shapes, batch, horizon; all on the meta device), the resume
helpers, the helpers of the loop body, then main: setup, build, the loop, the wrap-up (summary.json and the report).
SIGTERM/SIGINT save a checkpoint at the next step boundary and exit 0. A non-finite loss, or weights / optimizer state
that became non-finite, stop the run (exit 1) and nothing non-finite is ever saved.
"""

import os
# The allocator policy on CUDA: growable segments instead of fixed blocks, so that memory does not fragment as tensor
# sizes change (training steps, evaluations, sampling). Set before any import: the CUDA caching allocator reads it
# once, when CUDA starts, which can be as early as nanochat.common's import (it asks the GPU for its capability).
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import json
import math
import time
import argparse
import contextlib
import dataclasses

import torch
import torch.distributed as dist

from nanochat import fp8
from nanochat import checkpoint_manager as ckpt
from nanochat import resume
from nanochat.auto_batch import auto_device_batch_size, positive_int_or_auto
from nanochat.cli import run
from nanochat.common import (NanochatError, compute_init, compute_cleanup, print0, print_banner, autodetect_device_type,
                             get_peak_flops, int_in, float_in, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, atomic_write,
                             synchronize, peak_memory_mib, should_compile)
from nanochat.core_eval import evaluate_core, format_core
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
from nanochat.engine import Engine, SAMPLE_PROMPTS
from nanochat.eval_bundle import BundleUnavailable
from nanochat.flash_attention import get_backend
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import EVAL_TOKENS, evaluate_bpb, eval_batches, format_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.training import (keep_freed_memory, freeze_gc, manage_gc, release_gc, make_grad_scaler, finish_step,
                               is_due, any_rank, init_wandb)

# The learning rates and the weight decay were tuned by sweeps at one reference point, d12 trained on 2^19-token
# batches; the plan below carries them to other depths and batch sizes with the scaling rules it explains.
B_REF = 2 ** 19          # total batch size (tokens) the learning rates were tuned at
REF_DEPTH = 12           # depth the batch-size / weight-decay scaling laws are anchored at
# Tokens per scaling parameter: sweeps at 1e18-1e19 FLOPs put the compute-optimal ratio near 10.5; a later re-run of
# the recipe settled on 12.
DEFAULT_RATIO = 12.0     # tokens : scaling params when no horizon flag says otherwise


def build_parser():
    parser = argparse.ArgumentParser(description="Pretrain a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("logging")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    g = parser.add_argument_group("runtime")
    # compiling costs minutes of warm-up and pays off only over enough steps; nanochat.common.should_compile decides
    g.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    g.add_argument("--compile", type=str, default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model and the optimizer math (auto: always on CUDA, on CPU for long runs)")
    g.add_argument("--fp8", action="store_true", help="train Linear layers in FP8 (CUDA compute capability >= 8.9 only)")
    g.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"], help="FP8 scaling recipe (tensorwise is faster)")
    # what differs between repeats of one recipe (scripts/ab_test runs several seeds per recipe)
    g.add_argument("--seed", type=int_in("[0, 4294967295]"), default=42, help="seed of the weight init and of the training data order")
    # depth is the one dial: width, heads and (through the plan) batch size, learning rates and horizon follow from it
    g = parser.add_argument_group("model architecture")
    g.add_argument("--depth", type=int_in("[1, inf)"), default=20, help="number of transformer layers: the one dial that sizes everything")
    g.add_argument("--aspect-ratio", type=int_in("[1, inf)"), default=64, help="model_dim = depth * aspect_ratio (rounded up to a multiple of head dim)")
    g.add_argument("--head-dim", type=int_in("[1, inf)"), default=128, help="target attention head dimension (even: rotary embeddings rotate pairs)")
    g.add_argument("--max-seq-len", type=int_in("[2, inf)"), default=2048, help="maximum context length (tokens)")
    g.add_argument("--window-pattern", type=str, default="SSSL", help="sliding-window pattern tiled over layers: L = full context, S = a quarter of it; last layer always L")
    # the horizon as steps, as a FLOPs budget or as tokens per parameter: the last two scale with the model, which is
    # what a sweep over depths wants (every size trained the same way relative to its size)
    g = parser.add_argument_group("training horizon (first positive one wins)")
    g.add_argument("--num-iterations", type=int_in("[1, inf)", -1), default=-1, help="explicit number of optimization steps (-1 = off)")
    g.add_argument("--target-flops", type=float_in("(0, inf)", -1), default=-1.0, help="derive steps from a total FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float_in("(0, inf)", -1), default=DEFAULT_RATIO, help="training tokens : scaling params (-1 = off)")
    # the learning rates and the weight decay are the values at the reference point (d12, 2^19 tokens per step); the
    # plan rescales them for the batch size and horizon of this run
    g = parser.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=positive_int_or_auto, default=32, help="sequences per device per micro-step, or auto: the largest that fits (the total batch stays as planned)")
    g.add_argument("--total-batch-size", type=int_in("[1, inf)", -1), default=-1, help="tokens per optimizer step (-1 = auto: B_opt ~ D^0.383 around 2^19 at d12)")
    g.add_argument("--embedding-lr", type=float_in("[0, inf)"), default=0.3, help="AdamW LR for the token embeddings (value embeddings get x0.5)")
    g.add_argument("--unembedding-lr", type=float_in("[0, inf)"), default=0.008, help="AdamW LR for lm_head")
    g.add_argument("--matrix-lr", type=float_in("[0, inf)"), default=0.02, help="Muon LR for the transformer matrices")
    g.add_argument("--scalar-lr", type=float_in("[0, inf)"), default=0.5, help="AdamW LR for the x0 lambdas (resid lambdas get x0.01)")
    g.add_argument("--weight-decay", type=float_in("[0, inf)"), default=0.28, help="Muon cautious weight decay at d12 / 2^19 tokens (rescaled for other sizes)")
    g.add_argument("--adam-beta1", type=float_in("[0, 1)"), default=None, help="AdamW beta1 for lm_head/embeddings/resid lambdas (default: tuned per group, 0.8)")
    g.add_argument("--adam-beta2", type=float_in("[0, 1)"), default=None, help="AdamW beta2 for lm_head/embeddings/resid lambdas (default: tuned per group, 0.96 lm_head, 0.995 embeddings, 0.95 scalars)")
    g.add_argument("--warmup-ratio", type=float_in("[0, 1]"), default=None, help="LR warmup as a fraction of the steps; overrides --warmup-steps when given")
    g.add_argument("--warmup-steps", type=int_in("[0, inf)"), default=40, help="LR warmup steps, capped so warmup never runs into the warmdown")
    g.add_argument("--warmdown-ratio", type=float_in("[0, 1]"), default=0.65, help="fraction of steps spent in the final LR decay")
    g.add_argument("--final-lr-frac", type=float_in("[0, 1]"), default=0.05, help="LR multiplier at the last step")
    # a resumed run must be launched with the same flags: the schedules and the plan are recomputed from them, and
    # only what the loop accumulated (step, loss EMA, history, RNG and loader positions) comes from the checkpoint
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--resume-from-step", type=int_in("[0, inf)", -1), default=-1, help="resume from the checkpoint at this step (-1 = fresh run); pass the same flags as the original run")
    g.add_argument("--save-every", type=int_in("[1, inf)", -1), default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep-last", type=int_in("[1, inf)", -1), default=-1, help="after each save keep only the last K checkpoints, to bound disk use (-1 = keep all)")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name under base_checkpoints/ (default d<depth>)")
    # validation bpb is cheap and runs from step 0 (the untrained baseline); CORE and samples cost minutes on a GPU,
    # so they run rarely and always at the end
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int_in("[1, inf)", -1), default=250, help="validation bpb every N steps (-1 = off)")
    g.add_argument("--eval-tokens", type=int_in("[1, inf)"), default=EVAL_TOKENS, help="tokens per validation bpb evaluation (the first rows of the val split, as base_eval's)")
    g.add_argument("--core-metric-every", type=int_in("[1, inf)", -1), default=2000, help="CORE metric every N steps and at the end (-1 = off)")
    g.add_argument("--core-metric-max-per-task", type=int_in("[1, inf)", -1), default=500, help="examples per CORE task (-1 = all)")
    g.add_argument("--sample-every", type=int_in("[1, inf)", -1), default=2000, help="print greedy samples every N steps and at the end (-1 = off)")
    return parser

# -----------------------------------------------------------------------------
# Checks that need nothing but the flags (main runs them before any heavy work)

def check_args(args):
    # (each numeric flag's range is argparse's, through int_in/float_in; these are what a range cannot express)
    if args.head_dim % 2:
        raise NanochatError(f"--head-dim={args.head_dim} must be even (rotary embeddings rotate pairs of channels)")
    if not args.window_pattern or any(c not in "SL" for c in args.window_pattern.upper()):
        raise NanochatError(f"--window-pattern={args.window_pattern!r} must be a non-empty string of S and L characters")
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        raise NanochatError("no training horizon: set one of --num-iterations, --target-flops or "
                            "--target-param-data-ratio to a positive value")
    ckpt.check_model_tag(args.model_tag)

# -----------------------------------------------------------------------------
# Schedules (it = 0-based index of the update being made, N = number of updates)

def warmup_iters_for(args, N):
    warmdown = round(args.warmdown_ratio * N)
    warmup = round(args.warmup_ratio * N) if args.warmup_ratio is not None else args.warmup_steps
    return max(0, min(warmup, N - warmdown))  # warmup never overlaps the warmdown (matters for short runs)


def get_lr_multiplier(it, N, warmup_iters, warmdown_ratio, final_lr_frac):
    # Warmup: the first updates come from optimizer statistics gathered over a handful of steps (noisy moment
    # estimates) on a freshly initialised model; a linear ramp keeps those steps small.
    warmdown_iters = round(warmdown_ratio * N)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= N - warmdown_iters:
        return 1.0
    # Warmdown: a linear decay over the last warmdown_ratio of the run (65% by default): much of a run's loss
    # reduction comes while the LR falls, so the decay gets a large share. It ends at final_lr_frac, not 0, so the
    # last update still moves the weights.
    progress = (N - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(it, N, warmdown_ratio):
    # ramp 0.85 -> 0.97 over the first 400 steps, hold, then 0.97 -> 0.90 across the warmdown
    # (early on the gradients change fast and a short memory follows them; later a long one averages away their
    # noise; lowering it again in the warmdown lets the shrinking updates settle sooner)
    momentum = 0.85 + (0.97 - 0.85) * min(it / 400, 1.0)
    warmdown_iters = round(warmdown_ratio * N)
    start = N - warmdown_iters
    if warmdown_iters > 0 and it >= start:
        momentum = min(momentum, 0.97 - (0.97 - 0.90) * (it - start) / warmdown_iters)
    return momentum


def get_weight_decay(it, N, wd):
    # Cosine to zero: sweeps found a weight decay that fades out over the run better than a constant one (it keeps
    # the weights small while they move most; the last steps only refine them).
    return wd * 0.5 * (1 + math.cos(math.pi * it / max(N, 1)))

# -----------------------------------------------------------------------------
# Plan: model shape, batch size, LR / weight-decay scaling and horizon, all from the flags

@dataclasses.dataclass
class Plan:
    model_config: object
    param_counts: dict
    num_scaling_params: int       # transformer matrices + lm_head: what the scaling laws count (see training_plan)
    flops_per_token: float        # forward + backward, for MFU and the FLOPs horizon
    total_batch_size: int         # tokens per optimizer step, over all ranks and micro-steps
    grad_accum_steps: int         # micro-steps per optimizer step on each rank
    batch_lr_scale: float         # sqrt(total_batch_size / B_REF), applied to every learning rate
    weight_decay_scaled: float    # --weight-decay carried to this batch size and horizon (T_epoch)
    num_iterations: int
    warmup_iters: int
    total_tokens: int


def training_plan(args, vocab_size, world_tokens_per_fwdbwd, print0=print):
    """Everything is computed on the meta device (no memory). Prints what it decided.

    The hyperparameters were tuned at one point (d12, B_REF tokens per step, DEFAULT_RATIO tokens per parameter); a
    run of another size gets them carried over by three rules, derived in the comments below: the batch size grows
    with the data as D^0.383, the learning rates with the batch size as sqrt(B), and the weight decay keeps the
    averaging timescale of AdamW-style updates a fixed fraction of the run (T_epoch)."""
    def make_config(depth):
        return config_from_depth(depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                                 vocab_size=vocab_size, window_pattern=args.window_pattern.upper())

    # Which parameters count for scaling laws: the transformer matrices and lm_head, i.e. the ones that cost a
    # multiply-add per token. The embedding tables are lookups (no FLOPs) and the per-layer scalars are negligible.
    # Of the conventions tried (all parameters, the transformer matrices alone, ...) this one gave the steadiest
    # fitted exponents, so "tokens : scaling params" is a ratio that carries across model sizes.
    def scaling_params_of(counts):
        return counts["transformer_matrices"] + counts["lm_head"]

    model_config = make_config(args.depth)
    base_dim = args.depth * args.aspect_ratio
    print0(f"num_layers: {model_config.n_layer}")
    print0(f"model_dim: {model_config.n_embd} (base: {base_dim}, nudge: {model_config.n_embd - base_dim:+d})")
    print0(f"num_heads: {model_config.n_head}")
    print0(f"head_dim: {model_config.n_embd // model_config.n_head}")
    print0(f"num_kv_heads: {model_config.n_kv_head}")
    print0(f"Model config: {json.dumps(dataclasses.asdict(model_config))}")
    # the reference model is built with the same flags (vocab, width per layer, context), only at REF_DEPTH, so D_REF
    # below is "how many tokens d12 would train on at this ratio"
    with torch.device("meta"):
        meta_model = GPT(model_config)
        ref_model = GPT(make_config(REF_DEPTH))
    param_counts = meta_model.num_scaling_params()
    num_scaling_params = scaling_params_of(param_counts)
    flops_per_token = meta_model.estimate_flops()  # counted before any fp8 conversion
    ratio_for_scaling = args.target_param_data_ratio if args.target_param_data_ratio > 0 else DEFAULT_RATIO
    D_REF = ratio_for_scaling * scaling_params_of(ref_model.num_scaling_params())
    if args.target_flops > 0:
        target_tokens = args.target_flops / flops_per_token
    else:
        target_tokens = ratio_for_scaling * num_scaling_params

    # Batch size. Bergsma et al. 2025 ("Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
    # Pre-training") find that the loss-optimal batch size depends on the amount of training data, not on the model
    # size: B_opt ~ D^0.383. Anchored at B_REF for the d12 run (D_REF tokens), a run on D tokens gets
    # B = B_REF * (D / D_REF)^0.383, rounded to a power of two (the loss is flat near the optimum, and powers of two
    # divide evenly into micro-batches). Doubling D raises B by 2^0.383 ~ 1.3, so bigger models take bigger steps.
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / D_REF) ** 0.383))
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
        if total_batch_size % world_tokens_per_fwdbwd != 0:
            # the power of two may not be a multiple of one forward/backward of all ranks: take the nearest one that is
            adjusted = max(1, round(total_batch_size / world_tokens_per_fwdbwd)) * world_tokens_per_fwdbwd
            print0(f"Adjusted batch size to {adjusted:,} tokens: a multiple of device batch x seq len x world size ({world_tokens_per_fwdbwd:,})")
            total_batch_size = adjusted
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {args.device_batch_size * args.max_seq_len:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    # Learning rates: the square-root rule of Adam-style optimizers. A batch k times larger averages away k times
    # the gradient noise variance, i.e. sqrt(k) of its scale; the update may grow by the same factor for the same
    # stability, so every LR is multiplied by sqrt(B / B_REF).
    batch_lr_scale = math.sqrt(total_batch_size / B_REF)
    if batch_lr_scale != 1.0:
        print0(f"Scaling LRs by sqrt({total_batch_size:,}/{B_REF:,}) = {batch_lr_scale:.6f}")
    # Weight decay. Wang & Aitchison 2024 ("How to set AdamW's weight decay as you scale model and dataset size")
    # read AdamW-style decoupled decay as an exponential moving average of the updates, over tau = 1 / (lr * wd)
    # steps. What should stay fixed across scales is that timescale as a fraction of the whole run,
    # T_epoch = tau / steps = tau * B / D. Holding T_epoch at its tuned value while lr ~ sqrt(B) (above) gives
    #   1 / (lr * wd) ~ D / B   =>   wd ~ B / (D * lr) ~ sqrt(B) / D,
    # i.e. wd = wd_ref * sqrt(B / B_REF) * (D_REF / D): more data (at the same batch) means less decay per step.
    weight_decay_scaled = args.weight_decay * math.sqrt(total_batch_size / B_REF) * (D_REF / target_tokens)
    if weight_decay_scaled != args.weight_decay:
        print0(f"Scaling weight decay from {args.weight_decay:.6f} to {weight_decay_scaled:.6f} (T_epoch: sqrt(B/B_ref) x D_ref/D)")

    # Horizon: the first positive of --num-iterations, --target-flops, --target-param-data-ratio (check_args made
    # sure one is); the last two are budgets, turned into steps with the batch size chosen above
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
        print0(f"Using user-provided number of iterations: {num_iterations:,}")
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
        print0(f"Calculated number of iterations from target FLOPs: {num_iterations:,}")
    else:
        num_iterations = int(args.target_param_data_ratio * num_scaling_params) // total_batch_size
        print0(f"Calculated number of iterations from target data:param ratio: {num_iterations:,}")
    if num_iterations < 1:
        raise NanochatError(f"the horizon works out to {num_iterations} steps; raise --num-iterations/--target-flops/"
                            f"--target-param-data-ratio or lower --total-batch-size")
    total_tokens = total_batch_size * num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_tokens / num_scaling_params:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * total_tokens:e}")
    return Plan(model_config, param_counts, num_scaling_params, flops_per_token, total_batch_size, grad_accum_steps,
                batch_lr_scale, weight_decay_scaled, num_iterations, warmup_iters_for(args, num_iterations), total_tokens)

# -----------------------------------------------------------------------------
# Loop state and resuming: everything the loop carries from step to step. The LOOP_FIELDS go into the checkpoint
# meta, with the RNG and dataloader states, so that a resumed run continues bit-exactly.

@dataclasses.dataclass
class LoopState:
    step: int = 0
    val_bpb: float = None
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0
    total_training_time: float = 0.0
    history: dict = dataclasses.field(default_factory=lambda: {"train": [], "val": []})
    core_results: dict = None
    mfu: float = None             # of the last step (not saved)
    last_good_step: int = None    # the newest checkpoint known to be finite (not saved)

    def record(self, split, entry):
        rows = [r for r in self.history[split] if r["step"] != entry["step"]]  # a resumed step replaces its old entry
        self.history[split] = rows + [entry]


# the LoopState fields saved under meta["loop_state"] (step and val_bpb are top-level meta keys)
LOOP_FIELDS = ("min_val_bpb", "smooth_train_loss", "total_training_time", "history", "core_results")


def restore_loop_state(meta, rank, device_type):
    """(LoopState, every old rank's dataloader state) from a checkpoint's meta; also restores this rank's RNG states."""
    loop = meta["loop_state"]
    state = LoopState(step=meta["step"], val_bpb=meta["val_bpb"], last_good_step=meta["step"],
                      **{k: loop[k] for k in LOOP_FIELDS})
    resume.restore_rng_states(meta, rank, device_type)
    return state, meta["dataloader_state_dicts"]


def with_resume_states(loader):
    """Yields (x, y, the loader state that resumes at this very batch). The loader's own state resumes *after* its
    batch, so a checkpoint, which is taken before the prefetched batch is consumed, stores the previous one's. The
    first batch has none (None): no run saves before its first step (a resumed one has that checkpoint already)."""
    resume_state = None
    for x, y, state_after in loader:
        yield x, y, resume_state
        resume_state = state_after

# -----------------------------------------------------------------------------
# Hardware and model

def print_hardware(device_type, window_pattern):
    """Peak FLOPs (None = MFU n/a) and the attention backend's warnings."""
    # MFU needs the device's peak FLOPs, known only for GPUs in nanochat.common's table
    backend, _ = get_backend(device_type)
    peak_flops = get_peak_flops(torch.cuda.get_device_name(0) if device_type == "cuda" else device_type)
    if device_type != "cuda":
        return peak_flops
    if backend == "fa3":
        print0("✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome.")
    else:
        print0("!" * 80)
        print0(f"WARNING: Flash Attention 3 not available, using a fallback attention backend ({backend}). "
               "Training will be less efficient.")
        if backend == "sdpa" and window_pattern.upper() != "L":
            print0(f"WARNING: SDPA has no support for sliding window attention (pattern {window_pattern}); "
                   "GPU utilization will be terrible. Use --window-pattern L.")
        print0("!" * 80)
    return peak_flops


def fitting_device_batch_size(args, device, device_type, world_size):
    """--device-batch-size=auto: the largest micro-batch that fits, of those that split the total batch evenly."""
    # the total batch is planned as if with one sequence per micro-step, so the card decides the micro-batch only,
    # and gradient accumulation keeps the planned total batch (the result does not depend on the card)
    row_tokens = args.max_seq_len * world_size
    plan = training_plan(argparse.Namespace(**{**vars(args), "device_batch_size": 1}), get_tokenizer().get_vocab_size(),
                         row_tokens, print0=lambda *a, **k: None)
    return auto_device_batch_size(plan.model_config, device, args.max_seq_len, plan.total_batch_size // row_tokens,
                                  should_compile(device_type, args.compile, plan.num_iterations),
                                  args.fp8_recipe if args.fp8 else None)


def build_model_and_optimizer(args, plan, device, checkpoint_dir, use_compile):
    """(orig_model, optimizer): the model on device (restored when resuming) and its optimizer."""
    # built on the meta device and then allocated once on the target device: no throwaway CPU copy of the weights
    with torch.device("meta"):
        model = GPT(plan.model_config)
    model.to_empty(device=device)
    model.init_weights()
    optim_data = None
    if args.resume_from_step >= 0:
        try:
            model_data, optim_data, _ = ckpt.load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                            load_optimizer=True)
            model.load_state_dict(model_data, strict=True, assign=True)
        except (ckpt.CheckpointError, RuntimeError) as e:
            raise NanochatError(f"--resume-from-step={args.resume_from_step}: {e}") from None
        del model_data
        print0(f"Resumed model weights from {checkpoint_dir} at step {args.resume_from_step}")
    # fp8 swaps the Linear layers after the weights are loaded (the checkpoint holds plain weights either way)
    if args.fp8:  # main checked the device; argparse the recipe
        fp8.convert_to_float8_training(model, recipe=args.fp8_recipe, device=device)
    # without --adam-beta1/2 every AdamW group keeps the betas tuned for it in GPT.setup_optimizer
    adam_betas = None
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        adam_betas = (args.adam_beta1 if args.adam_beta1 is not None else 0.8,
                      args.adam_beta2 if args.adam_beta2 is not None else 0.95)
    scale = plan.batch_lr_scale
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale,
                                      matrix_lr=args.matrix_lr * scale, weight_decay=plan.weight_decay_scaled,
                                      adam_betas=adam_betas, scalar_lr=args.scalar_lr * scale, compile=use_compile)
    # a resumed optimizer also gets back each group's initial_lr, so the schedules continue where they were
    if optim_data is not None:
        optimizer.load_resharded(optim_data)  # saved by any number of processes
    return model, optimizer

# -----------------------------------------------------------------------------
# The loop body's helpers: each takes what it needs as arguments

def train_step(model, batches, batch, grad_accum_steps, scaler):
    """Forward and backward of one optimizer step: grad_accum_steps micro-batches from the prefetched `batch` on, the
    gradients accumulating (the update is the caller's finish_step). Returns (the per-micro-batch losses, the next
    prefetched batch)."""
    micro_losses = []
    for _ in range(grad_accum_steps):
        x, y, _ = batch
        loss = model(x, y)  # the mean loss over the micro-batch's tokens
        micro_losses.append(loss.detach())
        loss = loss / grad_accum_steps  # gradients add up over micro-batches: the step's gradient is their mean
        (scaler.scale(loss) if scaler is not None else loss).backward()
        batch = next(batches)  # prefetch while the device works
    return torch.stack(micro_losses), batch


@contextlib.contextmanager
def evaluating(orig_model, use_fp8):
    """The block runs in eval mode and, with --fp8, in bf16; training mode after it."""
    orig_model.eval()  # the compiled model wraps this module: one switch for both
    try:
        with fp8.disable_fp8(orig_model) if use_fp8 else contextlib.nullcontext():
            yield
    finally:
        orig_model.train()


def evaluate_core_metric(orig_model, tokenizer, device, args, step):
    """The CORE results dict, or None when CORE could not run. Training goes on either way: a missing eval bundle
    (e.g. offline) is expected and only noted; anything else is reported with its error type."""
    try:
        with evaluating(orig_model, args.fp8):
            results = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
    except BundleUnavailable as e:  # no eval bundle here and none to be had: the expected cause
        print0(f"Step {step:05d} | CORE metric skipped: {e}")
        return None
    except Exception as e:  # a bug in an evaluation must not cost the run (the final checkpoint is saved after it)
        print0(f"Step {step:05d} | CORE metric failed ({type(e).__name__}: {e}); training goes on")
        return None
    print0(f"Step {step:05d} | CORE metric: {format_core(results)}")
    return results


def print_samples(orig_model, tokenizer, use_fp8):
    """Greedy continuations of SAMPLE_PROMPTS (rank 0): a quick look at what the model has learned."""
    engine = Engine(orig_model, tokenizer)
    with evaluating(orig_model, use_fp8):
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
            print0(tokenizer.decode(sample[0]))


def save(checkpoint_dir, state, orig_model, optimizer, plan, args, user_config, resume_state, rank, world_size, device):
    """Checkpoint after state.step updates (resume.save_resumable: never a non-finite one); resume_state is where this
    rank's loader resumes."""
    meta = {"val_bpb": state.val_bpb, "model_config": dataclasses.asdict(plan.model_config), "user_config": user_config,
            "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
            "total_batch_size": plan.total_batch_size, "seed": args.seed}
    resume.save_resumable(checkpoint_dir, "base", state.step, orig_model, optimizer, meta,
                          {k: getattr(state, k) for k in LOOP_FIELDS}, resume_state, state.last_good_step,
                          args.keep_last, rank, world_size, device)
    state.last_good_step = state.step  # what a divergence error points to

def wrap_up(args, plan, state, checkpoint_dir, tokenizer, user_config, rank, world_size, device_type):
    """Final prints, <checkpoint_dir>/summary.json (read by the sweep scripts) and the report section."""
    peak_mib = peak_memory_mib(device_type)
    print0(f"Peak memory usage: {peak_mib:.2f}MiB" + ("" if device_type == "cuda" else " (process max RSS)"))
    print0(f"Total training time: {state.total_training_time / 60:.2f}m")
    min_val_bpb = None if state.min_val_bpb == float("inf") else state.min_val_bpb
    if min_val_bpb is not None:
        print0(f"Minimum validation bpb: {min_val_bpb:.6f}")
    if rank != 0:  # one summary and one report section per run, from rank 0
        return
    total_flops = plan.flops_per_token * plan.total_tokens
    core, mfu = state.core_results, state.mfu
    core_score, core_se = (core["core_metric"], core.get("core_metric_se")) if core else (None, None)
    # the final evaluation's standard error and size (an evaluation always runs at the last step when any runs)
    final_val = state.history["val"][-1] if state.history["val"] else {}
    val_se, val_tokens = final_val.get("val_bpb_se"), final_val.get("val_tokens")
    ratio = plan.total_tokens / plan.num_scaling_params
    summary = {
        "model_tag": os.path.basename(checkpoint_dir), "depth": args.depth, "model_dim": plan.model_config.n_embd,
        "num_heads": plan.model_config.n_head, "max_seq_len": args.max_seq_len,
        "vocab_size": tokenizer.get_vocab_size(), "num_params": plan.param_counts["total"],
        "num_scaling_params": plan.num_scaling_params, "param_counts": plan.param_counts,
        "flops_per_token": plan.flops_per_token, "num_iterations": plan.num_iterations,
        "total_batch_size": plan.total_batch_size, "tokens_trained": plan.total_tokens, "param_data_ratio": ratio,
        "total_training_flops": total_flops, "val_bpb": state.val_bpb, "val_bpb_se": val_se, "val_tokens": val_tokens,
        "min_val_bpb": min_val_bpb, "core_score": core_score, "core_score_se": core_se,
        "core_partial": bool(core.get("partial")) if core else None,
        "train_time_sec": state.total_training_time, "mfu": mfu, "peak_memory_mib": peak_mib,
        "world_size": world_size, "device_type": device_type, "fp8": args.fp8, "checkpoint_dir": checkpoint_dir,
        "seed": args.seed, "val_curve": [[row["step"], row["val_bpb"]] for row in state.history["val"]],
    }
    # the sweeps (runs/miniseries.sh, runs/scaling_laws.sh) read their rows from this file, never from the log
    summary_path = os.path.join(checkpoint_dir, "summary.json")  # beside the last step's checkpoint
    atomic_write(summary_path, lambda f: json.dump(summary, f, indent=2), mode="w")
    print0(f"Wrote run summary to {summary_path}")
    setup = {"Number of parameters": plan.param_counts["total"], "Number of scaling parameters": plan.num_scaling_params,
             "Number of FLOPs per token": f"{plan.flops_per_token:e}", "Calculated number of iterations": plan.num_iterations,
             "Number of training tokens": plan.total_tokens, "Tokens : Scaling params ratio": ratio,
             "Total batch size": plan.total_batch_size, "DDP world size": world_size,
             "warmup_iters": plan.warmup_iters, "warmdown_ratio": args.warmdown_ratio, "final_lr_frac": args.final_lr_frac}
    final_bpb = format_bpb(state.val_bpb, val_se, val_tokens, digits=4) if val_tokens else state.val_bpb
    results = {"Minimum validation bpb": min_val_bpb, "Final validation bpb": final_bpb,
               "CORE metric estimate": format_core(core) if core else None,
               "MFU %": f"{mfu:.2f}%" if mfu is not None else "n/a", "Total training flops": f"{total_flops:e}",
               "Total training time": f"{state.total_training_time / 60:.2f}m", "Peak memory usage": f"{peak_mib:.2f}MiB"}
    report = get_report()
    report.log(section="Base model training", data=[user_config, setup, results])
    report.log_history("base-training", state.history)

# -----------------------------------------------------------------------------

def main(argv=None):
    # --- flags: everything that needs nothing but the flags is checked before any heavy work ----------------------
    args = build_parser().parse_args(argv)
    check_args(args)
    user_config = dict(vars(args))  # logged to wandb and saved in checkpoint meta

    # --- setup: runtime policies, device and processes, the checks that need the world size, the plan ------------
    freeze_gc()  # the GC policy (nanochat.training): what exists now lives as long as the run
    print_banner()
    device_type = args.device_type or autodetect_device_type()
    _, rank, _, world_size, device = compute_init(device_type, args.seed)
    keep_freed_memory(device_type)  # the allocator policy on CPU: freed step buffers stay in the heap for reuse
    print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    if args.fp8:
        fp8.check_fp8_support(device)  # before any heavy work
    if args.device_batch_size == "auto":  # tried on the device itself, so it waits for compute_init
        args.device_batch_size = fitting_device_batch_size(args, device, device_type, world_size)
    # one forward/backward of every rank; an optimizer step is a whole number of them (gradient accumulation)
    world_tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size != -1 and args.total_batch_size % world_tokens_per_fwdbwd:
        raise NanochatError(f"--total-batch-size={args.total_batch_size} must be -1 (auto) or a positive multiple of "
                            f"--device-batch-size x --max-seq-len x world size = {world_tokens_per_fwdbwd}")
    checkpoint_dir = ckpt.checkpoint_dir_for("base", args.model_tag or f"d{args.depth}")
    # the resume checkpoint is checked (complete, readable, this stage's) before wandb, the tokenizer and the plan
    resuming = args.resume_from_step >= 0
    resume_meta = resume.check_resume("base", checkpoint_dir, args.resume_from_step, world_size, user_config) if resuming else None
    if resuming and args.total_batch_size == -1:  # the planned batch, whatever the auto rule says for this world size
        args.total_batch_size = resume_meta["total_batch_size"]
        if args.total_batch_size % world_tokens_per_fwdbwd:
            raise NanochatError(f"--resume-from-step={args.resume_from_step}: the run's total batch of "
                                f"{args.total_batch_size} tokens is not a multiple of --device-batch-size x "
                                f"--max-seq-len x world size = {world_tokens_per_fwdbwd}; pick a --device-batch-size "
                                f"that divides it")
    wandb_run = init_wandb("nanochat", args.run, user_config, rank == 0)
    tokenizer = get_tokenizer()
    print0(f"Vocab size: {tokenizer.get_vocab_size():,}")
    # the plan needs the vocab size (embedding and lm_head sizes count in the parameters and FLOPs)
    plan = training_plan(args, tokenizer.get_vocab_size(), world_tokens_per_fwdbwd, print0)
    N = plan.num_iterations
    # past the horizon the loop would never meet its last step (step == N) and never end
    if args.resume_from_step > N:
        raise NanochatError(f"--resume-from-step={args.resume_from_step} is past the end of this run ({N} steps)")
    peak_flops = print_hardware(device_type, args.window_pattern)

    # --- build: model and optimizer (restored when resuming), the loop state and the train loader -----------------
    # compile is decided on the whole horizon, not the steps left, so that a resumed run decides alike
    use_compile = should_compile(device_type, args.compile, N)
    orig_model, optimizer = build_model_and_optimizer(args, plan, device, checkpoint_dir, use_compile)
    # the loop trains the compiled model; evaluations with varying shapes (CORE, samples) and saving use orig_model
    model = torch.compile(orig_model, dynamic=False, fullgraph=True) if use_compile else orig_model
    for key, value in plan.param_counts.items():
        print0(f"{key:24s}: {value:,}")
    print0(f"Estimated FLOPs per token: {plan.flops_per_token:e}")
    scaler = make_grad_scaler(device_type)  # only under fp16 compute (NANOCHAT_DTYPE=float16)
    token_bytes = get_token_bytes(device=device)  # bytes of text per token id, for bits per byte
    val_batches = None  # tokenized at the first evaluation, replayed at every later one
    # resuming restores the loop state and the RNGs after the model is built (building draws from the RNGs)
    state, loader_states = restore_loop_state(resume_meta, rank, device_type) if resuming else (LoopState(), None)
    # on another world size the loader reshards the old ranks' states (every document of the epoch once)
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device, resume_states=loader_states,
        seed=args.seed)
    # each batch comes with the loader state that resumes at it, which is what a checkpoint saves (see the helper)
    batches = with_resume_states(loader)

    # --- the loop: at each step boundary the signal check, evaluations and checkpoints; then one optimizer step ---
    # SIGTERM/SIGINT (a preempted job, Ctrl-C) only set a flag; the finally below puts the previous handlers back
    signals, restore_signal_handlers = resume.catch_stop_signals(rank)
    try:
        start_step = state.step  # 0, or the resumed step
        print0(f"Starting training at step {start_step} of {N} (checkpoints: {checkpoint_dir})")
        # the loop always holds the next batch (prefetched), so the data loader works while the device computes
        batch = next(batches)
        while True:
            step = state.step
            last_step = step == N
            resumed_here = resuming and step == start_step  # this step's checkpoint is the one we resumed from
            stopped = resume.stop_requested(signals, device)  # every rank stops at the same boundary
            if stopped:
                if step > 0 and not resumed_here:
                    save(checkpoint_dir, state, orig_model, optimizer, plan, args, user_config, batch[2], rank, world_size, device)
                resume.print_stopped(step)
                break
            # evaluations: validation bpb on the compiled model (all ranks), CORE (all ranks) and samples (rank 0)
            # on the uncompiled one, whose input shapes vary
            flops_so_far = plan.flops_per_token * plan.total_batch_size * step
            if is_due(step, args.eval_every, last_step, at_step_zero=True):
                if val_batches is None:  # the same rows as base_eval's (see nanochat.loss_eval)
                    val_batches = eval_batches(tokenizer, "val", args.eval_tokens, args.max_seq_len,
                                               args.device_batch_size, device)
                # bits per byte of text: unlike the loss in nats per token, comparable across vocabularies
                with evaluating(orig_model, args.fp8):
                    val = evaluate_bpb(model, val_batches, token_bytes)
                state.val_bpb = val.bpb
                print0(f"Step {step:05d} | Validation bpb: {val}")
                state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
                state.record("val", {"step": step, "val_bpb": val.bpb, "val_bpb_se": val.se, "val_tokens": val.tokens,
                                     "flops": flops_so_far})
                wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                               "total_training_time": state.total_training_time, "val/bpb": val.bpb, "val/bpb_se": val.se})
            if is_due(step, args.core_metric_every, last_step):
                results = evaluate_core_metric(orig_model, tokenizer, device, args, step)
                if results is not None:
                    state.core_results = results
                    wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": results["core_metric"],
                                   "centered_results": results.get("centered_results")})
            if rank == 0 and is_due(step, args.sample_every, last_step):
                print_samples(orig_model, tokenizer, args.fp8)
            # checkpoint (the step we resumed from is on disk already); the last step always saves
            if (last_step or is_due(step, args.save_every, last_step)) and not resumed_here:
                save(checkpoint_dir, state, orig_model, optimizer, plan, args, user_config, batch[2], rank, world_size, device)
            if last_step:
                break

            # one optimization step, timed between device synchronizations so dt is the step's own work
            synchronize(device_type)
            t0 = time.time()
            losses, batch = train_step(model, batches, batch, plan.grad_accum_steps, scaler)
            lrm = get_lr_multiplier(step, N, plan.warmup_iters, args.warmdown_ratio, args.final_lr_frac)
            finish_step(optimizer, scaler, lrm, momentum=get_muon_momentum(step, N, args.warmdown_ratio),
                        weight_decay=get_weight_decay(step, N, plan.weight_decay_scaled))
            train_loss = losses[-1].item()  # rank 0's last micro-batch is what gets logged
            synchronize(device_type)
            dt = time.time() - t0
            # a non-finite loss on any rank stops every rank (under fp16 the GradScaler skips such steps instead)
            if scaler is None and any_rank(not bool(torch.isfinite(losses).all()), device):
                raise resume.diverged(f"training loss became {train_loss} at step {step} (non-finite)",
                                      state.last_good_step, checkpoint_dir)

            # the step's log line: an EMA of the loss (debiased like Adam's moments, for the first steps) and
            # throughput; the first 10 steps (compilation, warm-up) are left out of the training time and the ETA
            ema_beta = 0.9
            state.smooth_train_loss = ema_beta * state.smooth_train_loss + (1 - ema_beta) * train_loss
            debiased = state.smooth_train_loss / (1 - ema_beta ** (step + 1))
            tok_per_sec = int(plan.total_batch_size / dt)
            if peak_flops:
                state.mfu = 100 * plan.flops_per_token * plan.total_batch_size / dt / (peak_flops * world_size)
            eta = ""
            if step > 10:
                state.total_training_time += dt
                eta = f" | eta: {(N - step) * state.total_training_time / (step - 10) / 60:.1f}m"
            epoch = batch[2]["epoch"]
            print0(f"step {step:05d}/{N:05d} ({100 * step / N:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
                   f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {'n/a' if state.mfu is None else f'{state.mfu:.2f}'} | "
                   f"epoch: {epoch} | total time: {state.total_training_time / 60:.2f}m{eta}")
            state.record("train", {"step": step, "loss": debiased, "flops": flops_so_far})
            if step % 100 == 0:
                wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                               "total_training_time": state.total_training_time, "train/loss": debiased, "train/lrm": lrm,
                               "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": state.mfu, "train/epoch": epoch})
            state.step += 1
            # the GC policy: after this run's first step freeze what it built, then collect only every 5000 steps
            manage_gc(state.step == start_step + 1, state.step)

        # --- wrap-up: a run stopped by a signal is not finished, so it writes no summary and no report ------------
        if not stopped:
            wrap_up(args, plan, state, checkpoint_dir, tokenizer, user_config, rank, world_size, device_type)
        wandb_run.finish()
    finally:  # also after an error or a divergence: an in-process caller gets its handlers and GC back
        restore_signal_handlers()
        release_gc()
        compute_cleanup()


if __name__ == "__main__":
    run(main)
