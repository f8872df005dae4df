"""
Supervised finetuning (SFT): turn a base model into a chat model.

    python -m scripts.chat_sft
    NANOCHAT_OFFLINE=1 python -m scripts.chat_sft --num-iterations=200        # only data already on disk
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=my_sft
    python -m scripts.chat_sft --save-every=100 --resume-from-step=300      # resume a run (same flags, any world size)

What it does:
- loads the base checkpoint; batch geometry (--max-seq-len, --device-batch-size, --total-batch-size) and the
  learning rates are inherited from it unless given, and the base optimizer's momentum buffers are loaded
  (--load-optimizer=1) with fresh learning rates;
- trains on one mixture of conversations (SFT_PARTS: SmolTalk, MMLU auxiliary_train x --mmlu-epochs, GSM8K x
  --gsm8k-epochs, identity conversations x --identity-epochs, SimpleSpelling, SpellingBee); a part whose data cannot
  be had (offline and not on disk) is left out with a loud banner that names it, and the report lists it;
- packs conversations into rows with BOS-aligned best-fit packing; the loss is on the assistant's own tokens only
  (not on user turns, BOS, tool outputs or padding);
- conversations longer than a row are truncated to fit (or skipped when nothing the assistant says survives), so
  the packing buffer can never clog with short --max-seq-len; both are counted and reported;
- the loss is a token mean over the whole optimizer step, so a micro-batch with zero supervised tokens adds zero
  gradient instead of a 0/0 NaN;
- evaluates validation loss / bpb and ChatCORE (categorical and generative chat tasks) during training, saves to
  <base>/chatsft_checkpoints/<tag>/ and writes the "Chat SFT" report section;
- resumes like base_train (nanochat.resume): --save-every / --keep-last / --resume-from-step, SIGTERM/SIGINT save a
  checkpoint at the next step boundary and exit 0, a non-finite loss or state stops the run and is never saved. The
  checkpoint holds the loop state and every rank's loader state (packing position and buffer, nanochat.sft_dataloader),
  so a resumed run is bit-identical on the same number of processes; on another number the optimizer state and the
  conversations not yet used are redistributed (no conversation of the epoch twice, none skipped).
"""

import os
# The allocator policy on CUDA: growable segments instead of fixed blocks, so that memory does not fragment as the
# packed rows, evaluations and generations change tensor sizes. Set before any import: the CUDA caching allocator
# reads it once, when CUDA starts, which can be as early as nanochat.common's import.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import math
import time
import argparse
import dataclasses
from collections import Counter

import torch
import torch.distributed as dist

from nanochat import resume
from nanochat.checkpoint_manager import (resolve_checkpoint, build_model, checkpoint_dir_for, load_optimizer_state,
                                         load_checkpoint, load_meta, CheckpointError)
from nanochat.auto_batch import auto_device_batch_size, positive_int_or_auto
from nanochat.cli import run
from nanochat.common import (NanochatError, compute_init, compute_cleanup, print0, autodetect_device_type, get_base_dir,
                             is_offline, get_peak_flops, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, is_ddp_initialized,
                             synchronize, peak_memory_mib, int_in, float_in, should_compile)
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb, format_bpb, keep_batches
from nanochat.report import get_report
from nanochat.sft_dataloader import sft_batches, resume_state
from nanochat.tokenizer import get_token_bytes
from nanochat.training import (keep_freed_memory, freeze_gc, manage_gc, release_gc, make_grad_scaler, finish_step,
                               scale_initial_lrs, is_due, any_rank, init_wandb)
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.evaluate import ALL_TASKS, BASELINES, run_chat_evals, chatcore_from_results, format_accuracy
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

# Fallbacks when neither the command line nor the base checkpoint gives a value (a base run's batch geometry fits the
# hardware it ran on, and its learning rates are what the model is used to: both are the better default)
FALLBACKS = dict(max_seq_len=2048, device_batch_size=32, total_batch_size=524288,
                 embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02)


