"""
Pretrain a base GPT model. One process or many (torchrun), on a laptop CPU or 8xH100, with the same code.

Examples:
    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20        # tiny CPU run
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=26                  # one 8-GPU node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 -m scripts.base_train ...
    python -m scripts.base_train --depth=12 --resume-from-step=1000               # resume a run (same flags)

The recipe: auto batch size, batch-scaled learning rates, T_epoch weight decay, warmup + warmdown LR schedule,
Muon momentum and weight-decay schedules. The script reads top-down: flags and their checks, the schedules, the plan
(shapes, batch, horizon; all on the meta device), the checkpoint helpers, then Training, whose run() is the story:
setup (device, resume checks, plan), build (model, optimizer, loop state, data), the loop, the wrap-up (summary.json
and the report). SIGTERM/SIGINT save a checkpoint at the next step boundary and exit 0. A non-finite loss, or
weights / optimizer state that became non-finite, stop the run (exit 1) and nothing non-finite is ever saved.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch allocates anything

import json
import math
import time
import base64
import signal
import argparse
import contextlib
import dataclasses

import torch
import torch.distributed as dist

from nanochat import fp8
from nanochat import checkpoint_manager as ckpt
from nanochat.auto_batch import auto_device_batch_size, positive_int_or_auto
from nanochat.common import (compute_init, compute_cleanup, print0, print_banner, get_base_dir, autodetect_device_type,
                             get_peak_flops, init_wandb, int_in, float_in, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, atomic_write,
                             synchronize, peak_memory_mib, any_rank, make_grad_scaler, finish_step, manage_gc, release_gc,
                             is_due, should_compile)
from nanochat.core_eval import evaluate_core, format_core, SAMPLE_PROMPTS
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit, tokenizing_distributed_data_loader_bos_bestfit
from nanochat.engine import Engine
from nanochat.flash_attention import get_backend
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb, keep_batches
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer, get_token_bytes

B_REF = 2 ** 19          # total batch size (tokens) the learning rates were tuned at
REF_DEPTH = 12           # depth the batch-size / weight-decay scaling laws are anchored at
DEFAULT_RATIO = 12.0     # tokens : scaling params when no horizon flag says otherwise


def build_parser():
    parser = argparse.ArgumentParser(description="Pretrain a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("logging")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    g.add_argument("--compile", type=str, default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model and the optimizer math (auto: always on CUDA, on CPU for long runs)")
    g.add_argument("--fp8", action="store_true", help="train Linear layers in FP8 (CUDA compute capability >= 8.9 only)")
    g.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"], help="FP8 scaling recipe (tensorwise is faster)")
    g = parser.add_argument_group("model architecture")
    g.add_argument("--depth", type=int_in("[1, inf)"), default=20, help="number of transformer layers: the one dial that sizes everything")
    g.add_argument("--aspect-ratio", type=int_in("[1, inf)"), default=64, help="model_dim = depth * aspect_ratio (rounded up to a multiple of head dim)")
    g.add_argument("--head-dim", type=int_in("[1, inf)"), default=128, help="target attention head dimension (even: rotary embeddings rotate pairs)")
    g.add_argument("--max-seq-len", type=int_in("[2, inf)"), default=2048, help="maximum context length (tokens)")
    g.add_argument("--window-pattern", type=str, default="SSSL", help="sliding-window pattern tiled over layers: L = full context, S = a quarter of it; last layer always L")
    g = parser.add_argument_group("training horizon (first positive one wins)")
    g.add_argument("--num-iterations", type=int_in("[1, inf)", -1), default=-1, help="explicit number of optimization steps (-1 = off)")
    g.add_argument("--target-flops", type=float_in("(0, inf)", -1), default=-1.0, help="derive steps from a total FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float_in("(0, inf)", -1), default=DEFAULT_RATIO, help="training tokens : scaling params (-1 = off)")
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
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--resume-from-step", type=int_in("[0, inf)", -1), default=-1, help="resume from the checkpoint at this step (-1 = fresh run); pass the same flags as the original run")
    g.add_argument("--save-every", type=int_in("[1, inf)", -1), default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep-last", type=int_in("[1, inf)", -1), default=-1, help="after each save keep only the last K checkpoints, to bound disk use (-1 = keep all)")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name under base_checkpoints/ (default d<depth>)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int_in("[1, inf)", -1), default=250, help="validation bpb every N steps (-1 = off)")
    g.add_argument("--eval-tokens", type=int_in("[1, inf)"), default=80 * 524288, help="tokens per validation bpb evaluation")
    g.add_argument("--core-metric-every", type=int_in("[1, inf)", -1), default=2000, help="CORE metric every N steps and at the end (-1 = off)")
    g.add_argument("--core-metric-max-per-task", type=int_in("[1, inf)", -1), default=500, help="examples per CORE task (-1 = all)")
    g.add_argument("--sample-every", type=int_in("[1, inf)", -1), default=2000, help="print greedy samples every N steps and at the end (-1 = off)")
    return parser


def fail(message):
    """One clear line, non-zero exit (before any heavy work)."""
    raise SystemExit(f"error: {message}")


def check_args(args):
    """Checks that need nothing but the flags."""
    if args.head_dim % 2:
        fail(f"--head-dim={args.head_dim} must be even (rotary embeddings rotate pairs of channels)")
    if not args.window_pattern or any(c not in "SL" for c in args.window_pattern.upper()):
        fail(f"--window-pattern={args.window_pattern!r} must be a non-empty string of S and L characters")
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        fail("no training horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")
    ckpt.check_model_tag(args.model_tag)

# -----------------------------------------------------------------------------
# Schedules (it = 0-based index of the update being made, N = number of updates)

def warmup_iters_for(args, N):
    warmdown = round(args.warmdown_ratio * N)
    warmup = round(args.warmup_ratio * N) if args.warmup_ratio is not None else args.warmup_steps
    return max(0, min(warmup, N - warmdown))  # warmup never overlaps the warmdown (matters for short runs)


def get_lr_multiplier(it, N, warmup_iters, warmdown_ratio, final_lr_frac):
    warmdown_iters = round(warmdown_ratio * N)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= N - warmdown_iters:
        return 1.0
    progress = (N - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(it, N, warmdown_ratio):
    # ramp 0.85 -> 0.97 over the first 400 steps, hold, then 0.97 -> 0.90 across the warmdown
    momentum = 0.85 + (0.97 - 0.85) * min(it / 400, 1.0)
    warmdown_iters = round(warmdown_ratio * N)
    start = N - warmdown_iters
    if warmdown_iters > 0 and it >= start:
        momentum = min(momentum, 0.97 - (0.97 - 0.90) * (it - start) / warmdown_iters)
    return momentum


def get_weight_decay(it, N, wd):
    return wd * 0.5 * (1 + math.cos(math.pi * it / max(N, 1)))  # cosine to zero

# -----------------------------------------------------------------------------
# Plan: model shape, batch size, LR / weight-decay scaling and horizon, all from the flags

@dataclasses.dataclass
class Plan:
    model_config: object
    param_counts: dict
    num_scaling_params: int
    flops_per_token: float
    total_batch_size: int
    grad_accum_steps: int
    batch_lr_scale: float
    weight_decay_scaled: float
    num_iterations: int
    warmup_iters: int
    total_tokens: int


def training_plan(args, vocab_size, world_tokens_per_fwdbwd, print0=print):
    """Everything is computed on the meta device (no memory). Prints what it decided."""
    def make_config(depth):
        return config_from_depth(depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                                 vocab_size=vocab_size, window_pattern=args.window_pattern.upper())

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

    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / D_REF) ** 0.383))
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
        if total_batch_size % world_tokens_per_fwdbwd != 0:
            adjusted = max(1, round(total_batch_size / world_tokens_per_fwdbwd)) * world_tokens_per_fwdbwd
            print0(f"Adjusted batch size to {adjusted:,} tokens: a multiple of device batch x seq len x world size ({world_tokens_per_fwdbwd:,})")
            total_batch_size = adjusted
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {args.device_batch_size * args.max_seq_len:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    batch_lr_scale = math.sqrt(total_batch_size / B_REF)
    if batch_lr_scale != 1.0:
        print0(f"Scaling LRs by sqrt({total_batch_size:,}/{B_REF:,}) = {batch_lr_scale:.6f}")
    weight_decay_scaled = args.weight_decay * math.sqrt(total_batch_size / B_REF) * (D_REF / target_tokens)
    if weight_decay_scaled != args.weight_decay:
        print0(f"Scaling weight decay from {args.weight_decay:.6f} to {weight_decay_scaled:.6f} (T_epoch: sqrt(B/B_ref) x D_ref/D)")

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
        fail(f"the horizon works out to {num_iterations} steps; raise --num-iterations/--target-flops/--target-param-data-ratio "
             f"or lower --total-batch-size")
    total_tokens = total_batch_size * num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_tokens / num_scaling_params:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * total_tokens:e}")
    return Plan(model_config, param_counts, num_scaling_params, flops_per_token, total_batch_size, grad_accum_steps,
                batch_lr_scale, weight_decay_scaled, num_iterations, warmup_iters_for(args, num_iterations), total_tokens)

# -----------------------------------------------------------------------------
# Loop state: everything the loop carries from step to step. The LOOP_FIELDS go into the checkpoint meta, with the
# RNG and dataloader states, so that a resumed run continues bit-exactly.

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

# -----------------------------------------------------------------------------
# Setup: resume checks and the hardware

def check_resume(args, checkpoint_dir, world_size, user_config):
    """The resume checkpoint's meta after checking it is complete, readable and from a compatible run."""
    step = args.resume_from_step
    if not ckpt.is_complete(checkpoint_dir, step):
        available = ckpt.complete_steps(checkpoint_dir)
        fail(f"--resume-from-step={step}: no complete checkpoint for step {step} in {checkpoint_dir} "
             f"(complete steps there: {available if available else 'none'})")
    try:
        meta = ckpt.load_meta(checkpoint_dir, step)
    except ckpt.CheckpointError as e:
        fail(f"--resume-from-step={step}: {e}")
    saved_world = meta.get("world_size", 1)
    if saved_world != world_size:
        fail(f"--resume-from-step={step}: the checkpoint in {checkpoint_dir} was saved by {saved_world} process(es) "
             f"but this run has {world_size}; optimizer state is sharded per rank, relaunch with {saved_world} processes")
    differing = [k for k, v in meta.get("user_config", {}).items()
                 if k not in ("resume_from_step", "run", "keep_last") and user_config.get(k) != v]
    if differing:
        print0(f"WARNING: flags differ from the checkpoint's run ({', '.join('--' + k.replace('_', '-') for k in differing)}); "
               "the schedules follow the current flags, so the resumed run will not match an uninterrupted one")
    return meta


