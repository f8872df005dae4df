"""
Saving and loading checkpoints.

Layout under the base dir: base_checkpoints/<tag>/, chatsft_checkpoints/<tag>/, chatrl_checkpoints/<tag>/.
Files for step 123:
    model_000123.pt            model state dict (rank 0)
    meta_000123.json           metadata: config, user flags, loop/dataloader state (rank 0)
    optim_000123.pt            optimizer state as one process would hold it, for any world size (rank 0)
    complete_000123.json       completion marker, written LAST (rank 0)
The optimizer's state is sharded over the ranks while training; MuonAdamW.consolidated_state_dict gathers it onto rank 0
(a collective every rank calls), and a run of any number of processes takes its part back with load_resharded. One
file in the one-process layout rather than torch.distributed.checkpoint's per-rank files: see nanochat/optim.py.
Checkpoints written before held optim_000123_rank<r>.pt, one file per rank: they still load, on any number of
processes (the loader joins the per-rank files).
Every file is written atomically (temp file, fsync, rename), and a checkpoint only counts once its completion marker
exists, so a run killed in the middle of saving never leaves a half-written checkpoint that "latest step" would pick.
What a killed save or prune leaves behind (temp files, files of steps without a marker) is removed by the next save.
A save that fails (full disk) removes its partial files and raises CheckpointSaveError (one line).
A file that is there but unusable (truncated, empty, not ours, NaN/inf values) raises CheckpointError naming the file
and the previous complete step. Both errors are NanochatErrors: an entry point's cli.run prints them as one line.

Where checkpoints live is decided here for writers and readers alike (checkpoint_dir_for). Loading a model is two steps:
resolve_checkpoint (which tag and step, the one check that they exist) and build_model (read the files, rebuild the GPT).
"""

import os
import re
import glob
import json
import pickle
import logging
import warnings
import contextlib
import dataclasses

import torch

from nanochat.common import NanochatError, atomic_write, get_base_dir, is_ddp_initialized
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_SOURCES = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
SOURCE_PRODUCERS = {"base": "scripts.base_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}


class CheckpointError(NanochatError, FileNotFoundError):
    """No usable checkpoint: missing, incomplete, truncated, foreign or non-finite. A FileNotFoundError, so every
    caller that handles a missing checkpoint handles an unreadable one the same way."""


class CheckpointSaveError(NanochatError, RuntimeError):
    """A save failed (e.g. the disk is full); its partial files are gone and the message is one line."""


def log0(message):
    if int(os.environ.get("RANK", 0)) == 0:
        logger.info(message)


def check_model_tag(tag):
    """Tags are plain directory names: a path (../x, a/b) would put checkpoints outside their family's folder."""
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise NanochatError(f"--model-tag={tag!r} must be a plain name (letters, digits, '.', '_', '-'), not a path")
    return tag


def stage_dir(source):
    """<base dir>/<stage>_checkpoints: every tag of one stage (source 'base', 'sft' or 'rl')."""
    if source not in CHECKPOINT_SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r} (expected one of {', '.join(CHECKPOINT_SOURCES)})")
    return os.path.join(get_base_dir(), CHECKPOINT_SOURCES[source])


def checkpoint_dir_for(source, model_tag):
    """<base dir>/<stage>_checkpoints/<tag>: where a training script saves and where loading looks."""
    return os.path.join(stage_dir(source), check_model_tag(model_tag))


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")

def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")

def optim_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}.pt")

def rank_optim_path(checkpoint_dir, step, rank):
    """Where checkpoints written before the consolidated layout kept rank `rank`'s optimizer shard."""
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")

def marker_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"complete_{step:06d}.json")

def is_complete(checkpoint_dir, step):
    return os.path.exists(marker_path(checkpoint_dir, step)) and os.path.exists(model_path(checkpoint_dir, step))


def complete_steps(checkpoint_dir):
    """Sorted steps that have a complete checkpoint (model file + completion marker) in checkpoint_dir."""
    names = (os.path.basename(path) for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")))
    steps = [int(m.group(1)) for name in names if (m := re.fullmatch(r"model_(\d+)\.pt", name))]
    return sorted(step for step in steps if is_complete(checkpoint_dir, step))


def find_last_step(checkpoint_dir):
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoints found in {checkpoint_dir}")
    return steps[-1]


def previous_step_hint(checkpoint_dir, step):
    earlier = [s for s in complete_steps(checkpoint_dir) if s < step]
    return f"the previous complete step is {earlier[-1]}" if earlier else "there is no earlier complete step"

# -----------------------------------------------------------------------------
# Save

def _atomic_json_save(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False), mode="w")


