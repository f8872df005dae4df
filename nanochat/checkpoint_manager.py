"""
Saving and loading checkpoints.

Layout under the base dir: base_checkpoints/<tag>/, chatsft_checkpoints/<tag>/, chatrl_checkpoints/<tag>/
(mid_checkpoints/ is still understood for old runs). Files for step 123:
    model_000123.pt            model state dict (rank 0)
    meta_000123.json           metadata: config, user flags, loop/dataloader state (rank 0)
    optim_000123_rank<r>.pt    optimizer state of rank r (sharded: one file per rank)
    complete_000123.json       completion marker, written LAST (rank 0)
Every file is written atomically (temp file, fsync, rename), and a checkpoint only counts once its completion marker
exists, so a run killed in the middle of saving never leaves a half-written checkpoint that "latest step" would pick.
"""

import os
import re
import glob
import json
import logging
import dataclasses

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, get_base_dir

logger = logging.getLogger(__name__)

CHECKPOINT_SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def log0(message):
    if int(os.environ.get("RANK", 0)) == 0:
        logger.info(message)


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")

def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")

def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")

def marker_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"complete_{step:06d}.json")

def is_complete(checkpoint_dir, step):
    return os.path.exists(marker_path(checkpoint_dir, step)) and os.path.exists(model_path(checkpoint_dir, step))

# -----------------------------------------------------------------------------
# Atomic writes

def _atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))

def _atomic_json_save(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False), mode="w")

# -----------------------------------------------------------------------------
# Save / load

def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, sync_ranks=False):
    """
    Rank 0 writes model + meta; any rank given optimizer_data writes its own shard; rank 0 writes the completion
    marker last. With sync_ranks=True (every rank calls this, e.g. base_train under torchrun) rank 0 waits at a
    barrier for all shards before writing the marker. Leave it False when only rank 0 calls save_checkpoint.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    world_size = dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1
    if rank == 0 and os.path.exists(marker_path(checkpoint_dir, step)):
        os.remove(marker_path(checkpoint_dir, step))  # overwriting a step: it is incomplete until we finish
    if sync_ranks and world_size > 1:
        dist.barrier()  # nobody writes a shard before the old marker is gone
    if rank == 0:
        _atomic_torch_save(model_data, model_path(checkpoint_dir, step))
        log0(f"Saved model parameters to: {model_path(checkpoint_dir, step)}")
        _atomic_json_save(meta_data, meta_path(checkpoint_dir, step))
        log0(f"Saved metadata to: {meta_path(checkpoint_dir, step)}")
    if optimizer_data is not None:
        _atomic_torch_save(optimizer_data, optim_path(checkpoint_dir, step, rank))
        logger.info(f"Saved optimizer state to: {optim_path(checkpoint_dir, step, rank)}")
    if sync_ranks and world_size > 1:
        dist.barrier()  # every shard is on disk
    if rank == 0:
        marker = {"step": step, "world_size": world_size, "has_optimizer": optimizer_data is not None}
        _atomic_json_save(marker, marker_path(checkpoint_dir, step))


def load_meta(checkpoint_dir, step):
    with open(meta_path(checkpoint_dir, step), "r", encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_data, optimizer_data or None, meta). Raises FileNotFoundError with a clear message."""
    if not is_complete(checkpoint_dir, step):
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir} "
                                f"(expected {os.path.basename(model_path(checkpoint_dir, step))} and its completion marker)")
    model_data = torch.load(model_path(checkpoint_dir, step), map_location=device, weights_only=True)
    optimizer_data = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(path):
            raise FileNotFoundError(f"optimizer shard {path} is missing (the checkpoint was saved with a different "
                                    f"number of processes, or without optimizer state)")
        optimizer_data = torch.load(path, map_location=device, weights_only=True)
    meta = load_meta(checkpoint_dir, step)
    return model_data, optimizer_data, meta


