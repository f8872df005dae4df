"""
Reinforcement learning on GSM8K: on-policy REINFORCE with a group-mean baseline ("GRPO" in quotes).

    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=my_rl

For every training problem we sample --num-samples completions from the current model, score each with the GSM8K
reward (1 if the final '#### <number>' is right, else 0), and push up the log-probability of every sampled token in
proportion to its sample's advantage = reward - mean reward of the group. No KL penalty, no reference model, no
PPO ratio/clipping (one gradient step per fresh batch), no division by the reward std; the loss is normalized by
the number of sampled tokens (DAPO style). Prompt tokens, forced calculator outputs and padding are never trained.
Every --eval-every steps pass@1..k is measured on GSM8K test; checkpoints go to <base>/chatrl_checkpoints/<tag>/.
A run resumes like pretraining (nanochat.resume): --resume-from-step continues it bit-identically on the same number
of processes, SIGTERM/SIGINT save a checkpoint at the next step boundary and exit 0, a non-finite loss stops it.
The prompts of a step and their rollout seeds are a function of the step alone, so nothing about the data has to be
saved, and a run resumed on another number of processes trains on the same prompts and rollouts.
"""

import os
# The allocator policy on CUDA: growable segments instead of fixed blocks, so that memory does not fragment as the
# sampled batches change length from step to step. Set before any import: the CUDA caching allocator reads it once,
# when CUDA starts, which can be as early as nanochat.common's import.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import time
import random
import argparse
import dataclasses

import torch
import torch.distributed as dist

from nanochat import resume
from nanochat.checkpoint_manager import resolve_checkpoint, build_model, checkpoint_dir_for, load_meta, load_optimizer_state
from nanochat.auto_batch import auto_device_batch_size, positive_int_or_auto
from nanochat.cli import run
from nanochat.common import (NanochatError, compute_init, compute_cleanup, print0, autodetect_device_type, int_in,
                             float_in, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, is_ddp_initialized)
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.training import (keep_freed_memory, freeze_gc, manage_gc, release_gc, make_grad_scaler, finish_step,
                               scale_initial_lrs, is_due, any_rank, init_wandb)
from tasks.gsm8k import GSM8K


