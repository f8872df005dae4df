"""
Evaluate a chat model on the chat benchmarks and compute ChatCORE.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Two kinds of task:
- categorical (ARC, MMLU): one forward pass per batch, the answer is the argmax over the letters' logits at the
  <|assistant_start|> position, so the model always answers with a valid letter;
- generative (GSM8K, HumanEval, SpellingBee): sample completions with the Engine, a problem passes if any of the
  -n samples is correct (pass@n).

ChatCORE = mean over the default tasks of (accuracy - chance) / (1 - chance): 0 is chance, 1 is perfect.
A task whose data cannot be had (e.g. offline, nothing cached) is skipped with a line saying so, and ChatCORE is
then printed and logged as partial (k/6 tasks) so it is never mistaken for a full score.
"""

import os
import argparse

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, get_dist_info, print0, autodetect_device_type,
                             get_base_dir, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON)

# -----------------------------------------------------------------------------
# Task registry. Constructors are imported lazily so that a missing optional dependency of one task cannot stop
# the others. Chance-level accuracy is the baseline that ChatCORE centers on.

def _build_task(task_name):
    if task_name == "ARC-Easy":
        from tasks.arc import ARC
        return ARC(subset="ARC-Easy", split="test")
    if task_name == "ARC-Challenge":
        from tasks.arc import ARC
        return ARC(subset="ARC-Challenge", split="test")
    if task_name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if task_name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if task_name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    if task_name == "SpellingBee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")
    raise ValueError(f"unknown task {task_name!r}; choose from {', '.join(ALL_TASKS)}")

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}


class TaskUnavailable(RuntimeError):
    """The task's data could not be loaded (offline and not cached, or no local copy)."""


def load_task(task_name):
    """Construct a task, turning "cannot get the data" into TaskUnavailable (with the loader's own message)."""
    if task_name not in BASELINES:
        raise ValueError(f"unknown task {task_name!r}; choose from {', '.join(ALL_TASKS)}")
    try:
        return _build_task(task_name)
    except (ImportError, OSError, RuntimeError, SystemExit) as e:
        # Task loaders raise on unreachable hub / missing local copy; SystemExit is the project's "clear error" style.
        message = str(e).strip() or type(e).__name__
        raise TaskUnavailable(message) from e

# -----------------------------------------------------------------------------
# Evaluation loops

