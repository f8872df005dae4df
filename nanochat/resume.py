"""
Preemption and resume: what a training run writes at a step boundary so that a later launch continues it, and how
that launch comes back. One vocabulary for the three training scripts (base_train, chat_sft, chat_rl):

    --save-every N        a checkpoint every N steps (and always at the end)
    --keep-last K         keep only the K newest checkpoints
    --resume-from-step S  continue the run from its checkpoint at step S (launch it with the same flags)
    SIGTERM / SIGINT      save at the next step boundary, print how to resume, exit 0
    non-finite state      the run stops with one error line naming the last good checkpoint; nothing non-finite is saved

A resume checkpoint is a checkpoint_manager checkpoint whose meta also records the stage, the format version, the
world size, the flags (user_config), what the loop accumulated (loop_state, per script, with every rank's RNG states)
and every rank's data-loader state. On the same number of processes a resumed run is bit-identical to the
uninterrupted one. On another number, the optimizer state is resharded on load (it is saved in a layout that does not
depend on the world size) and each stage's loader redistributes the data the old ranks had not used; the total batch
size stays what the run was planned with (gradient accumulation absorbs the change).
"""

import base64
import signal

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat.common import NanochatError, print0
from nanochat.training import any_rank

FORMAT_VERSION = 2  # 1: meta without stage/format_version (base_train only, same world size only)

# flags that may differ between a run and its resumption without changing what it computes
RESUME_NEUTRAL_FLAGS = ("resume_from_step", "run", "keep_last", "save_every")


class TrainingDiverged(NanochatError):
    """The loss, the weights or the optimizer state became non-finite: the run stops and saves nothing."""


def diverged(what, last_good_step, checkpoint_dir):
    """The TrainingDiverged of a run, naming the checkpoint to go back to."""
    if last_good_step is not None:
        last_good = (f"the last good checkpoint is step {last_good_step} in {checkpoint_dir} "
                     f"(resume from it with lower learning rates)")
    else:
        last_good = "no checkpoint of this run was saved (lower the learning rates)"
    return TrainingDiverged(f"{what}; stopping without saving it; {last_good}")

# -----------------------------------------------------------------------------
# Resuming

def check_resume(stage, checkpoint_dir, step, world_size, user_config):
    """The meta of the checkpoint a run resumes from, after checking it is complete, readable and of this stage.
    Prints the one resume line (old and new world size) and warns about flags that differ from the saved run's."""
    if not ckpt.is_complete(checkpoint_dir, step):
        available = ckpt.complete_steps(checkpoint_dir)
        raise NanochatError(f"--resume-from-step={step}: no complete checkpoint for step {step} in {checkpoint_dir} "
                            f"(complete steps there: {available if available else 'none'})")
    try:
        meta = ckpt.load_meta(checkpoint_dir, step)
    except ckpt.CheckpointError as e:
        raise NanochatError(f"--resume-from-step={step}: {e}") from None
    # first: a final model of any stage written before stages were recorded has no loop state (and no stage)
    if "loop_state" not in meta:
        raise NanochatError(f"--resume-from-step={step}: the checkpoint in {checkpoint_dir} is a final model without "
                            f"the state of its training loop (written before {stage} runs could resume); it loads "
                            f"for inference and as a starting point, not for resuming")
    saved_stage, version = meta.get("stage", "base"), meta.get("format_version", 1)
    if saved_stage != stage or version > FORMAT_VERSION:
        raise NanochatError(f"--resume-from-step={step}: {checkpoint_dir} holds a {saved_stage} checkpoint of format "
                            f"{version}; this is a {stage} run of format {FORMAT_VERSION}")
    saved_world = meta.get("world_size", 1)
    if saved_world != world_size and version < 2:
        raise NanochatError(f"--resume-from-step={step}: the checkpoint in {checkpoint_dir} was saved by {saved_world} "
                            f"process(es) in the old per-rank layout; resume it with {saved_world} processes")
    change = "" if saved_world == world_size else "; the optimizer state and the data stream are resharded"
    print0(f"Resuming from step {step} of {checkpoint_dir}: saved by {saved_world} process(es), now {world_size}{change}")
    # other flags may differ on purpose (a longer horizon, a new wandb run name), so they only warn
    differing = [k for k, v in meta.get("user_config", {}).items()
                 if k not in RESUME_NEUTRAL_FLAGS and user_config.get(k) != v]
    if differing:
        print0(f"WARNING: flags differ from the checkpoint's run ({', '.join('--' + k.replace('_', '-') for k in differing)}); "
               "the schedules follow the current flags, so the resumed run will not match an uninterrupted one")
    return meta