def build_parser():
    parser = argparse.ArgumentParser(description="RL (REINFORCE with group-mean baseline) on GSM8K")
    # logging and runtime
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--seed", type=int_in("[0, 4294967295]"), default=42,
                        help="seed of the training prompts' order and of the rollouts (evaluation stays fixed)")
    # which model to start from: the SFT model by default (it already answers in the format the reward reads)
    parser.add_argument("--source", type=str, default="sft", choices=["sft", "base", "rl"],
                        help="checkpoint family to start from")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: largest d<N>)")
    parser.add_argument("--model-step", type=int_in("[0, inf)"), default=None, help="checkpoint step (default: last)")
    # horizon
    parser.add_argument("--num-epochs", type=int_in("[1, inf)"), default=1, help="passes over GSM8K train")
    parser.add_argument("--num-steps", type=int_in("[1, inf)", -1), default=-1,
                        help="override the number of optimizer steps (-1 = derived from --num-epochs)")
    # rollouts: one group of --num-samples completions per prompt; a step's groups are decoded together
    parser.add_argument("--device-batch-size", type=positive_int_or_auto, default=8,
                        help="rows per training forward, or auto: the largest that fits (sampling decodes a step's rows together)")
    parser.add_argument("--examples-per-step", type=int_in("[1, inf)"), default=16, help="prompts per optimizer step, all ranks")
    parser.add_argument("--num-samples", type=int_in("[1, inf)"), default=16, help="samples per prompt (the group for the baseline)")
    parser.add_argument("--max-new-tokens", type=int_in("[1, inf)"), default=256, help="max tokens per sampled completion")
    parser.add_argument("--temperature", type=float_in("[0, inf)"), default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int_in("[0, inf)"), default=50, help="top-k sampling (0 disables)")
    # optimization: small LRs (x --init-lr-frac) on a finished chat model, decayed linearly to zero over the run
    parser.add_argument("--embedding-lr", type=float_in("[0, inf)"), default=0.2, help="AdamW LR of the embeddings")
    parser.add_argument("--unembedding-lr", type=float_in("[0, inf)"), default=0.004, help="AdamW LR of lm_head")
    parser.add_argument("--matrix-lr", type=float_in("[0, inf)"), default=0.02, help="Muon LR of the matrices")
    parser.add_argument("--weight-decay", type=float_in("[0, inf)"), default=0.0, help="weight decay")
    parser.add_argument("--init-lr-frac", type=float_in("[0, inf)"), default=0.05, help="all LRs x this at the start")
    # evaluation and saving
    parser.add_argument("--eval-every", type=int_in("[1, inf)"), default=60, help="pass@k evaluation every N steps (and step 0)")
    parser.add_argument("--eval-examples", type=int_in("[1, inf)"), default=400, help="GSM8K test problems for pass@k")
    parser.add_argument("--save-every", type=int_in("[1, inf)"), default=60, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--keep-last", type=int_in("[1, inf)", -1), default=-1, help="after each save keep only the last K checkpoints, to bound disk use (-1 = keep all)")
    parser.add_argument("--resume-from-step", type=int_in("[0, inf)", -1), default=-1, help="resume from the checkpoint at this step (-1 = fresh run); pass the same flags as the original run")
    return parser

# -----------------------------------------------------------------------------
# Checks that need nothing but the flags (main runs them before any heavy work)

def check_args(args):
    # a group is sampled in whole passes of --device-batch-size rows, and trained the same way
    if args.device_batch_size != "auto" and args.num_samples % args.device_batch_size != 0:
        raise NanochatError(f"--num-samples={args.num_samples} must be a multiple of --device-batch-size={args.device_batch_size}")

# -----------------------------------------------------------------------------
# Prompts and rollouts: which problems a step trains on, sampling a group of completions for each, training rows

def step_example_indices(step, examples_per_step, rank, world_size, order):
    """The train-set indices rank trains on at step: the step's examples_per_step consecutive problems of order (the
    --seed shuffle of the train set, cycled over the epochs), dealt round-robin to the ranks. A function of the step
    alone: a resumed run, on any number of processes, trains on the same problems as the uninterrupted one."""
    first = step * examples_per_step
    return [order[(first + k) % len(order)] for k in range(rank, examples_per_step, world_size)]


def rollout_seed(seed, step, example_index, sampling_step):
    """Deterministic, distinct seed per (--seed, step, example, sampling call); ints hash the same in every process."""
    return hash((seed, step, example_index, sampling_step)) & 0x7FFFFFFF


@torch.no_grad()
def sample_groups(engine, tokenizer, task, examples, args, step):
    """Sample num_samples completions for each (example_index, conversation) of a step, all decoded together (a
    group in calls of device_batch_size rows, each with its own seed). Returns one (inputs, targets, rewards,
    sequence_lengths) per example."""
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    prompts = [tokenizer.render_for_completion(conversation) for _, conversation in examples]
    passes = args.num_samples // args.device_batch_size
    calls = [(i, sampling_step) for i in range(len(examples)) for sampling_step in range(passes)]  # example by example
    sampled = [None] * len(calls)
    # one seed per (step, example, call): a rollout does not depend on which other rows share the batch
    for call, seqs, msks in engine.generate_many([prompts[i] for i, _ in calls], num_samples=args.device_batch_size,
                                                 max_tokens=args.max_new_tokens, temperature=args.temperature,
                                                 top_k=args.top_k if args.top_k > 0 else None,
                                                 seeds=[rollout_seed(args.seed, step, examples[i][0], s) for i, s in calls],
                                                 max_rows=len(examples) * args.num_samples):
        sampled[call] = (seqs, msks)
    device = engine.model.get_device()
    groups = []
    for i, (_, conversation) in enumerate(examples):
        prompt, calls_of_example = prompts[i], sampled[i * passes:(i + 1) * passes]
        sequences = [seq for seqs, _ in calls_of_example for seq in seqs]
        masks = [mask for _, msks in calls_of_example for mask in msks]
        rewards = [task.reward(conversation, tokenizer.decode(seq[len(prompt):])) for seq in sequences]
        # pad with <|assistant_end|> (mask 0: never trained); the terminal token itself is not in the sequences
        max_length = max(len(s) for s in sequences)
        ids = torch.tensor([s + [assistant_end] * (max_length - len(s)) for s in sequences], dtype=torch.long, device=device)
        mask = torch.tensor([m + [0] * (max_length - len(m)) for m in masks], dtype=torch.long, device=device)
        targets = ids[:, 1:].clone()
        targets[mask[:, 1:] == 0] = -1  # prompt, forced tool output and padding: no gradient
        groups.append((ids[:, :-1], targets, torch.tensor(rewards, dtype=torch.float, device=device), [len(s) for s in sequences]))
    return groups

# -----------------------------------------------------------------------------
# The loop body's helpers: each takes what it needs as arguments

def policy_gradient_loss(model, inputs, targets, advantages, extra_normalizer=1):
    """-sum_{b,t} logp[b,t] * A[b] / (valid tokens in this pass x extra_normalizer). Ignored targets give logp 0."""
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
    objective = (logp * advantages.unsqueeze(-1)).sum()
    num_valid = (targets >= 0).sum().clamp(min=1)
    return -objective / (num_valid * extra_normalizer)


def train_step(model, engine, tokenizer, task, example_indices, args, step, num_steps, scaler):
    """Forward and backward of one optimizer step: rollouts for this rank's problems (example_indices) and the policy
    gradient of each group, the gradients accumulating (the update is the caller's finish_step). Returns (the mean
    reward of each group, the length of every sample, the loss of every pass)."""
    num_passes = args.num_samples // args.device_batch_size
    examples_per_rank = len(example_indices)
    step_rewards, step_lengths, losses = [], [], []
    model.eval()  # sampling: the model as it is now (on-policy)
    examples = [(i, task[i]) for i in example_indices]
    groups = sample_groups(engine, tokenizer, task, examples, args, step)  # all of the step's rollouts decoded together
    model.train()
    for example_step, (inputs, targets, rewards, lengths) in enumerate(groups):
        step_rewards.append(rewards.mean().item())
        step_lengths.extend(lengths)
        # group-mean baseline, no std scaling: a group that is all right or all wrong has zero advantage and teaches
        # nothing, and dividing by the group's std would weight nearly-solved and nearly-failed problems up
        advantages = rewards - rewards.mean()
        for p in range(num_passes):
            rows = slice(p * args.device_batch_size, (p + 1) * args.device_batch_size)
            # every pass of every example adds its share of the step's mean (hence the extra normalizer)
            loss = policy_gradient_loss(model, inputs[rows], targets[rows], advantages[rows], num_passes * examples_per_rank)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            losses.append(loss.detach())
            print0(f"Step {step}/{num_steps} | Example step {example_step} | Pass {p} | loss: {loss.item():.6f} "
                   f"| Average reward: {rewards.mean().item()}")
    return step_rewards, step_lengths, torch.stack(losses)


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, num_examples, k, max_new_tokens, temperature, top_k, rank, world_size,
                       max_rows):
    """pass@1..k on the first num_examples problems of task (rank r takes r, r+W, ...), decoded together in up to
    max_rows rows. Returns list of k floats."""
    counts = torch.zeros(k + 1, dtype=torch.long, device=engine.model.get_device())  # passed@1..k, problems seen
    conversations = [task[i] for i in range(rank, min(num_examples, len(task)), world_size)]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    for i, seqs, _ in engine.generate_many(prompts, num_samples=k, max_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k if top_k > 0 else None, max_rows=max_rows):
        outcomes = [bool(task.evaluate(conversations[i], tokenizer.decode(s[len(prompts[i]):]))) for s in seqs]
        # pass@j: any of the first j samples is right (the same k samples give every j)
        counts += torch.tensor([int(any(outcomes[:j + 1])) for j in range(k)] + [1], device=counts.device)
    if is_ddp_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return [passed / max(counts[k].item(), 1) for passed in counts[:k].tolist()]