def _all_reduce_counts(*counts, device):
    """Sum integer counters over ranks (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tuple(int(x) for x in t.tolist())


def run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None):
    ddp, rank, _, world_size = get_dist_info()
    device = model.get_device()
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    num_passed, total = 0, 0
    for i in range(rank, num_problems, world_size):
        conversation = task_object[i]
        prompt_tokens = tokenizer.render_for_completion(conversation)
        # Engine's default seed (42) makes the evaluation deterministic even at temperature > 0
        results, _ = engine.generate_batch(prompt_tokens, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        prefix_length = len(prompt_tokens)
        completions = [tokenizer.decode(result[prefix_length:]) for result in results]
        outcomes = [task_object.evaluate(conversation, completion) for completion in completions]
        passed = any(outcomes)
        total += 1
        num_passed += int(passed)
        print(f"\r\033[KRank {rank} | {num_passed}/{total} ({100 * num_passed / total:.2f}%)", end="", flush=True)
    print()
    num_passed, total = _all_reduce_counts(num_passed, total, device=device)
    print0("=" * 50)
    print0(f"Final: {num_passed}/{total} ({100 * num_passed / max(total, 1):.2f}%)")
    return num_passed / max(total, 1)


def run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=None):
    ddp, rank, _, world_size = get_dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    num_batches = -(-num_problems // batch_size)
    letter_to_id_cache = {}
    num_passed, total = 0, 0
    for b in range(rank, num_batches, world_size):
        i0, i1 = b * batch_size, min((b + 1) * batch_size, num_problems)
        conversations = [task_object[ii] for ii in range(i0, i1)]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        # right-pad with BOS: attention is causal, so padding after the answer position changes nothing
        max_length = max(len(p) for p in prompts)
        answer_positions = [len(p) - 1 for p in prompts]
        padded = [p + [bos] * (max_length - len(p)) for p in prompts]
        ids = torch.tensor(padded, dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(ids)  # (B, T, V)
        for idx, conversation in enumerate(conversations):
            letters = conversation["letters"]
            letter_ids = []
            for letter in letters:
                if letter not in letter_to_id_cache:
                    encoded = tokenizer.encode(letter)
                    assert len(encoded) == 1, f"answer letter {letter!r} is not a single token"
                    letter_to_id_cache[letter] = encoded[0]
                letter_ids.append(letter_to_id_cache[letter])
            focus = logits[idx, answer_positions[idx], letter_ids]
            predicted_letter = letters[focus.argmax(dim=-1).item()]
            num_passed += int(bool(task_object.evaluate(conversation, predicted_letter)))
            total += 1
    num_passed, total = _all_reduce_counts(num_passed, total, device=device)
    print0(f"Final: {num_passed}/{total} ({100 * num_passed / max(total, 1):.2f}%)")
    return num_passed / max(total, 1)


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None):
    """Accuracy of the model on one task (raises TaskUnavailable when its data cannot be had)."""
    task_object = load_task(task_name)
    if task_object.eval_type == "generative":
        return run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens,
                                   temperature, top_k, max_problems=max_problems)
    if task_object.eval_type == "categorical":
        return run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=max_problems)
    raise ValueError(f"task {task_name} has unsupported eval_type {task_object.eval_type!r}")


def chatcore_from_results(results, skipped, task_names=ALL_TASKS):
    """(value, label): mean centered accuracy over the default tasks that ran; label says 'partial k/n' if some
    were skipped, or (None, reason) when the requested list is not the default one."""
    ran = [t for t in task_names if t in results]
    if not ran:
        return None, "no task evaluated"
    centered = [(results[t] - BASELINES[t]) / (1.0 - BASELINES[t]) for t in ran]
    value = sum(centered) / len(centered)
    if len(ran) == len(task_names):
        return value, "full"
    return value, f"(partial: {len(ran)}/{len(task_names)} tasks)"

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

# -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee")
    # which model
    parser.add_argument("-i", "--source", type=str, required=True, help="checkpoint family: sft|rl|base (mid: legacy)")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to load (default: largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step to load (default: last)")
    # what to evaluate
    parser.add_argument("-a", "--task-name", type=str, default=None,
                        help=f"task(s) joined with '|' (default: all of {'|'.join(ALL_TASKS)})")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="cap on problems per task")
    # sampling (generative tasks)
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="max tokens generated per sample")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (pass@n)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0 disables)")
    # batching and runtime
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size of the categorical evaluation")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("-d", "--dtype", type=str, default=None, choices=["float32", "bfloat16", "float16"],
                        help="legacy flag: the compute dtype is chosen in nanochat.common (set NANOCHAT_DTYPE)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be >= 1")
    if args.max_problems is not None and args.max_problems < 1:
        parser.error("--max-problems must be >= 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    task_names = ALL_TASKS if args.task_name is None else [t.strip() for t in args.task_name.split("|") if t.strip()]
    unknown = [t for t in task_names if t not in BASELINES]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)} in -a/--task-name; choose from {'|'.join(ALL_TASKS)}")
    check_checkpoint_exists(args.source, args.model_tag, args.step)

    from nanochat.engine import Engine
    from nanochat.report import get_report

    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    if args.dtype is not None and getattr(torch, args.dtype) != COMPUTE_DTYPE:
        print0(f"NOTE: --dtype={args.dtype} is ignored; the compute dtype is {COMPUTE_DTYPE} (set NANOCHAT_DTYPE to change it)")

    model, tokenizer, meta = load_model_or_exit(args.source, device, phase="eval", model_tag=args.model_tag,
                                                step=args.step)
    engine = Engine(model, tokenizer)

    results, skipped = {}, []
    for task_name in task_names:
        print0(f"Evaluating {task_name} ...")
        try:
            accuracy = run_chat_eval(task_name, model, tokenizer, engine, batch_size=args.batch_size,
                                     num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     max_problems=args.max_problems)
        except TaskUnavailable as e:
            print0(f"SKIPPED {task_name}: its data is not available ({e})")
            skipped.append(task_name)
            continue
        results[task_name] = accuracy
        print0(f"{task_name} accuracy: {100 * accuracy:.2f}%")

    # ChatCORE only makes sense over the default task list (a partial value is labelled as such)
    chatcore_line = None
    if args.task_name is None or set(task_names) == set(ALL_TASKS):
        value, label = chatcore_from_results(results, skipped)
        if value is None:
            print0(f"ChatCORE metric: n/a ({label})")
        elif label == "full":
            chatcore_line = f"{value:.4f}"
            print0(f"ChatCORE metric: {value:.4f}")
        else:
            chatcore_line = f"{value:.4f} {label}"
            print0(f"ChatCORE metric: {value:.4f} {label} -- skipped: {', '.join(skipped)}")
    if skipped:
        print0(f"Tasks skipped because their data is unavailable: {', '.join(skipped)}")

    # Skipped tasks appear under their own name (the report's summary table picks rows by task name), and the
    # ChatCORE line names no task for the same reason.
    task_lines = {t: (results[t] if t in results else "skipped (data unavailable)") for t in task_names}
    report_data = [vars(args), task_lines]
    if chatcore_line is not None:
        report_data.append({"ChatCORE metric": chatcore_line})
    get_report().log(section=f"Chat evaluation {args.source}", data=report_data)
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