def build_parser():
    parser = argparse.ArgumentParser(description="Supervised finetuning of a base model into a chat model")
    # logging and runtime
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--compile", type=str, default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the model and the optimizer math (auto: always on CUDA, on CPU for long runs)")
    parser.add_argument("--seed", type=int_in("[0, 4294967295]"), default=42,
                        help="seed of the training mixture's conversation order (the validation slice stays fixed)")
    # which base model
    parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: largest d<N>)")
    parser.add_argument("--model-step", type=int_in("[0, inf)"), default=None, help="base checkpoint step (default: last)")
    parser.add_argument("--load-optimizer", type=int_in("[0, 1]"), default=1,
                        help="1 = warm-start from the base optimizer's momentum buffers (LRs reset), 0 = fresh")
    # data mixture (SFT_PARTS)
    parser.add_argument("--mmlu-epochs", type=int_in("[0, inf)"), default=3, help="copies of MMLU auxiliary_train in the mixture")
    parser.add_argument("--gsm8k-epochs", type=int_in("[0, inf)"), default=4, help="copies of GSM8K train in the mixture")
    parser.add_argument("--identity-epochs", type=int_in("[0, inf)"), default=2,
                        help="copies of the identity conversations (who the model says it is)")
    parser.add_argument("--simple-spelling-size", type=int_in("[0, inf)"), default=200000, help="SimpleSpelling rows (spell a word)")
    parser.add_argument("--spelling-bee-size", type=int_in("[0, inf)"), default=80000, help="SpellingBee rows (count letters in a word)")
    # horizon and batch geometry (None = inherit from the base checkpoint). By default one pass over the mixture: the
    # parts are oversampled by their --*-epochs instead, so the horizon follows the mixture
    parser.add_argument("--num-iterations", type=int_in("[1, inf)", -1), default=-1,
                        help="optimizer steps to train (-1 = one full pass over the mixture)")
    parser.add_argument("--max-seq-len", type=int_in("[1, inf)"), default=None, help="row length T (default: inherited)")
    parser.add_argument("--device-batch-size", type=positive_int_or_auto, default=None,
                        help="rows per micro-batch per rank, or auto: the largest that fits (default: inherited)")
    parser.add_argument("--total-batch-size", type=int_in("[1, inf)"), default=None, help="tokens per optimizer step (default: inherited)")
    # optimization: the base run's LRs (inherited), scaled by --init-lr-frac and decayed to 0 over the second half;
    # the base optimizer's momentum buffers carry over, so finetuning starts where pretraining's updates pointed
    parser.add_argument("--embedding-lr", type=float_in("[0, inf)"), default=None, help="AdamW LR of the embeddings (default: inherited)")
    parser.add_argument("--unembedding-lr", type=float_in("[0, inf)"), default=None, help="AdamW LR of lm_head (default: inherited)")
    parser.add_argument("--matrix-lr", type=float_in("[0, inf)"), default=None, help="Muon LR of the matrices (default: inherited)")
    parser.add_argument("--weight-decay", type=float_in("[0, inf)"), default=0.0,
                        help="weight decay (0: pretraining already ramped it to 0)")
    parser.add_argument("--init-lr-frac", type=float_in("[0, inf)"), default=0.8, help="all LRs x this at the start (tuned)")
    parser.add_argument("--warmup-ratio", type=float_in("[0, 1]"), default=0.0, help="fraction of training spent warming up the LR")
    parser.add_argument("--warmdown-ratio", type=float_in("[0, 1]"), default=0.5, help="fraction of training spent decaying the LR")
    parser.add_argument("--final-lr-frac", type=float_in("[0, 1]"), default=0.0, help="LR multiplier at the end of the warmdown")
    # evaluation: validation loss on held-out conversations (cheap), ChatCORE on the chat tasks (generation: slow, so
    # the generative tasks are capped harder than the multiple-choice ones)
    parser.add_argument("--eval-every", type=int_in("[1, inf)", -1), default=200, help="val loss/bpb every N steps (-1 = only at the end)")
    parser.add_argument("--eval-tokens", type=int_in("[1, inf)"), default=40 * 524288, help="tokens per validation evaluation")
    parser.add_argument("--chatcore-every", type=int_in("[1, inf)", -1), default=200, help="ChatCORE every N steps and at the end (-1 = off)")
    parser.add_argument("--chatcore-max-cat", type=int_in("[1, inf)", -1), default=-1, help="max problems per categorical task (-1 = all)")
    parser.add_argument("--chatcore-max-sample", type=int_in("[1, inf)"), default=24, help="max problems per generative task")
    parser.add_argument("--chatcore-max-new-tokens", type=int_in("[1, inf)"), default=256, help="max tokens per generative answer")
    # output and checkpoints: a resumed run must be launched with the same flags (the schedules follow from them);
    # only what the loop accumulated (step, progress, loss EMA, history, RNG and loader states) comes from the checkpoint
    parser.add_argument("--dry-run", type=int_in("[0, 1]"), default=0, help="1 = do not save a checkpoint or write the report")
    parser.add_argument("--resume-from-step", type=int_in("[0, inf)", -1), default=-1, help="resume from the checkpoint at this step (-1 = fresh run); pass the same flags as the original run")
    parser.add_argument("--save-every", type=int_in("[1, inf)", -1), default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    parser.add_argument("--keep-last", type=int_in("[1, inf)", -1), default=-1, help="after each save keep only the last K checkpoints, to bound disk use (-1 = keep all)")
    return parser

# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """LR multiplier on progress p in [0, 1]: linear warmup, constant, linear warmdown to final_lr_frac."""
    # on progress, not on steps: with one pass over the mixture the number of steps is only known at its end
    p = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and p < warmup_ratio:
        return (p + 1e-8) / warmup_ratio
    if p <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (p - (1.0 - warmdown_ratio)) / max(warmdown_ratio, 1e-8)
    return 1.0 * (1 - decay) + final_lr_frac * decay


def muon_momentum(step):
    # 0.85 -> 0.95 over the first 300 steps, then held: right after the data changes, a lower momentum lets the new
    # gradients steer sooner than the averaged pretraining directions in the warm-started buffers
    f = min(step / 300, 1.0)
    return (1 - f) * 0.85 + f * 0.95

# -----------------------------------------------------------------------------
# Build: settings inherited from the base run, the optimizer warm-started from it

def resolve_inherited(args, meta):
    """Fill the None flags of FALLBACKS from the base checkpoint (its meta, else its flags), else the fallback,
    printing where each value came from."""
    # the meta holds what the base run used (e.g. the batch size its auto rule chose); its flags only what was typed
    base_flags = meta.get("user_config") or {}
    for name, fallback in FALLBACKS.items():
        base_value = meta.get(name, base_flags.get(name))
        if base_value is not None and base_value <= 0:
            base_value = None  # e.g. total_batch_size=-1 (auto) in the base run's flags: not a usable value
        given = getattr(args, name)
        if given is None and base_value is not None:
            print0(f"Inherited {name}={base_value} from pretrained checkpoint")
            setattr(args, name, base_value)
        elif given is None:
            print0(f"Using fallback {name}={fallback}")
            setattr(args, name, fallback)
        elif base_value is not None and given != base_value:
            print0(f"NOTE: --{name.replace('_', '-')}={given} overrides pretrained value of {base_value}")
        else:
            print0(f"Using {name}={given}")
        # a larger micro-batch than pretraining used probably does not fit the same GPU memory
        if name == "device_batch_size" and base_value and given != "auto" and args.device_batch_size > base_value:
            print0(f"FOOTGUN WARNING: base model training used device_batch_size {base_value}, "
                   f"did you pass in a good --device-batch-size to this script?")


def build_optimizer(model, args, device, use_compile, resumed_state=None):
    """A fresh optimizer (LRs x --init-lr-frac) that, with --load-optimizer=1, takes the base run's momentum buffers
    (every rank warm-starts or none does); a resumed run's takes resumed_state, the state its checkpoint saved."""
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay, compile=use_compile)
    if resumed_state is not None:
        optimizer.load_resharded(resumed_state)  # each group's initial_lr too: the LR schedule continues where it was
        return optimizer
    base_state = None
    if args.load_optimizer:
        try:
            base_state = load_optimizer_state("base", args.model_tag, args.model_step)  # any world size
        except CheckpointError as e:
            print0(f"WARNING: could not read the base optimizer state ({e})")
    # all ranks or none: ranks with different optimizer states would apply different updates to one model
    if args.load_optimizer and any_rank(base_state is None, device):
        print0("WARNING: no usable optimizer state in the base checkpoint; starting with a fresh optimizer")
    elif args.load_optimizer:
        # the saved groups carry end-of-pretraining (near zero) LRs: keep only the buffers
        hyperparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_resharded(base_state)  # validates before it changes anything
            for group, hyper in zip(optimizer.param_groups, hyperparams):
                group.update(hyper)
            print0("Loaded optimizer state from pretrained checkpoint (momentum buffers only, LRs reset)")
        except (ValueError, KeyError, RuntimeError) as e:
            print0(f"WARNING: base optimizer state does not match this model ({e}); starting fresh")
    scale_initial_lrs(optimizer, args.init_lr_frac)
    return optimizer

