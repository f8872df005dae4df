"""
Pretrain a base GPT model. One process or many (torchrun), on a laptop CPU or 8xH100, with the same code.

Examples:
    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20        # tiny CPU run
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=26                  # one 8-GPU node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 -m scripts.base_train ...
    python -m scripts.base_train --depth=12 --resume-from-step=1000               # resume a run (same flags)

The recipe is the reference's HEAD recipe (auto batch size, batch-scaled learning rates, T_epoch weight decay,
warmup + warmdown schedule, HEAD momentum/WD schedules) behind the SEED command line; where a default differs from
the SEED docs the flag's help says so. SIGTERM/SIGINT save a checkpoint at the next step boundary and exit 0;
a non-finite loss stops the run (exit 1) without touching earlier checkpoints.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch allocates anything

import gc
import json
import math
import time
import base64
import signal
import argparse
import resource
import dataclasses

import torch
import torch.distributed as dist

B_REF = 2 ** 19          # reference total batch size (tokens) the learning rates were tuned at
REF_DEPTH = 12           # reference depth for the batch-size / weight-decay scaling laws
DEFAULT_RATIO = 12.0     # HEAD tokens:params ratio (SEED docs: 10.5)


def build_parser():
    parser = argparse.ArgumentParser(description="Pretrain a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("logging")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    g.add_argument("--fp8", action="store_true", help="train Linear layers in FP8 (CUDA compute capability >= 8.9 only)")
    g.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"], help="FP8 scaling recipe (tensorwise is faster)")
    g = parser.add_argument_group("model architecture")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one dial that sizes everything")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to a multiple of head dim)")
    g.add_argument("--head-dim", type=int, default=128, help="target attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=2048, help="maximum context length (tokens)")
    g.add_argument("--window-pattern", type=str, default="SSSL", help="sliding-window pattern tiled over layers: L = full context, S = short window (a quarter of the context at HEAD; the SEED docs say half); last layer always L")
    g = parser.add_argument_group("training horizon (first positive one wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimization steps (-1 = off)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="derive steps from a total FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=DEFAULT_RATIO, help="training tokens : scaling params (-1 = off). HEAD default 12 (SEED docs: 10.5)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per micro-step (lower it on OOM: 16, 8, 4, 2, 1)")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = auto: B_opt ~ D^0.383 around 2^19 at d12)")
    g.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR for the token and value embeddings (value embeddings get x0.5 at HEAD)")
    g.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR for lm_head. HEAD default 0.008 (SEED docs: 0.004)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR for the transformer matrices")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR for the x0 lambdas (resid lambdas get x0.01)")
    g.add_argument("--weight-decay", type=float, default=0.28, help="Muon cautious weight decay at d12 / 2^19 tokens (rescaled for other sizes). HEAD default 0.28 (SEED docs: 0.2)")
    g.add_argument("--adam-beta1", type=float, default=None, help="AdamW beta1 for lm_head/embeddings/resid lambdas. Default: HEAD's tuned per-group betas (beta1 0.8); SEED docs: 0.8")
    g.add_argument("--adam-beta2", type=float, default=None, help="AdamW beta2 for lm_head/embeddings/resid lambdas. Default: HEAD's tuned per-group betas (0.96 lm_head, 0.995 embeddings, 0.95 scalars); SEED docs: 0.95")
    g.add_argument("--warmup-ratio", type=float, default=None, help="LR warmup as a fraction of the steps; overrides --warmup-steps when given (SEED docs default 0.0; HEAD uses --warmup-steps)")
    g.add_argument("--warmup-steps", type=int, default=40, help="LR warmup steps (HEAD), capped so warmup never runs into the warmdown")
    g.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps spent in the final LR decay. HEAD default 0.65 (SEED docs: 0.5)")
    g.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the last step. HEAD default 0.05 (SEED docs: 0.0)")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--resume-from-step", type=int, default=-1, help="resume from the checkpoint at this step (-1 = fresh run); pass the same flags as the original run")
    g.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name under base_checkpoints/ (default d<depth>)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=250, help="validation bpb every N steps (-1 = off)")
    g.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per validation bpb evaluation. HEAD default 80*2^19 (SEED docs: 40M)")
    g.add_argument("--core-metric-every", type=int, default=2000, help="CORE metric every N steps and at the end (-1 = off)")
    g.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    g.add_argument("--sample-every", type=int, default=2000, help="print greedy samples every N steps and at the end (-1 = off)")
    return parser


def fail(message):
    """One clear line, non-zero exit (before any heavy work)."""
    raise SystemExit(f"error: {message}")


def check_args(args):
    """Checks that need nothing but the flags."""
    for flag in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size"):
        value = getattr(args, flag)
        if value < 1:
            fail(f"--{flag.replace('_', '-')}={value} must be a positive integer")
    if args.max_seq_len < 2:
        fail(f"--max-seq-len={args.max_seq_len} must be at least 2")
    if not args.window_pattern or any(c not in "SL" for c in args.window_pattern.upper()):
        fail(f"--window-pattern={args.window_pattern!r} must be a non-empty string of S and L characters")
    if args.total_batch_size != -1 and args.total_batch_size < 1:
        fail(f"--total-batch-size={args.total_batch_size} must be a positive number of tokens or -1 (auto)")
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        fail("no training horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio to a positive value")
    for flag in ("warmdown_ratio", "final_lr_frac"):
        value = getattr(args, flag)
        if not 0.0 <= value <= 1.0:
            fail(f"--{flag.replace('_', '-')}={value} must be in [0, 1]")
    if args.warmup_ratio is not None and not 0.0 <= args.warmup_ratio <= 1.0:
        fail(f"--warmup-ratio={args.warmup_ratio} must be in [0, 1]")
    if args.warmup_steps < 0:
        fail(f"--warmup-steps={args.warmup_steps} must be >= 0")
    if args.fp8 and args.device_type and args.device_type != "cuda":
        fail(f"--fp8 needs a CUDA GPU with compute capability >= 8.9; this run is on {args.device_type}. Drop --fp8.")


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
    # HEAD: ramp 0.85 -> 0.97 over the first 400 steps, hold, then 0.97 -> 0.90 across the warmdown
    momentum = 0.85 + (0.97 - 0.85) * min(it / 400, 1.0)
    warmdown_iters = round(warmdown_ratio * N)
    start = N - warmdown_iters
    if warmdown_iters > 0 and it >= start:
        momentum = min(momentum, 0.97 - (0.97 - 0.90) * (it - start) / warmdown_iters)
    return momentum


def get_weight_decay(it, N, wd):
    return wd * 0.5 * (1 + math.cos(math.pi * it / max(N, 1)))  # cosine to zero (HEAD)


# -----------------------------------------------------------------------------

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


def any_rank(flag, device, world_size):
    """True if flag is true on any rank (all ranks take the same decision)."""
    if world_size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def format_count(n):
    return f"{n:,}"


def training_plan(args, vocab_size, world_tokens_per_fwdbwd, print0=print):
    """Model shape, batch size, LR / weight-decay scaling and horizon from the flags (HEAD recipe). Everything is
    computed on the meta device (no memory). Returns a dict; prints what it decided."""
    from nanochat.gpt import GPT, config_from_depth

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
    del meta_model, ref_model

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
    return dict(model_config=model_config, param_counts=param_counts, num_scaling_params=num_scaling_params,
                flops_per_token=flops_per_token, total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps,
                batch_lr_scale=batch_lr_scale, weight_decay_scaled=weight_decay_scaled, num_iterations=num_iterations,
                total_tokens=total_tokens, D_REF=D_REF, target_tokens=target_tokens)


def main(argv=None):
    args = build_parser().parse_args(argv)
    user_config = dict(vars(args))  # logged to wandb and saved in checkpoint meta
    check_args(args)

    from nanochat.common import (compute_init, compute_cleanup, print0, print_banner, get_base_dir, autodetect_device_type,
                                 get_peak_flops, DummyWandb, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON)
    from nanochat.gpt import GPT, config_from_depth
    from nanochat import checkpoint_manager as ckpt
    from nanochat.loss_eval import evaluate_bpb

    print_banner()
    device_type = args.device_type or autodetect_device_type()
    if args.fp8 and device_type != "cuda":
        fail(f"--fp8 needs a CUDA GPU with compute capability >= 8.9; this run is on {device_type}. Drop --fp8.")
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    master = rank == 0
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    if args.fp8:
        from nanochat import fp8
        try:
            fp8.check_fp8_support(device)  # before any heavy work
        except fp8.Fp8UnsupportedError as e:
            fail(str(e))

    # --- cheap checks that need the world size, before building anything big ---------------------------
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if args.total_batch_size > 0 and args.total_batch_size % world_tokens_per_fwdbwd != 0:
        fail(f"--total-batch-size={args.total_batch_size} is not divisible by --device-batch-size x --max-seq-len x "
             f"world size = {args.device_batch_size} x {args.max_seq_len} x {world_size} = {world_tokens_per_fwdbwd}; "
             f"use a multiple of {world_tokens_per_fwdbwd} (or -1 for auto)")
    model_tag = args.model_tag if args.model_tag else f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    resuming = args.resume_from_step >= 0
    resume_meta = None
    if resuming:
        step = args.resume_from_step
        if not ckpt.is_complete(checkpoint_dir, step):
            available = []
            if os.path.isdir(checkpoint_dir):
                available = sorted(int(f[len("complete_"):-len(".json")]) for f in os.listdir(checkpoint_dir)
                                   if f.startswith("complete_") and f.endswith(".json"))
            fail(f"--resume-from-step={step}: no complete checkpoint for step {step} in {checkpoint_dir} "
                 f"(complete steps there: {available if available else 'none'})")
        resume_meta = ckpt.load_meta(checkpoint_dir, step)
        saved_world = resume_meta.get("world_size", 1)
        if saved_world != world_size:
            fail(f"--resume-from-step={step}: the checkpoint in {checkpoint_dir} was saved by {saved_world} process(es) "
                 f"but this run has {world_size}; optimizer state is sharded per rank, relaunch with {saved_world} processes")
        differing = [k for k, v in resume_meta.get("user_config", {}).items()
                     if k not in ("resume_from_step", "run") and user_config.get(k) != v]
        if differing:
            print0(f"WARNING: flags differ from the checkpoint's run ({', '.join('--' + k.replace('_', '-') for k in differing)}); "
                   "the schedules follow the current flags, so the resumed run will not match an uninterrupted one")

    # --- wandb, tokenizer -------------------------------------------------------------------------------
    wandb_run = DummyWandb()
    if args.run != "dummy" and master:
        try:
            import wandb
            wandb_run = wandb.init(project="nanochat", name=args.run, config=user_config)
        except Exception as e:
            print0(f"WARNING: wandb logging disabled, could not start a wandb run ({type(e).__name__}: {e})")
    from nanochat.tokenizer import get_tokenizer, get_token_bytes
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")

    # --- model shape, batch size, LR / WD scaling, horizon (all on the meta device: cheap) ---------------
    plan = training_plan(args, vocab_size, world_tokens_per_fwdbwd, print0)
    model_config, param_counts = plan["model_config"], plan["param_counts"]
    num_scaling_params, flops_per_token = plan["num_scaling_params"], plan["flops_per_token"]
    total_batch_size, grad_accum_steps = plan["total_batch_size"], plan["grad_accum_steps"]
    batch_lr_scale, weight_decay_scaled = plan["batch_lr_scale"], plan["weight_decay_scaled"]
    num_iterations, total_tokens = plan["num_iterations"], plan["total_tokens"]
    if resuming and args.resume_from_step > num_iterations:
        fail(f"--resume-from-step={args.resume_from_step} is past the end of this run ({num_iterations} steps)")
    warmup_iters = warmup_iters_for(args, num_iterations)

    # --- hardware / attention messages ------------------------------------------------------------------
    if device_type == "cuda":
        gpu_name = torch.cuda.get_device_name(0)
        peak_flops = get_peak_flops(gpu_name)
        print0(f"GPU: {gpu_name} | Peak FLOPS (BF16): {peak_flops:.2e}" if peak_flops else
               f"GPU: {gpu_name} | Peak FLOPS (BF16): unknown (MFU n/a)")
    else:
        peak_flops = None
        print0(f"MFU n/a (no peak FLOPs figure for device type {device_type})")
    from nanochat.flash_attention import get_backend
    backend, _ = get_backend(device_type)
    if device_type == "cuda":
        if backend == "fa3":
            print0("✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome.")
        else:
            print0("!" * 80)
            print0("WARNING: Flash Attention 3 not available, using a fallback attention backend "
                   f"({backend}). Training will be less efficient.")
            if backend == "sdpa" and args.window_pattern.upper() != "L":
                print0(f"WARNING: SDPA has no support for sliding window attention (pattern {args.window_pattern}); "
                       "GPU utilization will be terrible. Use --window-pattern L.")
            print0("!" * 80)

    # --- build the model (and restore it when resuming) -------------------------------------------------
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    optim_data = None
    if resuming:
        model_data, optim_data, _ = ckpt.load_checkpoint(checkpoint_dir, args.resume_from_step, device,
                                                        load_optimizer=True, rank=rank)
        model.load_state_dict(model_data, strict=True, assign=True)
        del model_data
        print0(f"Resumed model weights from {checkpoint_dir} at step {args.resume_from_step}")
    orig_model = model  # uncompiled: checkpoints, CORE and sampling (variable shapes)
    fp8_off = None
    if args.fp8:
        from nanochat import fp8
        try:
            fp8.convert_to_float8_training(orig_model, recipe=args.fp8_recipe, device=device)
        except (fp8.Fp8UnsupportedError, ValueError) as e:
            fail(str(e))
        fp8_off = fp8.disable_fp8
    if device_type == "cuda":
        model = torch.compile(orig_model, dynamic=False)
    for key, value in param_counts.items():
        print0(f"{key:24s}: {format_count(value)}")
    print0(f"Estimated FLOPs per token: {flops_per_token:e}")

    def eval_context():
        import contextlib
        return fp8_off(orig_model) if fp8_off is not None else contextlib.nullcontext()

    adam_betas = None
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        adam_betas = (args.adam_beta1 if args.adam_beta1 is not None else 0.8,
                      args.adam_beta2 if args.adam_beta2 is not None else 0.95)
    optimizer = orig_model.setup_optimizer(unembedding_lr=args.unembedding_lr * batch_lr_scale,
                                           embedding_lr=args.embedding_lr * batch_lr_scale,
                                           matrix_lr=args.matrix_lr * batch_lr_scale,
                                           weight_decay=weight_decay_scaled, adam_betas=adam_betas,
                                           scalar_lr=args.scalar_lr * batch_lr_scale)
    if optim_data is not None:
        optimizer.load_state_dict(optim_data)
        del optim_data
    scaler = torch.amp.GradScaler(device_type) if COMPUTE_DTYPE == torch.float16 else None

    # --- data ---------------------------------------------------------------------------------------------
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit, tokenizing_distributed_data_loader_bos_bestfit
    loader_resume_state = None
    if resuming:
        states = resume_meta.get("dataloader_state_dicts") or [resume_meta.get("dataloader_state_dict")]
        loader_resume_state = states[rank] if rank < len(states) else states[0]
    train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device, resume_state_dict=loader_resume_state)
    build_val_loader = lambda: tokenizing_distributed_data_loader_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="val", device=device)
    x, y, loader_state = next(train_loader)  # prefetch the first batch
    # loader_state resumes *after* (x, y); to resume at (x, y) itself a checkpoint stores the state of the batch before
    resume_loader_state = loader_resume_state

    # --- loop state -----------------------------------------------------------------------------------------
    step = 0
    val_bpb = None
    min_val_bpb = float("inf")
    smooth_train_loss = 0.0
    total_training_time = 0.0
    history = {"train": [], "val": []}
    core_results = None
    if resuming:
        loop = resume_meta["loop_state"]
        step = resume_meta["step"]
        val_bpb = resume_meta.get("val_bpb")
        min_val_bpb = loop["min_val_bpb"]
        smooth_train_loss = loop["smooth_train_loss"]
        total_training_time = loop["total_training_time"]
        history = loop.get("history", history)
        core_results = loop.get("core_results")
        rng = loop.get("rng_states")
        if rng and rank < len(rng):
            torch.set_rng_state(decode_rng_state(rng[rank]["cpu"]))
            if device_type == "cuda" and rng[rank].get("cuda"):
                torch.cuda.set_rng_state(decode_rng_state(rng[rank]["cuda"]))

    # --- preemption: remember the signal, act on it at the next step boundary --------------------------------
    stop_signal = {"signum": None}
    def on_signal(signum, frame):
        if stop_signal["signum"] is None:
            print(f"[rank {rank}] received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary", flush=True)
        stop_signal["signum"] = signum
    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def save(at_step):
        loader_states = gather_objects(resume_loader_state, world_size)
        rng_states = gather_objects({"cpu": encode_rng_state(torch.get_rng_state()),
                                     "cuda": encode_rng_state(torch.cuda.get_rng_state()) if device_type == "cuda" else None},
                                    world_size)
        meta = {
            "step": at_step,
            "val_bpb": val_bpb,
            "model_config": dataclasses.asdict(model_config),
            "user_config": user_config,
            "device_batch_size": args.device_batch_size,
            "max_seq_len": args.max_seq_len,
            "total_batch_size": total_batch_size,
            "world_size": world_size,
            "dataloader_state_dict": loader_states[0],
            "dataloader_state_dicts": loader_states,
            "loop_state": {
                "min_val_bpb": min_val_bpb,
                "smooth_train_loss": smooth_train_loss,
                "total_training_time": total_training_time,
                "history": history,
                "core_results": core_results,
                "rng_states": rng_states,
            },
        }
        ckpt.save_checkpoint(checkpoint_dir, at_step, orig_model.state_dict(), optimizer.state_dict(), meta,
                             rank=rank, sync_ranks=True)

    def record(split, entry):
        rows = [r for r in history[split] if r["step"] != entry["step"]]  # a resumed step replaces its old entry
        rows.append(entry)
        history[split] = rows

    # --- training loop ----------------------------------------------------------------------------------
    print0(f"Starting training at step {step} of {num_iterations} (checkpoints: {checkpoint_dir})")
    first_step_of_run = True
    fault_nan_step = int(os.environ.get("NANOCHAT_TEST_NAN_AT_STEP", "-1"))
    mfu = None
    stopped_by_signal = False
    while True:
        last_step = step == num_iterations
        flops_so_far = flops_per_token * total_batch_size * step

        # preemption: checkpoint here (model after `step` updates, batch for `step` not consumed yet) and leave
        if any_rank(stop_signal["signum"] is not None, device, world_size):
            if step > 0 and not (resuming and step == args.resume_from_step):
                save(step)
            if step > 0:
                print0(f"Stopped by signal at step {step}; resume with --resume-from-step={step} (and the same flags)")
            else:
                print0("Stopped by signal at step 0; nothing trained yet, no checkpoint written")
            stopped_by_signal = True
            break

        # validation bits per byte (all ranks)
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
            with eval_context():
                val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            min_val_bpb = min(min_val_bpb, val_bpb)
            record("val", {"step": step, "val_bpb": val_bpb, "flops": flops_so_far})
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time, "val/bpb": val_bpb})
            model.train()

        # CORE metric (all ranks, uncompiled model), never at step 0
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            orig_model.eval()
            try:
                from nanochat.core_eval import evaluate_core
                with eval_context():
                    core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
                label = "" if not core_results.get("partial") else f" (partial: {core_results.get('num_tasks')}/{core_results.get('total_tasks')} tasks)"
                print0(f"Step {step:05d} | CORE metric: {core_results['core_metric']:.4f}{label}")
                wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": core_results["core_metric"],
                               "centered_results": core_results.get("centered_results")})
            except ImportError as e:
                print0(f"Step {step:05d} | CORE metric skipped: base_eval is not available ({e})")
            except (Exception, SystemExit) as e:
                print0(f"Step {step:05d} | CORE metric skipped: {e}")
            orig_model.train()

        # samples (rank 0, uncompiled model, greedy)
        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            from nanochat.engine import Engine
            from nanochat.core_eval import SAMPLE_PROMPTS  # one prompt list for training-time and eval-time samples
            orig_model.eval()
            engine = Engine(orig_model, tokenizer)
            with eval_context():
                for prompt in SAMPLE_PROMPTS:
                    tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                    sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                    print0(tokenizer.decode(sample[0]))
            orig_model.train()

        # checkpoint
        if last_step or (step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0):
            if not (resuming and step == args.resume_from_step):
                save(step)

        if last_step:
            break

        # --- one optimization step ---
        synchronize()
        t0 = time.time()
        micro_losses = []
        for micro_step in range(grad_accum_steps):
            loss = model(x, y)
            micro_losses.append(loss.detach())
            loss = loss / grad_accum_steps
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            resume_loader_state = loader_state  # the batch after this one is what a resume must start with
            x, y, loader_state = next(train_loader)  # prefetch while the device works
        lrm = get_lr_multiplier(step, num_iterations, warmup_iters, args.warmdown_ratio, args.final_lr_frac)
        muon_momentum = get_muon_momentum(step, num_iterations, args.warmdown_ratio)
        muon_wd = get_weight_decay(step, num_iterations, weight_decay_scaled)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_wd
        if scaler is not None:
            scaler.unscale_(optimizer)
            if world_size > 1:  # every rank skips together when any rank saw inf/nan
                for found_inf in scaler._found_inf_per_device(optimizer).values():
                    dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses = torch.stack(micro_losses)
        if fault_nan_step == step:
            losses = losses * float("nan")  # test hook (NANOCHAT_TEST_NAN_AT_STEP): simulate a diverged step
        all_finite = bool(torch.isfinite(losses).all().item())
        train_loss = losses[-1].item()  # rank 0's last micro-batch, as the reference logs it
        synchronize()
        dt = time.time() - t0

        if any_rank(not all_finite, device, world_size) and scaler is None:
            print0(f"error: training loss became {train_loss} at step {step} (non-finite); stopping without saving. "
                   f"Earlier checkpoints in {checkpoint_dir} are untouched; lower the learning rates or resume from one.")
            for s, h in previous_handlers.items():
                signal.signal(s, h)
            compute_cleanup()
            raise SystemExit(1)

        # --- logging ---
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
        debiased = smooth_train_loss / (1 - ema_beta ** (step + 1))
        pct = 100 * step / num_iterations
        tok_per_sec = int(total_batch_size / dt)
        flops_per_sec = flops_per_token * total_batch_size / dt
        mfu = 100 * flops_per_sec / (peak_flops * world_size) if peak_flops else None
        if step > 10:
            total_training_time += dt  # the first steps (compilation warm-up) do not count
        eta = ""
        if step - 10 > 0:
            eta = f" | eta: {(num_iterations - step) * total_training_time / (step - 10) / 60:.1f}m"
        epoch = loader_state.get("epoch", "?") if isinstance(loader_state, dict) else "?"
        mfu_text = f"{mfu:.2f}" if mfu is not None else "n/a"
        print0(f"step {step:05d}/{num_iterations:05d} ({pct:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu_text} | epoch: {epoch} | "
               f"total time: {total_training_time / 60:.2f}m{eta}")
        record("train", {"step": step, "loss": debiased, "flops": flops_so_far})
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time,
                           "train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu, "train/epoch": epoch})

        # Python's cyclic GC stalls for ~0.5 s at a time: collect once, freeze survivors, then collect rarely
        step += 1
        if first_step_of_run:
            gc.collect()
            gc.freeze()
            gc.disable()
            first_step_of_run = False
        elif step % 5000 == 0:
            gc.collect()

    # --- wrap up ---------------------------------------------------------------------------------------------
    gc.enable()
    gc.unfreeze()
    for s, h in previous_handlers.items():
        signal.signal(s, h)
    if stopped_by_signal:
        wandb_run.finish()
        compute_cleanup()
        return 0

    if device_type == "cuda":
        peak_memory_mib = torch.cuda.max_memory_allocated() / 1024 / 1024
        print0(f"Peak memory usage: {peak_memory_mib:.2f}MiB")
    else:
        peak_memory_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        print0(f"Peak memory usage: {peak_memory_mib:.2f}MiB (process max RSS)")
    print0(f"Total training time: {total_training_time / 60:.2f}m")
    if min_val_bpb != float("inf"):
        print0(f"Minimum validation bpb: {min_val_bpb:.6f}")

    total_flops = flops_per_token * total_tokens
    core_score = core_results["core_metric"] if core_results else None
    summary = {
        "model_tag": model_tag,
        "depth": args.depth,
        "model_dim": model_config.n_embd,
        "num_heads": model_config.n_head,
        "max_seq_len": args.max_seq_len,
        "vocab_size": vocab_size,
        "num_params": param_counts["total"],
        "num_scaling_params": num_scaling_params,
        "param_counts": param_counts,
        "flops_per_token": flops_per_token,
        "num_iterations": num_iterations,
        "total_batch_size": total_batch_size,
        "tokens_trained": total_tokens,
        "param_data_ratio": total_tokens / num_scaling_params,
        "total_training_flops": total_flops,
        "val_bpb": val_bpb,
        "min_val_bpb": None if min_val_bpb == float("inf") else min_val_bpb,
        "core_score": core_score,
        "core_partial": bool(core_results.get("partial")) if core_results else None,
        "train_time_sec": total_training_time,
        "mfu": mfu,
        "peak_memory_mib": peak_memory_mib,
        "world_size": world_size,
        "device_type": device_type,
        "fp8": args.fp8,
        "checkpoint_dir": checkpoint_dir,
    }
    if master:
        os.makedirs(checkpoint_dir, exist_ok=True)
        summary_path = os.path.join(checkpoint_dir, "summary.json")
        tmp = summary_path + f".tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, summary_path)
        print0(f"Wrote run summary to {summary_path}")
        try:
            from nanochat.report import get_report
            report = get_report()
            report.log(section="Base model training", data=[
                user_config,
                {
                    "Number of parameters": param_counts["total"],
                    "Number of scaling parameters": num_scaling_params,
                    "Number of FLOPs per token": f"{flops_per_token:e}",
                    "Calculated number of iterations": num_iterations,
                    "Number of training tokens": total_tokens,
                    "Tokens : Scaling params ratio": total_tokens / num_scaling_params,
                    "Total batch size": total_batch_size,
                    "DDP world size": world_size,
                    "warmup_iters": warmup_iters,
                    "warmdown_ratio": args.warmdown_ratio,
                    "final_lr_frac": args.final_lr_frac,
                },
                {
                    "Minimum validation bpb": summary["min_val_bpb"],
                    "Final validation bpb": val_bpb,
                    "CORE metric estimate": core_score,
                    "MFU %": f"{mfu:.2f}%" if mfu is not None else "n/a",
                    "Total training flops": f"{total_flops:e}",
                    "Total training time": f"{total_training_time / 60:.2f}m",
                    "Peak memory usage": f"{peak_memory_mib:.2f}MiB",
                },
            ])
            report.log_history("base-training", history)
        except ImportError as e:
            print0(f"Report not written: nanochat.report is not available ({e})")
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