def is_finite_state(obj):
    """True when every floating-point tensor in a (nested) state dict is finite: a diverged run must never be saved."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point() or obj.numel() == 0:
            return True
        return bool(torch.stack(torch.aminmax(obj)).isfinite().all())  # one pass: a nan or inf shows in min or max
    if isinstance(obj, dict):
        return all(is_finite_state(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(is_finite_state(v) for v in obj)
    return True


def process_start_time(pid):
    """When process pid started, in seconds since the epoch (rounded down), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the (command name)
        with open("/proc/stat") as f:
            boot_time = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot_time + ticks / os.sysconf("SC_CLK_TCK")


def is_writer_alive(pid, tmp_path):
    """Whether process pid may still be writing tmp_path: it exists and started before the file's last write
    (a younger process only reuses the pid of a killed writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    started = process_start_time(pid)
    return started is None or started <= os.path.getmtime(tmp_path)


def remove_leftovers(checkpoint_dir):
    """Delete what killed saves and prunes leave behind: *.tmp.<pid> files whose writer is gone, and the files of
    steps without a completion marker (they never count, and pruning removes the marker first)."""
    for path in glob.glob(os.path.join(checkpoint_dir, "*.tmp.*")):
        pid = path.rsplit(".", 1)[-1]
        with contextlib.suppress(FileNotFoundError):  # a live writer may rename it meanwhile
            if pid.isdigit() and not is_writer_alive(int(pid), path):
                os.remove(path)
    for name in os.listdir(checkpoint_dir):
        match = re.fullmatch(r"(?:model|meta|optim)_(\d+)(?:_rank\d+)?\.(?:pt|json)", name)
        if match and not os.path.exists(marker_path(checkpoint_dir, int(match.group(1)))):
            os.remove(os.path.join(checkpoint_dir, name))


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def save_failure_reason(error):
    """The OSError behind a failed write (torch's zip writer raises a RuntimeError over it), else the first line."""
    cause = error
    while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
        cause = cause.__context__
    return cause.strerror if cause is not None else first_line(error)


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, sync_ranks=False):
    """
    Rank 0 writes model + meta + optimizer_data (optimizer.consolidated_state_dict(), which every rank computes
    together and only rank 0 gets; None for no optimizer state), then the completion marker last. With
    sync_ranks=True (every rank calls this, e.g. base_train under torchrun) every rank returns once the checkpoint is
    complete. Leave it False when only rank 0 calls save_checkpoint.
    Non-finite weights or optimizer state raise ValueError before anything is written (callers that run on
    several ranks check first, together, so that no rank is left waiting at a barrier).
    """
    if not (is_finite_state(model_data) and is_finite_state(optimizer_data)):
        raise ValueError(f"refusing to save step {step} to {checkpoint_dir}: weights or optimizer state are non-finite")
    os.makedirs(checkpoint_dir, exist_ok=True)
    world_size = torch.distributed.get_world_size() if is_ddp_initialized() else 1
    if rank == 0:
        if os.path.exists(marker_path(checkpoint_dir, step)):
            os.remove(marker_path(checkpoint_dir, step))  # overwriting a step: it is incomplete until we finish
        remove_leftovers(checkpoint_dir)
    written = [model_path(checkpoint_dir, step), meta_path(checkpoint_dir, step)] if rank == 0 else []
    written += [optim_path(checkpoint_dir, step)] if rank == 0 and optimizer_data is not None else []
    try:
        if rank == 0:
            atomic_write(model_path(checkpoint_dir, step), lambda f: torch.save(model_data, f))
            log0(f"Saved model parameters to: {model_path(checkpoint_dir, step)}")
            _atomic_json_save(meta_data, meta_path(checkpoint_dir, step))
            log0(f"Saved metadata to: {meta_path(checkpoint_dir, step)}")
            if optimizer_data is not None:
                atomic_write(optim_path(checkpoint_dir, step), lambda f: torch.save(optimizer_data, f))
                log0(f"Saved optimizer state to: {optim_path(checkpoint_dir, step)}")
            marker = {"step": step, "world_size": world_size, "has_optimizer": optimizer_data is not None}
            _atomic_json_save(marker, marker_path(checkpoint_dir, step))
    except (OSError, RuntimeError) as e:  # a full disk: an OSError, or torch's zip writer's RuntimeError over it
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise CheckpointSaveError(f"could not save the checkpoint of step {step} in {checkpoint_dir} "
                                  f"({save_failure_reason(e)}); its partial files were removed; "
                                  f"{previous_step_hint(checkpoint_dir, step)}") from None
    if sync_ranks and world_size > 1:
        torch.distributed.barrier()  # nobody goes on (prunes, exits) before the checkpoint is complete