# -----------------------------------------------------------------------------
# The mixture: one list of parts, each used when its data can be had

# What each training part teaches: conversation (SmolTalk), answering multiple choice (MMLU), arithmetic with the
# calculator tool (GSM8K), who the model is (identity), and spelling and counting letters, which a BPE model cannot
# see inside its tokens (SimpleSpelling, SpellingBee). The val parts are held-out slices of the same kinds, capped so
# that an evaluation stays short.
SFT_PARTS = [  # (name, split, copies from the flags, how to build it)
    ("SmolTalk train", "train", lambda a: 1, lambda a: SmolTalk(split="train")),
    ("MMLU auxiliary_train", "train", lambda a: a.mmlu_epochs, lambda a: MMLU(subset="all", split="auxiliary_train")),
    ("GSM8K train", "train", lambda a: a.gsm8k_epochs, lambda a: GSM8K(subset="main", split="train")),
    ("identity conversations", "train", lambda a: a.identity_epochs, lambda a: identity_conversations()),
    ("SimpleSpelling", "train", lambda a: int(a.simple_spelling_size > 0),
     lambda a: SimpleSpelling(size=a.simple_spelling_size, split="train")),
    ("SpellingBee", "train", lambda a: int(a.spelling_bee_size > 0),
     lambda a: SpellingBee(size=a.spelling_bee_size, split="train")),
    ("SmolTalk test", "val", lambda a: 1, lambda a: SmolTalk(split="test")),
    ("MMLU test[:5200]", "val", lambda a: 1, lambda a: MMLU(subset="all", split="test", stop=5200)),
    ("GSM8K test[:420]", "val", lambda a: 1, lambda a: GSM8K(subset="main", split="test", stop=420)),
    ("SpellingBee test[:256]", "val", lambda a: 1, lambda a: SpellingBee(size=256, split="test")),
]


