"""
The chat benchmarks: which tasks exist, how a model is scored on each (categorical or generative), and ChatCORE.
Used by scripts/chat_eval.py and by chat_sft's periodic evaluation. Every accuracy comes with the number of problems
it covers, from which its standard error follows (nanochat.core_eval.accuracy_se), and ChatCORE's from those.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import DownloadError, get_dist_info, is_ddp_initialized, print0
from nanochat.core_eval import accuracy_se
from nanochat.errors import NanochatError
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# -----------------------------------------------------------------------------
# The tasks, and the chance-level accuracy that ChatCORE centers each one on

TASK_BUILDERS = {
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}
ALL_TASKS = list(TASK_BUILDERS)
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
# ChatCORE is over all six tasks; the 5-task variant (no SpellingBee) is the one other published runs report
CHATCORE_VARIANTS = {"ChatCORE metric": ALL_TASKS, "ChatCORE-5 metric": [t for t in ALL_TASKS if t != "SpellingBee"]}


class TaskUnavailable(NanochatError):
    """The task's data could not be loaded (offline and not cached, or no local copy)."""

# -----------------------------------------------------------------------------
# Evaluation loops

def final_accuracy(num_passed, total, device):
    """Sum the counts over ranks (when distributed), print the final line, return (accuracy, problems)."""
    if is_ddp_initialized():
        counts = torch.tensor([num_passed, total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        num_passed, total = counts.tolist()
    print0(f"Final: {num_passed}/{total} ({100 * num_passed / max(total, 1):.2f}%)")
    return num_passed / max(total, 1), total


def run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None, rows=32):
    """pass@num_samples over the problems, decoded together: up to `rows` sequences (problems x samples) share every
    forward, and a problem's rows go to the next problem as soon as they end."""
    _, rank, _, world_size = get_dist_info()
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    conversations = [task_object[i] for i in range(rank, num_problems, world_size)]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    num_passed, total = 0, 0
    # Engine's default seed (42) for every problem makes the evaluation deterministic even at temperature > 0
    for index, results, _ in engine.generate_many(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                                  temperature=temperature, top_k=top_k, max_rows=rows):
        completions = [tokenizer.decode(result[len(prompts[index]):]) for result in results]
        num_passed += int(any(task_object.evaluate(conversations[index], completion) for completion in completions))
        total += 1
        print(f"\r\033[KRank {rank} | {num_passed}/{total} ({100 * num_passed / total:.2f}%)", end="", flush=True)
    print()
    print0("=" * 50)
    return final_accuracy(num_passed, total, model.get_device())


def run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=None):
    _, rank, _, world_size = get_dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    num_passed, total = 0, 0
    for i0 in range(rank * batch_size, num_problems, world_size * batch_size):  # rank r takes batches r, r+W, ...
        conversations = [task_object[i] for i in range(i0, min(i0 + batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        # right-pad with BOS: attention is causal, so padding after the answer position changes nothing
        max_length = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (max_length - len(p)) for p in prompts], dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(ids)  # (B, T, V)
        for idx, conversation in enumerate(conversations):
            letters = conversation["letters"]
            letter_ids = [tokenizer.encode(letter)[0] for letter in letters]  # each letter is a single token
            focus = logits[idx, len(prompts[idx]) - 1, letter_ids]  # at the last prompt token
            predicted_letter = letters[focus.argmax(dim=-1).item()]
            num_passed += int(bool(task_object.evaluate(conversation, predicted_letter)))
            total += 1
    return final_accuracy(num_passed, total, device)


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, rows=32):
    """(accuracy, problems) of the model on one task (raises TaskUnavailable when its data cannot be had)."""
    try:
        task_object = TASK_BUILDERS[task_name]()
    except (OSError, DownloadError, NanochatError) as e:
        # an unreachable hub or a missing local copy (TaskDataError): the loader's message says what is missing
        raise TaskUnavailable(str(e).strip() or type(e).__name__) from e
    if task_object.eval_type == "generative":
        return run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens,
                                   temperature, top_k, max_problems=max_problems, rows=rows)
    return run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=max_problems)


def run_chat_evals(task_names, model, tokenizer, engine, max_problems=None, **kwargs):
    """({task: (accuracy, problems)}, [tasks skipped because their data is unavailable]) over task_names, with a line
    per task.
    max_problems: one cap for every task, or {task: cap}; kwargs go to run_chat_eval."""
    results, skipped = {}, []
    for task_name in task_names:
        print0(f"Evaluating {task_name} ...")
        cap = max_problems.get(task_name) if isinstance(max_problems, dict) else max_problems
        try:
            results[task_name] = run_chat_eval(task_name, model, tokenizer, engine, max_problems=cap, **kwargs)
        except TaskUnavailable as e:
            print0(f"SKIPPED {task_name}: its data is not available ({e})")
            skipped.append(task_name)
            continue
        print0(f"{task_name} accuracy: {format_accuracy(*results[task_name])}")
    return results, skipped


def format_accuracy(accuracy, problems):
    """'0.2500 ± 0.0306 (200 examples)'"""
    return f"{accuracy:.4f} ± {accuracy_se(accuracy, problems):.4f} ({problems:,} examples)"


def chatcore_from_results(results, task_names=ALL_TASKS):
    """(value, standard error, label): the mean centered accuracy over those of task_names that ran, labelled "full"
    or "partial (k/n tasks)"; (None, None, "no task evaluated") when none of them ran. Centering is linear, so a task's
    centered SE is its accuracy SE / (1 - chance); tasks are scored on different problems, so their errors are
    independent and the mean's SE is the root of the summed variances over the number of tasks."""
    ran = [t for t in task_names if t in results]
    if not ran:
        return None, None, "no task evaluated"
    value = sum((results[t][0] - BASELINES[t]) / (1.0 - BASELINES[t]) for t in ran) / len(ran)
    se = math.sqrt(sum((accuracy_se(*results[t]) / (1.0 - BASELINES[t])) ** 2 for t in ran)) / len(ran)
    label = "full" if len(ran) == len(task_names) else f"partial ({len(ran)}/{len(task_names)} tasks)"
    return value, se, label


def chatcore_lines(results, requested=ALL_TASKS):
    """{"ChatCORE metric": "0.1234 ± 0.0101 (1,500 examples)", "ChatCORE-5 metric": "0.1000 ± 0.0120 partial (4/5
    tasks; 800 examples)"} for each variant whose tasks were all requested (a skipped task makes it partial), so a
    partial value is never mistaken for a full one."""
    lines = {}
    for key, task_names in CHATCORE_VARIANTS.items():
        if not set(task_names) <= set(requested):
            continue
        value, se, label = chatcore_from_results(results, task_names)
        if value is None:
            lines[key] = f"n/a ({label})"
            continue
        examples = f"{sum(results[t][1] for t in task_names if t in results):,} examples"
        details = f"({examples})" if label == "full" else f"{label[:-1]}; {examples})"
        lines[key] = f"{value:.4f} ± {se:.4f} {details}"
    return lines