def print_hardware(device_type, window_pattern):
    """Peak FLOPs (None = MFU n/a) and the attention backend's warnings."""
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

# -----------------------------------------------------------------------------
# Build: model and optimizer (restored when resuming), the loop state and the train loader

def build_model(args, plan, device, checkpoint_dir, rank, use_compile):
    """(orig_model, optimizer): the model on device (restored when resuming) and its optimizer."""
    with torch.device("meta"):
        model = GPT(plan.model_config)
    model.to_empty(device=device)
    model.init_weights()
    optim_data = None
    if args.resume_from_step >= 0:
        try:
            model_data, optim_data, _ = ckpt.load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                            load_optimizer=True, rank=rank)
            model.load_state_dict(model_data, strict=True, assign=True)
        except (ckpt.CheckpointError, RuntimeError) as e:
            fail(f"--resume-from-step={args.resume_from_step}: {e}")
        del model_data
        print0(f"Resumed model weights from {checkpoint_dir} at step {args.resume_from_step}")
    if args.fp8:  # main checked the device; argparse the recipe
        fp8.convert_to_float8_training(model, recipe=args.fp8_recipe, device=device)
    adam_betas = None
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        adam_betas = (args.adam_beta1 if args.adam_beta1 is not None else 0.8,
                      args.adam_beta2 if args.adam_beta2 is not None else 0.95)
    scale = plan.batch_lr_scale
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale,
                                      matrix_lr=args.matrix_lr * scale, weight_decay=plan.weight_decay_scaled,
                                      adam_betas=adam_betas, scalar_lr=args.scalar_lr * scale, compile=use_compile)
    if optim_data is not None:
        optimizer.load_state_dict(optim_data)
    return model, optimizer