def restore_rng_states(meta, rank, device_type):
    """Set this rank's RNGs to the saved ones (a rank the old run did not have takes those of rank % old world size):
    building the model drew from them, and from here on every draw is the one the uninterrupted run made."""
    states = meta["loop_state"]["rng_states"]
    rng = states[rank % len(states)]
    torch.set_rng_state(decode_rng_state(rng["cpu"]))
    if device_type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(decode_rng_state(rng["cuda"]))

# -----------------------------------------------------------------------------
# Saving

def save_resumable(checkpoint_dir, stage, step, orig_model, optimizer, meta, loop_state, loader_state, last_good_step,
                   keep_last, rank, world_size, device):
    """Every rank calls this at a step boundary: checks the state is finite (all ranks together), gathers every
    rank's loader state and RNG states into rank 0's meta, saves (atomic, marker last) and prunes to keep_last.
    meta: what the script records (model_config, flags, ...); loop_state: what its loop accumulated."""
    # a diverged state can have finite losses for a while (the update that broke it comes after the loss): check the
    # state itself, on every rank (each holds its own optimizer shard), before writing anything; a rank that skipped
    # the check would wait forever in the save's barrier
    if any_rank(not ckpt.is_finite_state([orig_model.state_dict(), optimizer.state_dict()]), device):
        raise diverged(f"the weights or optimizer state became non-finite at step {step}", last_good_step, checkpoint_dir)
    loader_states = gather_objects(loader_state, world_size)
    rng_states = gather_objects({"cpu": encode_rng_state(torch.get_rng_state()), "cuda": encode_rng_state(
        torch.cuda.get_rng_state()) if device.type == "cuda" else None}, world_size)
    meta = {**meta, "step": step, "stage": stage, "format_version": FORMAT_VERSION, "world_size": world_size,
            "dataloader_state_dict": loader_states[0], "dataloader_state_dicts": loader_states,
            "loop_state": {**loop_state, "rng_states": rng_states}}
    ckpt.save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer.consolidated_state_dict(), meta,
                         rank=rank, sync_ranks=True)  # a failed save (full disk) is a CheckpointSaveError: one line, exit 1
    # pruning runs after the new checkpoint is complete, so there is always at least one to resume from
    if rank == 0 and keep_last > 0:
        ckpt.prune_checkpoints(checkpoint_dir, keep_last)


def gather_objects(obj, world_size):
    """Every rank's obj, in rank order (all ranks take part)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# RNG states are byte tensors; base64 keeps them inside the JSON meta, one per rank
def encode_rng_state(state):
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng_state(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

# -----------------------------------------------------------------------------
# Stopping on a signal

def catch_stop_signals(rank):
    """From now on SIGTERM/SIGINT (a preempted job, Ctrl-C) are only recorded in the returned list: the loop saves at
    the next step boundary and leaves (stopping mid-step would leave gradients and loader state out of step).
    Returns (signals, restore): restore() puts the previous handlers back (call it in a finally)."""
    signals = []

    def on_signal(signum, frame):
        if not signals:
            print(f"[rank {rank}] received {signal.Signals(signum).name}: saving a checkpoint at the next step "
                  "boundary", flush=True)
        signals.append(signum)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)
    return signals, restore


def stop_requested(signals, device):
    """Whether any rank got a stop signal: every rank acts on it at the same boundary, or a collective would hang."""
    return any_rank(bool(signals), device)


def print_stopped(step):
    """The line a run stopped by a signal ends with (its checkpoint of this step is on disk when step > 0)."""
    if step > 0:
        print0(f"Stopped by signal at step {step}; resume with --resume-from-step={step} (and the same flags)")
    else:
        print0("Stopped by signal at step 0; nothing trained yet, no checkpoint written")