def identity_conversations():
    # an OSError (not a NanochatError) when missing: build_mixture leaves the part out like any unavailable data
    path, source = identity_conversations_path()
    if path is None:
        raise OSError(f"no identity_conversations.jsonl (looked in NANOCHAT_LOCAL_DATA, {get_base_dir()} and data/)")
    print0(f"Identity conversations: {path} ({source})")
    return CustomJSON(filepath=path)


def build_mixture(args):
    """Returns (train_task, val_task, description, unavailable_parts); a part that cannot be loaded is left out."""
    if is_offline():
        print0("NANOCHAT_OFFLINE/HF_HUB_OFFLINE is set: OFFLINE, the SFT mixture uses only data already on disk")
    # A part that cannot be had is left out instead of failing the run: finetuning on what is there beats none, and
    # the banner below and the report make the gap hard to miss. Only an empty split stops the run.
    parts = {"train": [], "val": []}
    unavailable = []
    for name, split, copies, build in SFT_PARTS:
        if copies(args) <= 0:
            continue
        try:
            task = build(args)
        except (ImportError, OSError, RuntimeError, NanochatError) as e:  # offline and not on disk, or no such file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # one line, capped: it goes in the report
            unavailable.append(f"{name} ({reason if len(reason) <= 240 else reason[:240] + ' ...'})")
            continue
        parts[split] += [(name, task)] * copies(args)
    if unavailable:
        print0("!" * 100)
        print0("WARNING: parts of the SFT mixture are unavailable and left out:")
        for part in unavailable:
            print0(f"  unavailable: {part}")
        print0("  (set NANOCHAT_LOCAL_DATA to local copies, or connect once: data is cached under the base dir)")
        print0("!" * 100)
    for split, rows in parts.items():
        if sum(len(t) for _, t in rows) == 0:
            raise NanochatError(f"the SFT {split} mixture is empty (no part could be loaded); see the lines above")
    train_task = TaskMixture([t for _, t in parts["train"]], seed=args.seed)
    # the validation mixture keeps its own seed: every run, whatever its --seed, is measured on the same conversations
    val_task = TaskMixture([t for _, t in parts["val"]])
    counts = Counter()
    for name, task in parts["train"]:
        counts[name] += len(task)  # oversampled parts are summed
    description = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    print0(f"Training mixture: {len(train_task):,} rows ({description})")
    print0(f"Validation mixture: {len(val_task):,} rows ({', '.join(n for n, _ in parts['val'])})")
    return train_task, val_task, description, unavailable

# -----------------------------------------------------------------------------
# Loop state and resuming: everything the loop carries from step to step. The LOOP_FIELDS go into the checkpoint
# meta, with the RNG states and every rank's loader state, so that a resumed run continues bit-exactly.

@dataclasses.dataclass
class LoopState:
    step: int = 0
    progress: float = 0.0           # in [0, 1]: by steps with --num-iterations, else by conversations used
    smooth_train_loss: float = 0.0
    total_training_time: float = 0.0
    val_bpb: float = None
    val_loss: float = None
    min_val_bpb: float = float("inf")
    chatcore: float = None
    history: dict = dataclasses.field(default_factory=lambda: {"train": [], "val": [], "chatcore": []})  # the report's
    zero_supervised_steps: int = 0
    unavailable_evals: list = dataclasses.field(default_factory=list)  # chat tasks found unavailable: not retried
    last_good_step: int = None      # the newest checkpoint known to be finite (not saved)

    def record(self, split, entry):
        rows = [r for r in self.history[split] if r["step"] != entry["step"]]  # a resumed step replaces its old entry
        self.history[split] = rows + [entry]


# the LoopState fields saved under meta["loop_state"] (step, val_bpb, val_loss and chatcore are top-level meta keys)
LOOP_FIELDS = ("progress", "smooth_train_loss", "total_training_time", "min_val_bpb", "history",
               "zero_supervised_steps", "unavailable_evals")


def restore_loop_state(meta, rank, device_type):
    """(LoopState, every old rank's loader state) from a checkpoint's meta; also restores this rank's RNG states."""
    state = LoopState(step=meta["step"], val_bpb=meta["val_bpb"], val_loss=meta["val_loss"], chatcore=meta["chatcore"],
                      last_good_step=meta["step"], **{k: meta["loop_state"][k] for k in LOOP_FIELDS})
    resume.restore_rng_states(meta, rank, device_type)
    return state, meta["dataloader_state_dicts"]