def encode_rng_state(state):
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng_state(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def gather_objects(obj, world_size):
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def restore_loop_state(meta, rank, device_type):
    """(LoopState, this rank's dataloader state) from a checkpoint's meta; also restores this rank's RNG states.
    check_resume has made sure the checkpoint was saved by as many ranks as this run has."""
    loop = meta["loop_state"]
    state = LoopState(step=meta["step"], val_bpb=meta["val_bpb"], last_good_step=meta["step"],
                      **{k: loop[k] for k in LOOP_FIELDS})
    rng = loop["rng_states"][rank]
    torch.set_rng_state(decode_rng_state(rng["cpu"]))
    if device_type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(decode_rng_state(rng["cuda"]))
    return state, meta["dataloader_state_dicts"][rank]


def with_resume_states(loader, resume_state):
    """Yields (x, y, the loader state that resumes at this very batch). The loader's own state resumes *after* its
    batch, so a checkpoint, which is taken before the prefetched batch is consumed, stores the previous one's."""
    for x, y, state_after in loader:
        yield x, y, resume_state
        resume_state = state_after

# -----------------------------------------------------------------------------
# The run, in stages

class Training:
    """One pretraining run. run() is the whole story: setup, build, the loop, the wrap-up; each stage sets the
    attributes that the later ones read."""

    def __init__(self, args):
        self.args = args
        self.user_config = dict(vars(args))  # logged to wandb and saved in checkpoint meta
        self.signals = []  # SIGTERM/SIGINT received: the loop checkpoints at the next step boundary and leaves

    def run(self):
        self.setup()
        self.build()
        previous_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.loop():  # a run stopped by a signal is not finished: no summary
                self.wrap_up()
            self.wandb_run.finish()
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            release_gc()
            compute_cleanup()
        return 0

    def setup(self):
        """Device and processes, the checks that need the world size, the resume checkpoint, wandb and the plan."""
        args = self.args
        print_banner()
        self.device_type = args.device_type or autodetect_device_type()
        _, self.rank, _, self.world_size, self.device = compute_init(self.device_type)
        print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
        if args.fp8:
            try:
                fp8.check_fp8_support(self.device)  # before any heavy work
            except fp8.Fp8UnsupportedError as e:
                fail(str(e))
        if args.device_batch_size == "auto":
            args.device_batch_size = self.auto_device_batch_size()
        world_tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * self.world_size
        if args.total_batch_size != -1 and args.total_batch_size % world_tokens_per_fwdbwd:
            fail(f"--total-batch-size={args.total_batch_size} must be -1 (auto) or a positive multiple of --device-batch-size "
                 f"x --max-seq-len x world size = {world_tokens_per_fwdbwd}")
        self.checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
        self.resuming = args.resume_from_step >= 0
        self.resume_meta = check_resume(args, self.checkpoint_dir, self.world_size, self.user_config) if self.resuming else None
        self.wandb_run = init_wandb("nanochat", args.run, self.user_config, self.rank == 0)
        self.tokenizer = get_tokenizer()
        print0(f"Vocab size: {self.tokenizer.get_vocab_size():,}")
        self.plan = training_plan(args, self.tokenizer.get_vocab_size(), world_tokens_per_fwdbwd, print0)
        if args.resume_from_step > self.plan.num_iterations:
            fail(f"--resume-from-step={args.resume_from_step} is past the end of this run ({self.plan.num_iterations} steps)")
        self.peak_flops = print_hardware(self.device_type, args.window_pattern)

    def auto_device_batch_size(self):
        """The largest micro-batch that fits, of those that split the total batch (planned with one sequence per
        micro-step, which leaves it as planned) evenly."""
        args, row_tokens = self.args, self.args.max_seq_len * self.world_size
        plan = training_plan(argparse.Namespace(**{**vars(args), "device_batch_size": 1}), get_tokenizer().get_vocab_size(),
                             row_tokens, print0=lambda *a, **k: None)
        return auto_device_batch_size(plan.model_config, self.device, args.max_seq_len, plan.total_batch_size // row_tokens,
                                      should_compile(self.device_type, args.compile, plan.num_iterations),
                                      args.fp8_recipe if args.fp8 else None)

    def build(self):
        """Model and optimizer (restored when resuming), the loop state and the train loader."""
        args, plan = self.args, self.plan
        use_compile = should_compile(self.device_type, args.compile, plan.num_iterations)  # the whole horizon: a resume decides alike
        self.orig_model, self.optimizer = build_model(args, plan, self.device, self.checkpoint_dir, self.rank, use_compile)
        self.model = torch.compile(self.orig_model, dynamic=False, fullgraph=True) if use_compile else self.orig_model
        for key, value in plan.param_counts.items():
            print0(f"{key:24s}: {value:,}")
        print0(f"Estimated FLOPs per token: {plan.flops_per_token:e}")
        self.scaler = make_grad_scaler(self.device_type)
        self.token_bytes = get_token_bytes(device=self.device)
        self.val_batches = None
        self.state, loader_state = restore_loop_state(self.resume_meta, self.rank, self.device_type) if self.resuming else (LoopState(), None)
        loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
            self.tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=self.device, resume_state_dict=loader_state)
        self.batches = with_resume_states(loader, loader_state)

    def on_signal(self, signum, frame):
        if not self.signals:
            print(f"[rank {self.rank}] received {signal.Signals(signum).name}: saving a checkpoint at the next step "
                  "boundary", flush=True)
        self.signals.append(signum)

    def loop(self):
        """At every step boundary: the signal check, evaluations and checkpoints; then one optimization step.
        Returns False when a signal stopped it (after a checkpoint), True at the end of the horizon."""
        args, state, N = self.args, self.state, self.plan.num_iterations
        start_step = state.step
        print0(f"Starting training at step {start_step} of {N} (checkpoints: {self.checkpoint_dir})")
        batch = next(self.batches)
        while True:
            step = state.step
            last_step = step == N
            resumed_here = self.resuming and step == start_step  # this checkpoint is already on disk
            if any_rank(bool(self.signals), self.device):
                if step > 0 and not resumed_here:
                    self.save(batch[2])
                if step > 0:
                    print0(f"Stopped by signal at step {step}; resume with --resume-from-step={step} (and the same flags)")
                else:
                    print0("Stopped by signal at step 0; nothing trained yet, no checkpoint written")
                return False
            self.evaluate(last_step)
            if (last_step or is_due(step, args.save_every, last_step)) and not resumed_here:
                self.save(batch[2])
            if last_step:
                return True
            batch = self.train_step(batch)
            state.step += 1
            manage_gc(state.step == start_step + 1, state.step)

    @contextlib.contextmanager
    def evaluating(self):
        """The block runs in eval mode and, with --fp8, in bf16; training mode after it."""
        self.orig_model.eval()  # the compiled model wraps this module: one switch for both
        try:
            with fp8.disable_fp8(self.orig_model) if self.args.fp8 else contextlib.nullcontext():
                yield
        finally:
            self.orig_model.train()

    def evaluate(self, last_step):
        """Validation bpb (all ranks), the CORE metric (all ranks) and greedy samples (rank 0), each at its cadence.
        CORE and the samples use the uncompiled model."""
        args, state, tokenizer, step = self.args, self.state, self.tokenizer, self.state.step
        flops_so_far = self.plan.flops_per_token * self.plan.total_batch_size * step
        if is_due(step, args.eval_every, last_step, at_step_zero=True):
            if self.val_batches is None:  # tokenized once, replayed at every evaluation
                eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * self.world_size))
                self.val_batches = keep_batches(tokenizing_distributed_data_loader_bos_bestfit(
                    tokenizer, args.device_batch_size, args.max_seq_len, split="val", device=self.device), eval_steps)
            with self.evaluating():
                state.val_bpb = evaluate_bpb(self.model, self.val_batches, len(self.val_batches), self.token_bytes)
            print0(f"Step {step:05d} | Validation bpb: {state.val_bpb:.6f}")
            state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
            state.record("val", {"step": step, "val_bpb": state.val_bpb, "flops": flops_so_far})
            self.wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                                "total_training_time": state.total_training_time, "val/bpb": state.val_bpb})
        if is_due(step, args.core_metric_every, last_step):
            try:
                with self.evaluating():
                    results = evaluate_core(self.orig_model, tokenizer, self.device, max_per_task=args.core_metric_max_per_task)
                state.core_results = results
                print0(f"Step {step:05d} | CORE metric: {format_core(results)}")
                self.wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": results["core_metric"],
                                    "centered_results": results.get("centered_results")})
            except (Exception, SystemExit) as e:  # e.g. the CORE bundle cannot be had offline: training goes on
                print0(f"Step {step:05d} | CORE metric skipped: {e}")
        if self.rank == 0 and is_due(step, args.sample_every, last_step):
            engine = Engine(self.orig_model, tokenizer)
            with self.evaluating():
                for prompt in SAMPLE_PROMPTS:
                    tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                    sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                    print0(tokenizer.decode(sample[0]))

    def stop_diverged(self, what):
        """One error line naming the last good checkpoint, exit 1 (run() still cleans up)."""
        if self.state.last_good_step is not None:
            last_good = (f"the last good checkpoint is step {self.state.last_good_step} in {self.checkpoint_dir} "
                         f"(resume from it with lower learning rates)")
        else:
            last_good = "no checkpoint of this run was saved (lower the learning rates)"
        print0(f"error: {what}; stopping without saving it; {last_good}")
        raise SystemExit(1)

    def save(self, resume_state):
        """Checkpoint after state.step updates (never a non-finite one); resume_state is where the loader resumes."""
        state, args = self.state, self.args
        if any_rank(not ckpt.is_finite_state([self.orig_model.state_dict(), self.optimizer.state_dict()]), self.device):
            self.stop_diverged(f"the weights or optimizer state became non-finite at step {state.step}")
        loader_states = gather_objects(resume_state, self.world_size)
        rng_states = gather_objects({"cpu": encode_rng_state(torch.get_rng_state()), "cuda": encode_rng_state(
            torch.cuda.get_rng_state()) if self.device_type == "cuda" else None}, self.world_size)
        meta = {"step": state.step, "val_bpb": state.val_bpb, "model_config": dataclasses.asdict(self.plan.model_config),
                "user_config": self.user_config, "device_batch_size": args.device_batch_size,
                "max_seq_len": args.max_seq_len, "total_batch_size": self.plan.total_batch_size, "world_size": self.world_size,
                "dataloader_state_dict": loader_states[0], "dataloader_state_dicts": loader_states,
                "loop_state": {**{k: getattr(state, k) for k in LOOP_FIELDS}, "rng_states": rng_states}}
        try:
            ckpt.save_checkpoint(self.checkpoint_dir, state.step, self.orig_model.state_dict(),
                                 self.optimizer.state_dict(), meta, rank=self.rank, sync_ranks=True)
        except ckpt.CheckpointSaveError as e:  # e.g. a full disk
            raise SystemExit(f"error: {e}")
        state.last_good_step = state.step
        if self.rank == 0 and args.keep_last > 0:
            ckpt.prune_checkpoints(self.checkpoint_dir, args.keep_last)

    def train_step(self, batch):
        """One optimization step over grad_accum_steps micro-batches from the prefetched batch on; logs it and returns
        the next prefetched batch. A non-finite loss stops the run (under fp16 the GradScaler skips such steps)."""
        args, plan, step, N = self.args, self.plan, self.state.step, self.plan.num_iterations
        synchronize(self.device_type)
        t0 = time.time()
        micro_losses = []
        for _ in range(plan.grad_accum_steps):
            x, y, _ = batch
            loss = self.model(x, y)
            micro_losses.append(loss.detach())
            loss = loss / plan.grad_accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            batch = next(self.batches)  # prefetch while the device works
        lrm = get_lr_multiplier(step, N, plan.warmup_iters, args.warmdown_ratio, args.final_lr_frac)
        finish_step(self.optimizer, self.scaler, lrm, momentum=get_muon_momentum(step, N, args.warmdown_ratio),
                    weight_decay=get_weight_decay(step, N, plan.weight_decay_scaled))
        losses = torch.stack(micro_losses)
        train_loss = losses[-1].item()  # rank 0's last micro-batch is what gets logged
        synchronize(self.device_type)
        dt = time.time() - t0
        if self.scaler is None and any_rank(not bool(torch.isfinite(losses).all()), self.device):
            self.stop_diverged(f"training loss became {train_loss} at step {step} (non-finite)")
        self.log_step(train_loss, lrm, dt, epoch=batch[2]["epoch"])
        return batch

    def log_step(self, train_loss, lrm, dt, epoch):
        plan, state, step, N = self.plan, self.state, self.state.step, self.plan.num_iterations
        flops_so_far = plan.flops_per_token * plan.total_batch_size * step
        ema_beta = 0.9
        state.smooth_train_loss = ema_beta * state.smooth_train_loss + (1 - ema_beta) * train_loss
        debiased = state.smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = int(plan.total_batch_size / dt)
        if self.peak_flops:
            state.mfu = 100 * plan.flops_per_token * plan.total_batch_size / dt / (self.peak_flops * self.world_size)
        eta = ""
        if step > 10:
            state.total_training_time += dt  # the first steps (compilation warm-up) do not count
            eta = f" | eta: {(N - step) * state.total_training_time / (step - 10) / 60:.1f}m"
        print0(f"step {step:05d}/{N:05d} ({100 * step / N:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {'n/a' if state.mfu is None else f'{state.mfu:.2f}'} | "
               f"epoch: {epoch} | total time: {state.total_training_time / 60:.2f}m{eta}")
        state.record("train", {"step": step, "loss": debiased, "flops": flops_so_far})
        if step % 100 == 0:
            self.wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                                "total_training_time": state.total_training_time, "train/loss": debiased, "train/lrm": lrm,
                                "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": state.mfu, "train/epoch": epoch})

    def wrap_up(self):
        """Final prints, <checkpoint_dir>/summary.json (read by the sweep scripts) and the report section."""
        args, plan, state, device_type = self.args, self.plan, self.state, self.device_type
        peak_mib = peak_memory_mib(device_type)
        print0(f"Peak memory usage: {peak_mib:.2f}MiB" + ("" if device_type == "cuda" else " (process max RSS)"))
        print0(f"Total training time: {state.total_training_time / 60:.2f}m")
        min_val_bpb = None if state.min_val_bpb == float("inf") else state.min_val_bpb
        if min_val_bpb is not None:
            print0(f"Minimum validation bpb: {min_val_bpb:.6f}")
        if self.rank != 0:
            return
        total_flops = plan.flops_per_token * plan.total_tokens
        core, mfu = state.core_results, state.mfu
        core_score = core["core_metric"] if core else None
        ratio = plan.total_tokens / plan.num_scaling_params
        summary = {
            "model_tag": os.path.basename(self.checkpoint_dir), "depth": args.depth, "model_dim": plan.model_config.n_embd,
            "num_heads": plan.model_config.n_head, "max_seq_len": args.max_seq_len,
            "vocab_size": self.tokenizer.get_vocab_size(), "num_params": plan.param_counts["total"],
            "num_scaling_params": plan.num_scaling_params, "param_counts": plan.param_counts,
            "flops_per_token": plan.flops_per_token, "num_iterations": plan.num_iterations,
            "total_batch_size": plan.total_batch_size, "tokens_trained": plan.total_tokens, "param_data_ratio": ratio,
            "total_training_flops": total_flops, "val_bpb": state.val_bpb, "min_val_bpb": min_val_bpb,
            "core_score": core_score, "core_partial": bool(core.get("partial")) if core else None,
            "train_time_sec": state.total_training_time, "mfu": mfu, "peak_memory_mib": peak_mib,
            "world_size": self.world_size, "device_type": device_type, "fp8": args.fp8, "checkpoint_dir": self.checkpoint_dir,
        }
        summary_path = os.path.join(self.checkpoint_dir, "summary.json")  # beside the last step's checkpoint
        atomic_write(summary_path, lambda f: json.dump(summary, f, indent=2), mode="w")
        print0(f"Wrote run summary to {summary_path}")
        setup = {"Number of parameters": plan.param_counts["total"], "Number of scaling parameters": plan.num_scaling_params,
                 "Number of FLOPs per token": f"{plan.flops_per_token:e}", "Calculated number of iterations": plan.num_iterations,
                 "Number of training tokens": plan.total_tokens, "Tokens : Scaling params ratio": ratio,
                 "Total batch size": plan.total_batch_size, "DDP world size": self.world_size,
                 "warmup_iters": plan.warmup_iters, "warmdown_ratio": args.warmdown_ratio, "final_lr_frac": args.final_lr_frac}
        results = {"Minimum validation bpb": min_val_bpb, "Final validation bpb": state.val_bpb, "CORE metric estimate": core_score,
                   "MFU %": f"{mfu:.2f}%" if mfu is not None else "n/a", "Total training flops": f"{total_flops:e}",
                   "Total training time": f"{state.total_training_time / 60:.2f}m", "Peak memory usage": f"{peak_mib:.2f}MiB"}
        report = get_report()
        report.log(section="Base model training", data=[self.user_config, setup, results])
        report.log_history("base-training", state.history)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)  # everything that needs nothing but the flags, before any heavy work
    return Training(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