def find_last_step(checkpoint_dir):
    """Largest step with a complete checkpoint (model file + completion marker) in checkpoint_dir."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        match = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if match and is_complete(checkpoint_dir, int(match.group(1))):
            steps.append(int(match.group(1)))
    if not steps:
        raise FileNotFoundError(f"no complete checkpoints found in {checkpoint_dir}")
    return max(steps)


def _has_complete_checkpoint(directory):
    try:
        find_last_step(directory)
        return True
    except FileNotFoundError:
        return False


def find_largest_model(checkpoints_dir):
    """Tag of the deepest model (names d<depth>...) with a complete checkpoint; else the most recently modified."""
    if not os.path.isdir(checkpoints_dir):
        raise FileNotFoundError(f"no checkpoints directory {checkpoints_dir} (train a model first)")
    tags = [d for d in os.listdir(checkpoints_dir)
            if os.path.isdir(os.path.join(checkpoints_dir, d)) and _has_complete_checkpoint(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise FileNotFoundError(f"no complete checkpoints found under {checkpoints_dir} (train a model first)")
    depth_tags = []
    for tag in tags:
        match = re.match(r"d(\d+)", tag)
        if match:
            depth_tags.append((int(match.group(1)), tag))
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))

# -----------------------------------------------------------------------------
# Building models from checkpoints

# Parameters added after older checkpoints were written, with the value that makes them a no-op
_MISSING_PARAM_FIXUPS = {
    "resid_lambdas": torch.ones,
    "x0_lambdas": torch.zeros,
    "smear_lambda": torch.zeros,
    "smear_gate.weight": torch.zeros,
    "backout_lambda": torch.zeros,
}


def build_model(checkpoint_dir, step, device, phase):
    """Rebuild a GPT from a checkpoint. phase is 'train' or 'eval'. Returns (model, tokenizer, meta)."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer
    assert phase in ("train", "eval"), f"invalid phase {phase!r}"
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    if device.type in ("cpu", "mps"):
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    model_config = dict(meta["model_config"])
    model_config.setdefault("window_pattern", "L")  # checkpoints from before sliding windows
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in model_config.items() if k in known})
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also computes the non-persistent buffers (RoPE)
    expected = model.state_dict()
    for key, make in _MISSING_PARAM_FIXUPS.items():
        if key in expected and key not in model_data:
            model_data[key] = make(expected[key].shape, dtype=expected[key].dtype, device=device)
    model.load_state_dict(model_data, strict=True, assign=True)
    model.eval() if phase == "eval" else model.train()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise SystemExit(f"error: tokenizer vocab size {tokenizer.get_vocab_size()} does not match the checkpoint's "
                         f"{config.vocab_size} ({checkpoint_dir}); retrain the model or restore the tokenizer it used")
    return model, tokenizer, meta


def checkpoints_dir_for(source):
    if source not in CHECKPOINT_SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r} (expected one of {', '.join(CHECKPOINT_SOURCES)})")
    return os.path.join(get_base_dir(), CHECKPOINT_SOURCES[source])


def _resolve(checkpoints_dir, model_tag=None, step=None):
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    return checkpoint_dir, step


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    checkpoint_dir, step = _resolve(checkpoints_dir, model_tag, step)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_model(source, *args, **kwargs):
    """source in {'base', 'sft', 'rl'} (and legacy 'mid') -> (model, tokenizer, meta)."""
    return load_model_from_dir(checkpoints_dir_for(source), *args, **kwargs)


def load_optimizer_state(source, device, rank, model_tag=None, step=None):
    """The optimizer state dict of `rank` for a checkpoint, or None when that checkpoint has no optimizer shard."""
    checkpoint_dir, step = _resolve(checkpoints_dir_for(source), model_tag, step)
    path = optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(path):
        log0(f"No optimizer state at {path}")
        return None
    log0(f"Loading optimizer state from {path}")
    return torch.load(path, map_location=device, weights_only=True)

# -----------------------------------------------------------------------------
# Loading a checkpoint with a clear message when it is not there (shared with chat_sft and chat_rl)

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}
SOURCE_PRODUCERS = {"base": "python -m scripts.base_train", "mid": "(no script produces mid checkpoints any more)",
                    "sft": "python -m scripts.chat_sft", "rl": "python -m scripts.chat_rl"}


def check_checkpoint_exists(source, model_tag=None, step=None):
    """Exit with one clear line if the requested checkpoint is not on disk (before any heavy work)."""
    if source not in SOURCE_DIRS:
        raise SystemExit(f"error: unknown checkpoint source {source!r}; choose from {', '.join(SOURCE_DIRS)}")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    hint = f"train one first with `{SOURCE_PRODUCERS[source]}` (NANOCHAT_BASE_DIR={get_base_dir()})"
    if not os.path.isdir(checkpoints_dir) or not any(
            os.path.isdir(os.path.join(checkpoints_dir, d)) for d in os.listdir(checkpoints_dir)):
        raise SystemExit(f"error: no {source} checkpoint found: {checkpoints_dir} is missing or empty; {hint}")
    if model_tag is not None:
        tag_dir = os.path.join(checkpoints_dir, model_tag)
        if not os.path.isdir(tag_dir):
            tags = sorted(d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d)))
            raise SystemExit(f"error: model tag {model_tag!r} not found in {checkpoints_dir} "
                             f"(available: {', '.join(tags)}); pass one of those with --model-tag")
        if step is not None:
            model_path = os.path.join(tag_dir, f"model_{int(step):06d}.pt")
            if not os.path.exists(model_path):
                raise SystemExit(f"error: no checkpoint at step {step}: {model_path} does not exist; "
                                 f"pick an existing step or leave the step out to use the latest")


def load_model_or_exit(source, device, phase, model_tag=None, step=None):
    """load_model with the project's bad-input behaviour: a missing checkpoint is one clear line and exit 1."""
    from nanochat.checkpoint_manager import load_model
    check_checkpoint_exists(source, model_tag, step)
    try:
        return load_model(source, device, phase=phase, model_tag=model_tag, step=step)
    except (FileNotFoundError, ValueError, AssertionError) as e:
        raise SystemExit(f"error: could not load the {source} checkpoint "
                         f"(tag={model_tag or 'latest'}, step={step if step is not None else 'latest'}): {e}")