def prune_checkpoints(checkpoint_dir, keep):
    """Keep only the `keep` most recent complete checkpoints (marker removed first, so a kill mid-way is safe)."""
    for step in complete_steps(checkpoint_dir)[:-keep]:
        os.remove(marker_path(checkpoint_dir, step))
        for path in [model_path(checkpoint_dir, step), meta_path(checkpoint_dir, step),
                     optim_path(checkpoint_dir, step), *glob.glob(rank_optim_path(checkpoint_dir, step, "*"))]:
            if os.path.exists(path):
                os.remove(path)
        log0(f"Removed checkpoint {step} from {checkpoint_dir} (keeping the last {keep})")

# -----------------------------------------------------------------------------
# Load

def _read(path, checkpoint_dir, step, read_fn):
    """read_fn(path), or CheckpointError naming the file and the previous complete step when it is unusable."""
    try:
        return read_fn(path)
    except (pickle.UnpicklingError, KeyError):  # torch's text advises weights_only=False: unsafe on a tampered file
        reason = "not a file of tensors: corrupt or tampered"
    except (OSError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, ImportError) as e:
        reason = first_line(e)
    raise CheckpointError(f"{path} is unreadable ({reason}); {previous_step_hint(checkpoint_dir, step)}")


def _load_tensors(path, checkpoint_dir, step, device, mmap=False):
    """A state dict saved by torch.save (tensors only), refused when it holds NaN or inf (a diverged run)."""
    def load(path):
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before it refuses them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    data = _read(path, checkpoint_dir, step, load)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a state dict; {previous_step_hint(checkpoint_dir, step)}")
    if not is_finite_state(data):
        raise CheckpointError(f"{path} holds NaN or infinite values (saved from a diverged run?); "
                              f"{previous_step_hint(checkpoint_dir, step)}")
    return data


def _json_load(path):
    with open(path, "r", encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def load_meta(checkpoint_dir, step):
    return _read(meta_path(checkpoint_dir, step), checkpoint_dir, step, _json_load)


def _load_optimizer(checkpoint_dir, step):
    """The optimizer state of a complete checkpoint as MuonAdamW.load_resharded takes it: the per-rank state dicts
    of the run that saved it (one consolidated state dict; a checkpoint written before holds one file per rank).
    Memory-mapped on the CPU: a rank copies only the rows it keeps. None when the checkpoint has no optimizer state."""
    paths = [optim_path(checkpoint_dir, step)]
    if not os.path.exists(paths[0]):
        saved_world = _read(marker_path(checkpoint_dir, step), checkpoint_dir, step, _json_load).get("world_size", 1)
        paths = [rank_optim_path(checkpoint_dir, step, rank) for rank in range(saved_world)]
        if not os.path.exists(paths[0]):
            return None
    for path in paths:
        if not os.path.exists(path):
            raise CheckpointError(f"optimizer shard {path} is missing; {previous_step_hint(checkpoint_dir, step)}")
    return [_load_tensors(path, checkpoint_dir, step, "cpu", mmap=True) for path in paths]


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False):
    """Returns (model_data, optimizer_data or None, meta) of the complete checkpoint at step (a caller that did not
    get the step from resolve_checkpoint, e.g. a resume); optimizer_data is for optimizer.load_resharded, on any number
    of processes. Raises CheckpointError with a clear message."""
    if not is_complete(checkpoint_dir, step):
        raise CheckpointError(f"no complete checkpoint for step {step} in {checkpoint_dir} "
                              f"(expected {os.path.basename(model_path(checkpoint_dir, step))} and its completion marker)")
    model_data = _load_tensors(model_path(checkpoint_dir, step), checkpoint_dir, step, device)
    optimizer_data = _load_optimizer(checkpoint_dir, step) if load_optimizer else None
    if load_optimizer and optimizer_data is None:
        raise CheckpointError(f"the checkpoint of step {step} in {checkpoint_dir} has no optimizer state "
                              f"({os.path.basename(optim_path(checkpoint_dir, step))} is missing)")
    return model_data, optimizer_data, load_meta(checkpoint_dir, step)