def load_resumed_weights(orig_model, checkpoint_dir, step, device):
    """Put the weights of the checkpoint we resume from into orig_model; returns its optimizer state (for
    optimizer.load_resharded: saved by any number of processes)."""
    try:
        model_data, optimizer_data, _ = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True)
        orig_model.load_state_dict(model_data, strict=True)
    except (CheckpointError, RuntimeError) as e:
        raise NanochatError(f"--resume-from-step={step}: {e}") from None
    print0(f"Resumed model weights from {checkpoint_dir} at step {step}")
    return optimizer_data


def save(checkpoint_dir, state, orig_model, optimizer, args, user_config, mixture, loader_state, rank, world_size, device):
    """Checkpoint after state.step updates (resume.save_resumable: never a non-finite one); loader_state is where this
    rank's loader resumes."""
    meta = dict(val_bpb=state.val_bpb, val_loss=state.val_loss, chatcore=state.chatcore,
                model_config=dataclasses.asdict(orig_model.config), user_config=user_config,
                max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                total_batch_size=args.total_batch_size, mixture=mixture, seed=args.seed)
    resume.save_resumable(checkpoint_dir, "sft", state.step, orig_model, optimizer, meta,
                          {k: getattr(state, k) for k in LOOP_FIELDS}, loader_state, state.last_good_step,
                          args.keep_last, rank, world_size, device)
    state.last_good_step = state.step  # what a divergence error points to