# -----------------------------------------------------------------------------
# Loop state and resuming: what the loop carries from step to step. The LOOP_FIELDS go into the checkpoint meta (with
# the RNG states); the prompts and the rollout seeds of a step follow from the step, so no data position is saved.

@dataclasses.dataclass
class LoopState:
    step: int = 0
    history: dict = dataclasses.field(default_factory=lambda: {"train": [], "val": [], "pass_at_k": []})
    pass_at_k: list = None        # of the last evaluation
    mean_reward: float = None     # of the last step, averaged over ranks
    mean_length: float = None
    rl_time: float = 0.0          # wall time of the run so far, over all its launches
    last_good_step: int = None    # the newest checkpoint known to be finite (not saved)


LOOP_FIELDS = ("history", "pass_at_k", "mean_reward", "mean_length", "rl_time")


def restore_loop_state(meta, rank, device_type):
    """The LoopState of a checkpoint's meta; also restores this rank's RNG states."""
    state = LoopState(step=meta["step"], last_good_step=meta["step"], **{k: meta["loop_state"][k] for k in LOOP_FIELDS})
    resume.restore_rng_states(meta, rank, device_type)
    return state


def load_resumed_optimizer(optimizer, checkpoint_dir, step):
    """Put the optimizer state of the checkpoint we resume from into optimizer (its moments, and each group's
    initial_lr, so that the LR schedule continues where it was), resharded for this run's number of processes."""
    optimizer_data = load_optimizer_state("rl", os.path.basename(checkpoint_dir), step)
    if optimizer_data is None:
        raise NanochatError(f"--resume-from-step={step}: the checkpoint in {checkpoint_dir} has no optimizer state")
    optimizer.load_resharded(optimizer_data)


