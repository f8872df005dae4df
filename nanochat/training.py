"""
The vocabulary the three training scripts (base_train, chat_sft, chat_rl) share, and nothing else uses: the runtime
policies a training process sets at its start (allocator, garbage collector), the tail of an optimizer step, the
cadence of periodic work, decisions every rank takes together, and the wandb run. A name here means the same thing
in every script that calls it.
"""

import gc
import atexit
import ctypes
import contextlib

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE, NoOp, is_ddp_initialized, print0

# -----------------------------------------------------------------------------
# Runtime policies: visible calls at the start of each training script, never a side effect of an import

def keep_freed_memory(device_type):
    """On CPU: glibc maps every block over 32 MB afresh and unmaps it when freed, so the large buffers of each step
    (the tokens x vocab logits) page-fault in again, a third of a small model's step. Serve every block from the
    heap and keep freed memory there for reuse: RSS stays near its peak instead of shrinking. Elsewhere (the step's
    buffers live on the device) and without glibc: no-op."""
    if device_type == "cpu":
        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt(-4, 0)  # M_MMAP_MAX (glibc's malloc.h): no block gets its own mapping
            mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: freed memory is never handed back


# The one garbage-collection policy of a training process. Python's cyclic collector walks every tracked object on
# a full collection; what a training run holds (torch alone is ~170k objects) lives as long as the process, so every
# walk (~0.1 s) is wasted and an unmanaged loop stalls ~0.5 s at a time. So: freeze_gc() at the start keeps what is
# alive out of every walk, manage_gc() after each step also freezes what the first step built (compiled graphs,
# optimizer state) and turns automatic collection off, with a collection every 5000 steps; release_gc() at the end
# hands a normal collector back (to an in-process caller such as a test).

def freeze_gc():
    gc.freeze()
    atexit.register(gc.freeze)  # and skip the interpreter's full collection at exit (~0.6 s a process)


def manage_gc(first_step_of_run, step):
    if first_step_of_run:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 5000 == 0:
        gc.collect()


def release_gc():
    gc.enable()
    gc.unfreeze()

# -----------------------------------------------------------------------------
# The tail of one optimizer step

def make_grad_scaler(device_type):
    """fp16 activations need loss scaling; bf16 and fp32 do not (None)."""
    return torch.amp.GradScaler(device_type) if COMPUTE_DTYPE == torch.float16 else None


def scale_initial_lrs(optimizer, factor):
    """Every group starts at factor x its LR; finish_step later scales from this initial LR."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        group["initial_lr"] = group["lr"]


def finish_step(optimizer, scaler, lr_multiplier, momentum=None, weight_decay=None, update=True):
    """The tail of every training step: LR of every group = its initial LR x lr_multiplier (Muon groups also get
    momentum / weight decay when given), the update unless update=False (through the GradScaler under fp16, where
    every rank skips an overflowing step together), then the gradients are dropped."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if group.get("kind") == "muon" and value is not None:
                group[key] = value
    if update and scaler is None:
        optimizer.step()
    elif update:
        scaler.unscale_(optimizer)
        if is_ddp_initialized():
            for found_inf in scaler._found_inf_per_device(optimizer).values():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)

# -----------------------------------------------------------------------------
# Decisions of the loop

def is_due(step, every, last_step, at_step_zero=False):
    """Periodic work of a training loop (evaluations, samples, checkpoints) runs every `every` steps and at the last
    step; step 0 only when at_step_zero; every <= 0 turns it off."""
    return every > 0 and (last_step or (step % every == 0 and (step > 0 or at_step_zero)))


def any_rank(flag, device):
    """True if flag is true on any rank, so every rank takes the same decision."""
    if not is_ddp_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def init_wandb(project, run, config, master):
    """A wandb run on rank 0 when --run names one, else a NoOp; a wandb that cannot start only warns."""
    if run == "dummy" or not master:
        return NoOp()
    try:
        import wandb  # optional dependency
        return wandb.init(project=project, name=run, config=config)
    except Exception as e:
        print0(f"WARNING: wandb logging disabled, could not start a wandb run ({type(e).__name__}: {e})")
        return NoOp()