def total_packing_stats(stats, device):
    """The packing counts of every rank, summed (one rank's alone undercounts a multi-process run)."""
    if not is_ddp_initialized():
        return stats
    counts = torch.tensor(list(stats.values()), dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return dict(zip(stats, counts.tolist()))

# -----------------------------------------------------------------------------
# The loss of one optimizer step, and validation

def backward_token_mean(model, micro_batches, num_supervised, world_size=1, scaler=None):
    """Backward of the mean loss over every supervised token of the step (all micro-batches, all ranks).
    num_supervised is that global count. Per micro-batch we sum per-token losses (ignored targets give exactly 0)
    and divide by the global count, so a micro-batch without supervised tokens contributes zero gradient instead
    of the 0/0 = NaN of a per-micro-batch mean. Returns this rank's summed loss (a float)."""
    if num_supervised <= 0:
        return 0.0
    normalizer = num_supervised / world_size  # the optimizer averages gradients over ranks
    loss_sum_total = 0.0
    for x, y in micro_batches:
        # (a micro-batch without supervised tokens still runs: its gradient is exactly zero, and under torchrun every
        # rank must hand the optimizer gradients for its collectives to line up)
        loss_sum = model(x, y, loss_reduction="sum")
        loss_sum_total += loss_sum.detach().item()
        loss = loss_sum / normalizer
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss_sum_total


def train_step(model, batches, grad_accum_steps, scaler, device, world_size):
    """Forward and backward of one optimizer step: grad_accum_steps micro-batches, the gradients accumulating (the
    update is the caller's finish_step). All micro-batches are fetched first, so that the loss can be normalized by
    the step's supervised-token count (all ranks), which keeps zero-token micro-batches from producing 0/0. Returns
    (loss sum, supervised tokens, conversations used so far), all ranks, and this rank's loader state after the step."""
    fetched = [next(batches) for _ in range(grad_accum_steps)]
    micro_batches = [(x, y) for x, y, _ in fetched]
    loader_state = fetched[-1][2]  # where the loader stands after the last micro-batch
    counts = torch.tensor([sum(int((y >= 0).sum()) for _, y in micro_batches), loader_state["used"]], device=device)
    # every rank divides by the same global count (so the averaged gradient is the mean over all tokens), and the
    # progress counts the conversations every rank used (so every rank reaches the end of the mixture at one step)
    if is_ddp_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    num_supervised, used = counts.tolist()
    loss_sum = torch.tensor(backward_token_mean(model, micro_batches, num_supervised, world_size, scaler),
                            device=device)
    if is_ddp_initialized():
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    return loss_sum.item(), num_supervised, used, loader_state


def evaluate_chatcore(model, tokenizer, args, batch_size, step, unavailable):
    """ChatCORE over the chat tasks whose data is available; a task found unavailable is skipped from then on."""
    model.eval()
    # generation is what makes ChatCORE slow: the generative tasks get their own, smaller cap
    max_cat = None if args.chatcore_max_cat < 0 else args.chatcore_max_cat
    # the categorical (MC) tasks are the ones with a chance baseline
    caps = {t: max_cat if BASELINES[t] > 0 else args.chatcore_max_sample for t in ALL_TASKS}
    results, skipped = run_chat_evals([t for t in ALL_TASKS if t not in unavailable], model, tokenizer,
                                      Engine(model, tokenizer), max_problems=caps, batch_size=batch_size,
                                      max_new_tokens=args.chatcore_max_new_tokens, temperature=0.0)
    unavailable.update(skipped)
    for task_name, (accuracy, problems) in results.items():
        print0(f"  {task_name}: {format_accuracy(accuracy, problems)}")
    chatcore, chatcore_se, label = chatcore_from_results(results)
    chatcore_cat, chatcore_cat_se, _ = chatcore_from_results(results, [t for t in ALL_TASKS if BASELINES[t] > 0])
    # NaN when no task of a kind was available: printed and logged as such, never as a misleading 0
    chatcore, chatcore_se, chatcore_cat, chatcore_cat_se = (float("nan") if v is None else v for v in
                                                            (chatcore, chatcore_se, chatcore_cat, chatcore_cat_se))
    partial = "" if label == "full" else f" {label}"
    print0(f"Step {step:05d} | ChatCORE: {chatcore:.4f} ± {chatcore_se:.4f} | "
           f"ChatCORE_cat: {chatcore_cat:.4f} ± {chatcore_cat_se:.4f}{partial}")
    model.train()
    return chatcore, {task_name: accuracy for task_name, (accuracy, _) in results.items()}

# -----------------------------------------------------------------------------

def main(argv=None):
    # --- flags; the base checkpoint must exist before any heavy work ---------------------------------------------
    args = build_parser().parse_args(argv)
    user_config = dict(vars(args))  # the flags as given (before inheritance), for the report and the meta
    # which base checkpoint (tag and step), checked now; its files are read once the device is known
    base_checkpoint = resolve_checkpoint("base", args.model_tag, args.model_step)
    # the SFT model keeps the base model's tag (d<depth> unless --model-tag named another)
    depth = load_meta(*base_checkpoint)["model_config"]["n_layer"]
    checkpoint_dir = checkpoint_dir_for("sft", args.model_tag or f"d{depth}")

    # --- setup: runtime policies, device and processes, the resume checkpoint, wandb -----------------------------
    freeze_gc()  # the GC policy (nanochat.training): what exists now lives as long as the run
    device_type = args.device_type or autodetect_device_type()
    _, rank, _, world_size, device = compute_init(device_type, args.seed)
    keep_freed_memory(device_type)  # the allocator policy on CPU: freed step buffers stay in the heap for reuse
    print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    # the resume checkpoint is checked (complete, readable, this stage's) before wandb and the model
    resuming = args.resume_from_step >= 0
    resume_meta = resume.check_resume("sft", checkpoint_dir, args.resume_from_step, world_size, user_config) if resuming else None
    wandb_run = init_wandb("nanochat-sft", args.run, user_config, rank == 0)

    # --- build: the base model and the settings it passes on, batch geometry, optimizer, data ---------------------
    orig_model, tokenizer, meta = build_model(*base_checkpoint, device, phase="train")  # uncompiled: saving, the Engine
    resolve_inherited(args, meta)  # the batch geometry and learning rates the flags left open come from the base run
    # one pass over the mixture has no step count known in advance: counted as a long run (compile on CPU too)
    use_compile = should_compile(device_type, args.compile, args.num_iterations if args.num_iterations > 0 else math.inf)
    # auto: the largest micro-batch that fits, of those that split the total batch evenly; tried compiled when the
    # run compiles, since compiled and eager peaks differ
    if args.device_batch_size == "auto":
        args.device_batch_size = auto_device_batch_size(orig_model.config, device, args.max_seq_len,
                                                        args.total_batch_size // (args.max_seq_len * world_size), use_compile)
    B, T = args.device_batch_size, args.max_seq_len
    # one forward/backward of every rank; an optimizer step is a whole number of them (gradient accumulation)
    world_tokens_per_fwdbwd = B * T * world_size
    if args.total_batch_size % world_tokens_per_fwdbwd != 0:
        raise NanochatError(f"--total-batch-size={args.total_batch_size} must be a multiple of --device-batch-size x "
                            f"--max-seq-len x world size = {B} x {T} x {world_size} = {world_tokens_per_fwdbwd}")
    grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {B} x {T} = {B * T:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {args.total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    # allowed (the rotary cache covers a multiple of sequence_len), but pretraining never saw positions that far
    if T > orig_model.config.sequence_len:
        print0(f"NOTE: --max-seq-len={T} is longer than the base model's sequence_len={orig_model.config.sequence_len}")
    # a resumed run trains on from the weights and optimizer state of its checkpoint
    resumed_optimizer = load_resumed_weights(orig_model, checkpoint_dir, args.resume_from_step, device) if resuming else None
    # the loop trains the compiled model; ChatCORE (varying shapes) and saving use orig_model
    model = torch.compile(orig_model, dynamic=False, fullgraph=True) if use_compile else orig_model
    optimizer = build_optimizer(orig_model, args, device, use_compile, resumed_optimizer)
    scaler = make_grad_scaler(device_type)  # only under fp16 compute (NANOCHAT_DTYPE=float16)
    train_dataset, val_dataset, mixture_description, unavailable = build_mixture(args)
    # resuming restores the loop state and the RNGs after the model is built (building draws from the RNGs); the
    # loader starts from this rank's saved state, or its share of the old ranks' when the world size changed
    state, loader_states = restore_loop_state(resume_meta, rank, device_type) if resuming else (LoopState(), None)
    loader_state = resume_state(loader_states, rank, world_size)  # packing stats are printed and reported at the end
    train_loader = sft_batches(train_dataset, tokenizer, B, T, device, rank, world_size, state=loader_state)
    token_bytes = get_token_bytes(device=device)  # bytes of text per token id, for bits per byte
    # MFU: the model's FLOPs per token x tokens per step, against the GPU's peak (known only on CUDA)
    flops_per_step = orig_model.estimate_flops() * args.total_batch_size
    peak_flops = get_peak_flops(torch.cuda.get_device_name(device) if device_type == "cuda" else device_type)

    # --- the loop: at each step boundary the signal check, evaluations and checkpoints; then one optimizer step ---
    # SIGTERM/SIGINT (a preempted job, Ctrl-C) only set a flag; the finally below puts the previous handlers back
    signals, restore_signal_handlers = resume.catch_stop_signals(rank)
    try:
        start_step, ema_beta, val_batches = state.step, 0.9, None
        unavailable_evals = set(state.unavailable_evals)  # chat tasks found unavailable are not retried
        print0(f"Starting training at step {start_step} (checkpoints: {checkpoint_dir})")
        while True:
            step = state.step
            # the end: the step count when given, else the first step boundary at which the mixture is used up
            last_step = step >= args.num_iterations if args.num_iterations > 0 else state.progress >= 1.0
            resumed_here = resuming and step == start_step  # this step's checkpoint is the one we resumed from
            saving = not args.dry_run and not resumed_here
            stopped = resume.stop_requested(signals, device)  # every rank stops at the same boundary
            if stopped:
                if step > 0 and saving:
                    save(checkpoint_dir, state, orig_model, optimizer, args, user_config, mixture_description,
                         loader_state, rank, world_size, device)
                if args.dry_run:
                    print0(f"Stopped by signal at step {step} (--dry-run: no checkpoint written)")
                else:
                    resume.print_stopped(step)
                break
            if last_step or is_due(step, args.eval_every, last_step, at_step_zero=True):
                model.eval()
                if val_batches is None:  # rendered once, replayed at every evaluation
                    eval_steps = max(1, args.eval_tokens // (B * T * world_size))
                    val_batches = keep_batches(sft_batches(val_dataset, tokenizer, B, T, device, rank, world_size), eval_steps)
                # the loss on the assistant's tokens only (the same mask as training); bpb also counts their bytes
                val = evaluate_bpb(model, val_batches, token_bytes)
                state.val_bpb, state.val_loss, state.min_val_bpb = val.bpb, val.loss, min(state.min_val_bpb, val.bpb)
                print0(f"Step {step:05d} | Validation bpb: {val.bpb:.4f} ± {val.se:.4f} | Validation loss: {val.loss:.4f} "
                       f"({val.tokens:,} supervised tokens)")
                state.record("val", dict(step=step, val_bpb=val.bpb, val_bpb_se=val.se, val_loss=val.loss,
                                         flops=flops_per_step * step))
                wandb_run.log({"step": step, "total_training_flops": flops_per_step * step, "val/bpb": val.bpb, "val/loss": val.loss})
                model.train()
            if is_due(step, args.chatcore_every, last_step):  # categorical (MC) and generative tasks, uncompiled model
                state.chatcore, chatcore_results = evaluate_chatcore(orig_model, tokenizer, args, B, step, unavailable_evals)
                state.unavailable_evals = sorted(unavailable_evals)
                state.record("chatcore", dict(step=step, chatcore=state.chatcore, **chatcore_results))
                wandb_run.log({"step": step, "chatcore_metric": state.chatcore, **{f"chatcore/{k}": v for k, v in chatcore_results.items()}})
            # checkpoint (the step we resumed from is on disk already); the last step always saves
            if (last_step or is_due(step, args.save_every, last_step)) and saving:
                save(checkpoint_dir, state, orig_model, optimizer, args, user_config, mixture_description,
                     loader_state, rank, world_size, device)
            if last_step:
                break

            # one optimization step, timed between device synchronizations so dt is the step's own work
            synchronize(device_type)
            t0 = time.time()
            loss_sum, num_supervised, used, loader_state = train_step(model, train_loader, grad_accum_steps, scaler,
                                                                      device, world_size)
            # with no supervised token anywhere the gradients are all zero: skip the update, or momentum and weight
            # decay would still move the weights on a step that saw no data
            if num_supervised == 0:
                state.zero_supervised_steps += 1
                print0(f"WARNING: step {step} has no supervised (assistant) tokens in any micro-batch; skipping its update")
            # LR and momentum from the progress made before this step (so the first step runs at the initial LR and
            # the last one does not waste its batch at LR 0); then record the progress including this step
            lrm = lr_multiplier(state.progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            finish_step(optimizer, scaler, lrm, momentum=muon_momentum(step), update=num_supervised > 0)
            synchronize(device_type)
            dt = time.time() - t0
            # the loss sum is over all ranks: a non-finite one stops every rank (under fp16 the GradScaler skips
            # such steps instead)
            if scaler is None and not math.isfinite(loss_sum):
                raise resume.diverged(f"training loss became {loss_sum} at step {step} (non-finite)",
                                      state.last_good_step, checkpoint_dir)
            state.step = step = step + 1
            # progress in [0, 1]: by steps when --num-iterations is given, else by conversations used (all ranks)
            state.progress = step / args.num_iterations if args.num_iterations > 0 else used / len(train_dataset)

            # the step's log line: an EMA of the per-token loss (debiased like Adam's moments, for the first steps)
            # and throughput; the first 10 steps (compilation, warm-up) are left out of the training time
            if num_supervised > 0:
                state.smooth_train_loss = ema_beta * state.smooth_train_loss + (1 - ema_beta) * loss_sum / num_supervised
            debiased = state.smooth_train_loss / (1 - ema_beta ** step)
            if step > 10:
                state.total_training_time += dt
            tok_per_sec = int(args.total_batch_size / dt)
            mfu = f"{100 * flops_per_step / dt / (peak_flops * world_size):.2f}" if peak_flops else "n/a"
            epoch = loader_state["epoch"]
            print0(f"step {step:05d} ({100 * state.progress:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
                   f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu} | epoch: {epoch} | "
                   f"total time: {state.total_training_time / 60:.2f}m")
            state.record("train", dict(step=step, loss=debiased, flops=flops_per_step * step))
            if step % 10 == 0:
                wandb_run.log({"step": step, "total_training_flops": flops_per_step * step,
                               "total_training_time": state.total_training_time, "train/loss": debiased,
                               "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/epoch": epoch})
            # the GC policy: after this run's first step freeze what it built, then collect only every 5000 steps
            manage_gc(step == start_step + 1, step)

        # --- wrap up: summary lines and the report; a run stopped by a signal is not finished, so it writes none --
        train_stats = total_packing_stats(loader_state["stats"], device)
        if not stopped:
            print0(f"Peak memory usage: {peak_memory_mib(device_type):.2f}MiB")
            print0(f"Total training time: {state.total_training_time / 60:.2f}m")
            print0(f"Minimum validation bpb: {state.min_val_bpb:.4f}")
            padding_fraction = train_stats["padding"] / max(train_stats["tokens"], 1)
            print0(f"Packing: {train_stats['conversations']:,} conversations rendered, {train_stats['truncated']:,} "
                   f"truncated to fit {T + 1} tokens, {train_stats['skipped']:,} skipped (no assistant token left), "
                   f"padding {100 * padding_fraction:.2f}% of row tokens")
            if state.zero_supervised_steps:
                print0(f"Steps skipped for having no supervised tokens: {state.zero_supervised_steps}")
        if not stopped and not args.dry_run:
            stats = {"Training mixture": mixture_description,
                     "Unavailable mixture parts": "; ".join(unavailable) if unavailable else "none",
                     "Training rows": len(train_dataset), "Number of iterations": state.step,
                     "DDP world size": world_size, "Minimum validation bpb": state.min_val_bpb,
                     "Final validation loss": state.val_loss,
                     "Final validation bpb": format_bpb(val.bpb, val.se, val.tokens, digits=4),
                     "Conversations truncated to fit": train_stats["truncated"],
                     "Conversations skipped (no assistant token after truncation)": train_stats["skipped"],
                     "Padding fraction": padding_fraction, "Total training time (m)": state.total_training_time / 60}
            if state.chatcore is not None:  # (--chatcore-every=-1: no ChatCORE ran)
                stats["ChatCORE during SFT"] = state.chatcore
            report = get_report()
            report.log(section="Chat SFT", data=[user_config, stats])
            report.log_history("chat-sft", state.history)
        wandb_run.finish()
    finally:  # also after an error or a divergence: an in-process caller gets its handlers and GC back
        restore_signal_handlers()
        release_gc()
        compute_cleanup()
    # what the run measured, for an in-process caller (the tests)
    return dict(step=state.step, val_bpb=state.val_bpb, val_loss=state.val_loss, min_val_bpb=state.min_val_bpb,
                chatcore=state.chatcore, stats=train_stats, history=state.history, stopped=stopped)


if __name__ == "__main__":
    run(main)