def find_largest_model(checkpoints_dir):
    """Tag of the deepest model (names d<depth>...) with a complete checkpoint; else the most recently modified."""
    tags = [d for d in os.listdir(checkpoints_dir) if complete_steps(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise CheckpointError(f"no complete checkpoints found under {checkpoints_dir} (train a model first)")
    depth_tags = [(int(m.group(1)), tag) for tag in tags if (m := re.match(r"d(\d+)", tag))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))

# -----------------------------------------------------------------------------
# Loading a model: resolve which checkpoint (the one existence check), then build the GPT from its files

def resolve_checkpoint(source, model_tag=None, step=None):
    """(checkpoint_dir, step) of the checkpoint to load: the given tag, else the deepest model; the given step, else
    the latest complete one. The one existence check of a load (entry points call it first, to fail before any heavy
    work): a checkpoint that is not there is a CheckpointError saying what is there instead and how to get one."""
    check_model_tag(model_tag)
    stage = stage_dir(source)
    tags = sorted(d for d in os.listdir(stage) if os.path.isdir(os.path.join(stage, d))) if os.path.isdir(stage) else []
    if not tags:
        raise CheckpointError(f"no {source} checkpoint found: {stage} is missing or empty; train one first with "
                              f"`python -m {SOURCE_PRODUCERS[source]}` (NANOCHAT_BASE_DIR={get_base_dir()})")
    if model_tag is not None and model_tag not in tags:
        raise CheckpointError(f"model tag {model_tag!r} not found in {stage} (available: {', '.join(tags)}); "
                              f"pass one of those with --model-tag")
    if model_tag is None:
        model_tag = find_largest_model(stage)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    found = os.path.join(stage, model_tag)
    if step is not None and not is_complete(found, step):
        raise CheckpointError(f"no checkpoint at step {step}: {model_path(found, step)} does not exist or is "
                              f"incomplete; pick an existing step or leave the step out to use the latest")
    return found, find_last_step(found) if step is None else step


def build_model(checkpoint_dir, step, device, phase):
    """Rebuild the GPT of a resolved checkpoint. phase is 'train' or 'eval'. Returns (model, tokenizer, meta); a file
    that is unusable, or a tokenizer that does not fit the model, is a CheckpointError."""
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    device = torch.device(device)
    model_data = _load_tensors(model_path(checkpoint_dir, step), checkpoint_dir, step, device)
    meta = load_meta(checkpoint_dir, step)
    if device.type in ("cpu", "mps"):
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}  # saved from a compiled model
    try:
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()  # also computes the non-persistent buffers (RoPE)
        model.load_state_dict(model_data, strict=True, assign=True)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        reason = first_line(e)
        raise CheckpointError(f"{model_path(checkpoint_dir, step)} does not match its metadata {meta_path(checkpoint_dir, step)} "
                              f"({reason}); {previous_step_hint(checkpoint_dir, step)}") from None
    model.eval() if phase == "eval" else model.train()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.get_vocab_size()} does not match the checkpoint's "
                              f"{config.vocab_size} ({checkpoint_dir}); retrain the model or restore the tokenizer it used")
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None):
    """source in {'base', 'sft', 'rl'} -> (model, tokenizer, meta). Raises CheckpointError (a NanochatError)."""
    return build_model(*resolve_checkpoint(source, model_tag, step), device, phase)


def load_optimizer_state(source, model_tag=None, step=None):
    """A checkpoint's optimizer state for optimizer.load_resharded (any number of processes), or None without one."""
    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    optimizer_data = _load_optimizer(checkpoint_dir, step)
    log0(f"No optimizer state in {checkpoint_dir} at step {step}" if optimizer_data is None else
         f"Loaded the optimizer state of step {step} from {checkpoint_dir}")
    return optimizer_data