def save(checkpoint_dir, state, model, optimizer, args, user_config, rank, world_size, device):
    """Checkpoint after state.step updates (resume.save_resumable: every rank, never a non-finite state)."""
    meta = dict(model_config=dataclasses.asdict(model.config), user_config=user_config, pass_at_k=state.pass_at_k,
                source=args.source, seed=args.seed)
    resume.save_resumable(checkpoint_dir, "rl", state.step, model, optimizer, meta,
                          {k: getattr(state, k) for k in LOOP_FIELDS}, None, state.last_good_step, args.keep_last,
                          rank, world_size, device)
    state.last_good_step = state.step  # what a divergence error points to
    print0(f"✅ Saved checkpoint of step {state.step} to {checkpoint_dir}")

# -----------------------------------------------------------------------------

def main(argv=None):
    # --- flags; the starting checkpoint must exist before any heavy work ----------------------------------------
    args = build_parser().parse_args(argv)
    check_args(args)
    user_config = dict(vars(args))
    # which checkpoint to start from (tag and step), checked now; its files are read once the device is known
    start_checkpoint = resolve_checkpoint(args.source, args.model_tag, args.model_step)
    # the RL model keeps the tag of the model it started from (d<depth> unless --model-tag named another)
    depth = load_meta(*start_checkpoint)["model_config"]["n_layer"]
    checkpoint_dir = checkpoint_dir_for("rl", args.model_tag or f"d{depth}")

    # --- setup: runtime policies, device and processes, the checks that need the world size, wandb --------------
    freeze_gc()  # the GC policy (nanochat.training): what exists now lives as long as the run
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, _, world_size, device = compute_init(device_type, args.seed)
    keep_freed_memory(device_type)  # the allocator policy on CPU: freed step buffers stay in the heap for reuse
    print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    # every rank takes the same number of prompts per step, so their gradients average with equal weight
    if args.examples_per_step % world_size != 0:
        raise NanochatError(f"--examples-per-step={args.examples_per_step} must be divisible by the number of "
                            f"processes ({world_size})")
    # the resume checkpoint is checked (complete, readable, an RL one with its loop state) before any heavy work
    resuming = args.resume_from_step >= 0
    resume_meta = resume.check_resume("rl", checkpoint_dir, args.resume_from_step, world_size, user_config) if resuming else None
    wandb_run = init_wandb("nanochat-rl", args.run, user_config, rank == 0)

    # --- build: the data first (a missing dataset should fail before the model is loaded), model, optimizer -------
    try:
        train_task = GSM8K(subset="main", split="train")
        val_task = GSM8K(subset="main", split="test")
    except RuntimeError as e:
        raise NanochatError(f"GSM8K is needed for RL but unavailable: {e}") from None
    if len(train_task) == 0:
        raise NanochatError("GSM8K train is empty")
    # a resumed run continues from the weights of its own checkpoint
    model_checkpoint = (checkpoint_dir, args.resume_from_step) if resuming else start_checkpoint
    model, tokenizer, _ = build_model(*model_checkpoint, device, phase="eval")
    engine = Engine(model, tokenizer)  # uncompiled model: sampling has variable shapes
    if args.device_batch_size == "auto":
        # sized for the training forwards at the longest sequence, among the sizes that split a group evenly
        args.device_batch_size = auto_device_batch_size(model.config, device, model.config.sequence_len, args.num_samples)

    num_steps = args.num_steps if args.num_steps > 0 else (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps < 1:
        raise NanochatError(f"GSM8K train has {len(train_task)} problems, fewer than --examples-per-step="
                            f"{args.examples_per_step}; lower it or pass --num-steps")
    # past the horizon the loop would never meet its last step and never end
    if args.resume_from_step > num_steps:
        raise NanochatError(f"--resume-from-step={args.resume_from_step} is past the end of this run ({num_steps} steps)")
    examples_per_rank = args.examples_per_step // world_size
    order = random.Random(args.seed).sample(range(len(train_task)), len(train_task))  # the --seed order of the problems
    print0(f"Calculated number of steps: {num_steps}")
    print0(f"Total sequences per step: {args.examples_per_step * args.num_samples}")
    print0(f"Calculated examples per rank: {examples_per_rank}")

    # a fresh optimizer starts RL from the weights alone; a resumed run gets its optimizer state back
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    scale_initial_lrs(optimizer, args.init_lr_frac)
    if resuming:
        load_resumed_optimizer(optimizer, checkpoint_dir, args.resume_from_step)
    scaler = make_grad_scaler(device_type)  # only under fp16 compute (NANOCHAT_DTYPE=float16)
    # resuming restores the loop state and the RNGs after the model is built (building draws from the RNGs)
    state = restore_loop_state(resume_meta, rank, device_type) if resuming else LoopState()

    # --- the loop: at each step boundary the signal check, evaluation and checkpoint; then one optimizer step -----
    # SIGTERM/SIGINT (a preempted job, Ctrl-C) only set a flag; the finally below puts the previous handlers back
    signals, restore_signal_handlers = resume.catch_stop_signals(rank)
    try:
        start_step = state.step  # 0, or the resumed step
        print0(f"Starting RL at step {start_step} of {num_steps} (checkpoints: {checkpoint_dir})")
        t_start = time.time() - state.rl_time
        for step in range(start_step, num_steps + 1):
            state.step = step
            last_step = step == num_steps
            resumed_here = resuming and step == start_step  # this step's checkpoint is the one we resumed from
            stopped = resume.stop_requested(signals, device)  # every rank stops at the same boundary
            if stopped:
                if step > 0 and not resumed_here:
                    state.rl_time = time.time() - t_start
                    save(checkpoint_dir, state, model, optimizer, args, user_config, rank, world_size, device)
                resume.print_stopped(step)
                break
            # pass@k on GSM8K test (step 0, every eval_every, and at the end), sampled at temperature 1 so that the k
            # samples differ (pass@1 is then the expected accuracy of one sample, not greedy accuracy); a checkpoint
            # saved after this step's evaluation already holds it
            evaluated = any(row["step"] == step for row in state.history["pass_at_k"])
            if is_due(step, args.eval_every, last_step, at_step_zero=True) and not evaluated:
                model.eval()
                state.pass_at_k = evaluate_pass_at_k(engine, tokenizer, val_task, args.eval_examples,
                                                     args.device_batch_size, args.max_new_tokens, 1.0, args.top_k, rank,
                                                     world_size, examples_per_rank * args.num_samples)
                print0(f"Step {step} | " + ", ".join(f"Pass@{k + 1}: {v:.4f}" for k, v in enumerate(state.pass_at_k)))
                named = {f"pass@{k + 1}": v for k, v in enumerate(state.pass_at_k)}
                wandb_run.log({"step": step, **named})
                state.history["pass_at_k"].append(dict(step=step, **named))
            # checkpoint (the step we resumed from is on disk already); the last step always saves
            if is_due(step, args.save_every, last_step) and not resumed_here:
                state.rl_time = time.time() - t_start
                save(checkpoint_dir, state, model, optimizer, args, user_config, rank, world_size, device)
            if last_step:
                break

            # one optimization step: rollouts + policy gradient, one example at a time (gradients accumulate)
            example_indices = step_example_indices(step, args.examples_per_step, rank, world_size, order)
            step_rewards, step_lengths, losses = train_step(model, engine, tokenizer, train_task, example_indices, args,
                                                            step, num_steps, scaler)
            # step statistics, averaged over ranks
            stats = torch.tensor([sum(step_rewards) / len(step_rewards), sum(step_lengths) / len(step_lengths)],
                                 dtype=torch.float, device=device)
            if ddp:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # SUM / W: gloo has no AVG
                stats /= world_size
            state.mean_reward, state.mean_length = stats.tolist()
            print0(f"Step {step}/{num_steps} | Average reward: {state.mean_reward} | "
                   f"Average sequence length: {state.mean_length:.2f}")

            # linear LR decay to zero over the run; the optimizer averages gradients across ranks
            lrm = 1.0 - step / num_steps
            finish_step(optimizer, scaler, lrm)
            # a non-finite loss on any rank stops every rank (under fp16 the GradScaler skips such steps instead)
            if scaler is None and any_rank(not bool(torch.isfinite(losses).all()), device):
                raise resume.diverged(f"RL loss became non-finite at step {step}", state.last_good_step, checkpoint_dir)
            wandb_run.log({"step": step, "reward": state.mean_reward, "sequence_length": state.mean_length, "lrm": lrm})
            state.history["train"].append(dict(step=step + 1, reward=state.mean_reward, sequence_length=state.mean_length))
            # the GC policy: after this run's first step freeze what it built, then collect only every 5000 steps
            manage_gc(step == start_step, step + 1)

        # --- wrap up: a run stopped by a signal is not finished, so it writes no report --------------------------
        elapsed = time.time() - t_start
        if not stopped:
            print0(f"Total RL time: {elapsed / 60:.2f}m")
            stats = {"Number of steps": num_steps, "DDP world size": world_size,
                     "Final average reward": state.mean_reward, "Total RL time (m)": elapsed / 60}
            if state.pass_at_k is not None:
                stats.update({f"GSM8K pass@{k + 1}": v for k, v in enumerate(state.pass_at_k)})
            get_report().log(section="Chat RL", data=[user_config, stats])
        wandb_run.finish()
    finally:  # also after an error or a divergence: an in-process caller gets its handlers and GC back
        restore_signal_handlers()
        release_gc()
        compute_cleanup()
    # what the run measured, for an in-process caller (the tests)
    return dict(num_steps=num_steps, mean_reward=state.mean_reward, pass_at_k=state.pass_at_k, history=state.history,
                stopped=stopped)


if __name__ == "__main__":
    run(main)
