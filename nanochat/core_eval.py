"""
CORE evaluation (the DCLM paper's "core" metric): in-context-learning tasks scored by a base model.

Three task types, all scored by teacher-forced likelihood of the model on the prompt tokens:
- multiple_choice: one prompt per answer choice; pick the choice with the lowest mean loss on its answer tokens.
- schema: one prompt per context option, all ending in the same continuation; pick the context under which the
  continuation has the lowest mean loss.
- language_modeling: one prompt with the continuation; correct iff greedy argmax reproduces every continuation token.

Prompt strings, few-shot sampling seeds, shuffling seed, which tokens are scored and the centered accuracy match
the published CORE setup, so our numbers are comparable with published CORE scores. Inputs on which that setup would
crash or return NaN are handled where marked "(robustness)"; those changes leave every other input's score as is.

The model is anything callable as model(idx) -> logits (B, T, V); the tokenizer needs encode(list, prepend=id) and
get_bos_token_id().
"""

import csv
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import atomic_write, is_ddp_initialized, iter_jsonl, print0
from nanochat.eval_bundle import BundleError, resolve_bundle_dir

# The 22 tasks that define CORE (DCLM "core", minus MMLU). A run that evaluates fewer is a partial score.
CORE_TASK_LABELS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa", "commonsense_qa",
    "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande", "bigbench_dyck_languages",
    "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators", "bigbench_repeat_copy_logic", "squad", "coqa",
    "boolq", "bigbench_language_identification",
)
SHUFFLE_SEED = 1337      # every task's example list is shuffled with this seed (even when not truncated)
FEWSHOT_SEED_BASE = 1234  # item idx draws its few-shot examples with random.Random(1234 + idx)

# -----------------------------------------------------------------------------
# Prompt rendering: the exact strings of the published CORE prompt templates.
# Few-shot examples come first, each followed by a blank line. No BOS here (it is prepended as a token id).


def render_prompts_mc(item, continuation_delimiter, fewshot_examples):
    """One prompt per choice: [ex.query D ex.gold_choice \\n\\n]* item.query D choice."""
    prefix = "".join(f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_examples)
    return [f"{prefix}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples):
    """One prompt per context option: [ex.gold_context D ex.continuation \\n\\n]* option D item.continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}\n\n"
                     for ex in fewshot_examples)
    return [f"{prefix}{option}{continuation_delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples):
    """Two prompts: without and with the continuation. The "without" prompt is stripped as a whole, so a trailing
    space/newline of the delimiter moves onto the first continuation token (e.g. "ctx\\nAnswer:" vs "ctx\\nAnswer: x")."""
    prefix = "".join(f"{ex['context'].strip()}{continuation_delimiter}{ex['continuation']}\n\n" for ex in fewshot_examples)
    context = item["context"].strip()
    without = f"{prefix}{context}{continuation_delimiter}".strip()
    with_cont = f"{prefix}{context}{continuation_delimiter}{item['continuation']}"
    return [without, with_cont]


# -----------------------------------------------------------------------------
# Which tokens are scored. Each function returns (token lists to run, start indices, end indices): the scored tokens of
# sequence i are tokens[i][start_i:end_i], predicted by the logits at positions start_i-1 .. end_i-2.


def common_prefix_length(seqs):
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def batch_sequences_mc(tokenizer, prompts):
    """Score only the tokens where the choices differ: from the end of their longest common token prefix."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    start = common_prefix_length(tokens)
    # (robustness) if one choice is a token-prefix of another (or two choices are identical), its span would be empty
    # (mean of nothing = NaN). Back the shared start up so every choice scores >= 1 token.
    start = max(1, min(start, min(len(t) for t in tokens) - 1))
    return tokens, [start] * len(tokens), [len(t) for t in tokens]


def batch_sequences_schema(tokenizer, prompts):
    """Score only the shared continuation: the longest common token suffix, under each context."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    suffix = common_prefix_length([t[::-1] for t in tokens])  # the longest common suffix
    # (robustness) keep the span non-empty and never reaching the BOS token.
    suffix = max(1, min(suffix, min(len(t) for t in tokens) - 1))
    return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]


def batch_sequences_lm(tokenizer, prompts):
    """Score the continuation: the tokens of "with" beyond the tokens of "without". Only "with" is run."""
    without, with_cont = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(without), len(with_cont)
    if not (start < end and with_cont[:start] == without):
        # (robustness) BPE merged across the context/continuation boundary: score from the end of the two sequences'
        # common prefix instead, keeping at least one scored token.
        start = max(1, min(common_prefix_length([without, with_cont]), end - 1))
    return [with_cont], [start], [end]


def model_max_length(model):
    """Longest sequence the model can take, or None if unlimited/unknown: max_seq_len (the HF GPT-2 wrapper), or
    (robustness) the rotary table length of a nanochat GPT, which long few-shot prompts would overrun."""
    cos = getattr(model, "cos", None)
    return getattr(model, "max_seq_len", None) or (cos.size(1) if isinstance(cos, torch.Tensor) else None)


def crop_sequences(tokens, start_idxs, end_idxs, max_len):
    """Keep the LAST max_len tokens of over-long sequences and shift their scored span accordingly."""
    crops = [max(0, len(t) - max_len) for t in tokens]
    # (robustness) the scored span needs its predicting position inside the window: start >= 1
    starts = [max(s - crop, 1) for s, crop in zip(start_idxs, crops)]
    ends = [e - crop for e, crop in zip(end_idxs, crops)]
    assert all(s < e for s, e in zip(starts, ends)), "scored span does not fit in the model's context window"
    return [t[crop:] for t, crop in zip(tokens, crops)], starts, ends


def stack_sequences(tokens, pad_token_id):
    """Right-pad to the longest sequence. Padding is never inside a scored span and attention is causal, so no mask."""
    seq_len = max(len(t) for t in tokens)
    input_ids = torch.full((len(tokens), seq_len), pad_token_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        input_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return input_ids


@torch.no_grad()
def forward_model(model, input_ids):
    """Per-position loss of predicting the next token, and the argmax predictions. Last column's loss is NaN."""
    logits = model(input_ids).float()
    batch_size, seq_len, vocab_size = logits.shape
    target_ids = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(-1, vocab_size), target_ids.view(-1), reduction="none").view(batch_size, seq_len)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


# -----------------------------------------------------------------------------
# One item, one task


def sample_fewshot(data, idx, num_fewshot):
    """The published few-shot draw, in its order: random.Random(1234 + idx).sample(all indices but idx, k)."""
    # (robustness) with a tiny --max-per-task there may be fewer other items than shots: use as many as there are.
    num_fewshot = min(num_fewshot, len(data) - 1)
    rng = random.Random(FEWSHOT_SEED_BASE + idx)
    candidates = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(candidates, num_fewshot)]


# task type -> (prompt renderer, scored-token selection, the fields every item of its data files must have)
TASK_TYPES = {
    "multiple_choice": (render_prompts_mc, batch_sequences_mc, ("query", "choices", "gold")),
    "schema": (render_prompts_schema, batch_sequences_schema, ("context_options", "continuation", "gold")),
    "language_modeling": (render_prompts_lm, batch_sequences_lm, ("context", "continuation")),
}


def prepare_example(idx, model, tokenizer, data, task_meta):
    """Render and tokenize item idx -> (tokens, start_idxs, end_idxs), cropped to the model's window."""
    render, batch_sequences, _ = TASK_TYPES[task_meta["task_type"]]
    fewshot = sample_fewshot(data, idx, task_meta["num_fewshot"])
    prompts = render(data[idx], task_meta.get("continuation_delimiter", " "), fewshot)
    tokens, starts, ends = batch_sequences(tokenizer, prompts)
    max_len = model_max_length(model)
    if max_len is not None:
        tokens, starts, ends = crop_sequences(tokens, starts, ends, max_len)
    return tokens, starts, ends


def score_example(idx, model, tokenizer, data, device, task_meta):
    """Run item idx. Returns (is_correct, per-sequence mean losses) (losses are None for language_modeling)."""
    tokens, starts, ends = prepare_example(idx, model, tokenizer, data, task_meta)
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)
    losses, predictions = forward_model(model, input_ids)
    if task_meta["task_type"] == "language_modeling":
        # teacher-forced greedy exact match == greedy decoding reproduces the continuation
        s, e = starts[0], ends[0]
        return bool(torch.equal(predictions[0, s - 1 : e - 1], input_ids[0, s:e])), None
    mean_losses = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    predicted_idx = mean_losses.index(min(mean_losses))  # first on ties
    return predicted_idx == data[idx]["gold"], mean_losses


def evaluate_task(model, tokenizer, data, device, task_meta):
    """Accuracy over data (already shuffled/truncated). Under torch.distributed rank r scores items r, r+W, ... and
    the 0/1 results are summed across ranks, so every rank returns the same accuracy."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if is_ddp_initialized() else (0, 1)
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        correct[idx] = float(score_example(idx, model, tokenizer, data, device, task_meta)[0])
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)  # a collective: it also waits for every rank
    return correct.mean().item()


def shuffle_and_truncate(data, max_per_task=-1):
    """Per-task preparation: shuffle with Random(1337) always, then keep the first max_per_task."""
    data = list(data)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered_accuracy(accuracy, random_baseline_percent):
    """Accuracy rescaled so that random guessing is 0 and perfect is 1."""
    rb = 0.01 * random_baseline_percent
    return (accuracy - rb) / (1.0 - rb)


def core_metric(centered_results):
    """CORE = arithmetic mean of the tasks' centered accuracies."""
    values = list(centered_results.values())
    return sum(values) / len(values) if values else float("nan")


def accuracy_se(accuracy, n):
    """Standard error of an accuracy over n examples (correct or not: a binomial count), as the half-width of the
    Wilson score interval at one sigma: (sqrt(c (n - c) / n + 1/4)) / (n + 1) for c correct. For large n it is the
    usual sqrt(p (1 - p) / n); unlike that, it stays positive at 0/n and n/n (which n examples cannot prove exact),
    e.g. 1/4 for one example right or wrong."""
    correct = accuracy * n
    return math.sqrt(correct * (n - correct) / n + 0.25) / (n + 1)


def core_metric_se(centered_ses):
    """Standard error of CORE from the tasks' centered standard errors (each task's accuracy SE / (1 - baseline), the
    centering being linear). Tasks are scored on different examples, so their errors are independent and the variance
    of their mean is the sum of their variances over the number of tasks squared."""
    values = list(centered_ses.values())
    return math.sqrt(sum(se * se for se in values)) / len(values) if values else float("nan")


def core_label(labels, max_per_task=-1):
    """"full (22/22 tasks)" or "partial (k/22 tasks)", plus "; N per task" when tasks were cut to N examples, so a
    partial or subsampled score is never mistaken for a full one."""
    k = len(set(labels) & set(CORE_TASK_LABELS))
    per_task = f"; {max_per_task} per task" if max_per_task > 0 else ""
    return f"{'full' if k == len(CORE_TASK_LABELS) else 'partial'} ({k}/{len(CORE_TASK_LABELS)} tasks{per_task})"

# -----------------------------------------------------------------------------
# Reading the bundle

# Two of the GPT-2 results tables that ship with the bundle: the smallest and the largest GPT-2
GPT2_TABLES = {"openai-community-gpt2.csv": "GPT-2 124M", "openai-community-gpt2-xl.csv": "GPT-2 1.5B"}


def load_jsonl(path, task_type):
    """Read one task's examples, checking every line; a bad line is an error naming file and line."""
    data = []
    for lineno, item in iter_jsonl(path, BundleError, hint="; repair the file or re-download the eval bundle"):
        missing = [k for k in TASK_TYPES[task_type][2] if not isinstance(item, dict) or k not in item]
        if missing:
            raise BundleError(f"{path}:{lineno}: {task_type} item lacks field(s) {', '.join(missing)}; "
                              f"repair the file or re-download the eval bundle")
        options = item.get("choices", item.get("context_options"))
        if "gold" in item and not (isinstance(item["gold"], int) and 0 <= item["gold"] < len(options)):
            raise BundleError(f"{path}:{lineno}: gold={item['gold']!r} is not a valid option index")
        data.append(item)
    if not data:
        raise BundleError(f"{path}: no examples in file; re-download the eval bundle")
    return data


def load_core_tasks(bundle_dir):
    """-> (tasks, skipped). tasks: list of (label, task_meta, data_path, random_baseline) whose files exist;
    skipped: list of (label, reason). Reads and checks core.yaml but not the data files."""
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    try:
        with open(yaml_path, "r", encoding="utf-8") as f:
            task_list = yaml.safe_load(f)["icl_tasks"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise BundleError(f"{yaml_path}: cannot read the task list ({e}); re-download the eval bundle") from None
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    if not os.path.isfile(meta_path):
        raise BundleError(f"{meta_path} is missing; the bundle is incomplete (re-download it)")
    with open(meta_path, "r", encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks, skipped = [], []
    for task in task_list:
        label = task["label"]
        task_meta = {"task_type": task["icl_task_type"], "dataset_uri": task["dataset_uri"],
                     "num_fewshot": task["num_fewshot"][0],
                     "continuation_delimiter": task.get("continuation_delimiter", " ")}
        if task_meta["task_type"] not in TASK_TYPES:
            raise BundleError(f"{yaml_path}: task {label} has unknown icl_task_type {task_meta['task_type']!r}")
        data_path = os.path.join(bundle_dir, "eval_data", task_meta["dataset_uri"])
        if not os.path.isfile(data_path):
            skipped.append((label, f"missing file eval_data/{task_meta['dataset_uri']}"))
        elif label not in baselines:
            skipped.append((label, "no random baseline in eval_meta_data.csv"))
        else:
            tasks.append((label, task_meta, data_path, baselines[label]))
    return tasks, skipped


def gpt2_targets(bundle_dir, labels):
    """{"GPT-2 124M": CORE over exactly `labels`, ...} from the bundle's GPT-2 results tables, so a partial CORE can
    be compared with GPT-2 on the same tasks. A table lacking one of the labels is left out."""
    targets = {}
    for file_name, name in GPT2_TABLES.items():
        path = os.path.join(bundle_dir, file_name)
        if not os.path.isfile(path):
            continue
        with open(path, "r", encoding="utf-8") as f:
            rows = [[cell.strip() for cell in line.split(",")] for line in f if line.strip()]
        centered = {row[0]: float(row[2]) for row in rows[1:] if len(row) == 3 and row[0] in labels}
        if labels and len(centered) == len(set(labels)):
            targets[name] = core_metric(centered)
    return targets


# -----------------------------------------------------------------------------
# CORE (used by base_eval and by base_train's --core-metric-every)


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None):
    """Run every available CORE task. Returns dict(results, centered_results, centered_se, num_examples, core_metric,
    core_metric_se, num_tasks, total_tasks, skipped, partial, subsampled, core_label, gpt2_targets): per task its
    accuracy, centered accuracy with its standard error and number of examples. Missing tasks are skipped and named;
    CORE is then the mean over the rest, `partial` is True and gpt2_targets holds GPT-2's CORE on the same tasks (all
    their examples).
    `subsampled`: max_per_task cut the tasks. All ranks must call this together under torchrun; all get the same
    numbers."""
    bundle_dir = resolve_bundle_dir(bundle_dir)
    tasks, skipped = load_core_tasks(bundle_dir)
    for label, reason in skipped:
        print0(f"Skipping task {label}: {reason}")
    # read and check every file first, so a corrupt line stops us before any model work
    prepared = [(label, task_meta, shuffle_and_truncate(load_jsonl(data_path, task_meta["task_type"]), max_per_task),
                 baseline) for label, task_meta, data_path, baseline in tasks]
    results, centered_results, centered_se, num_examples = {}, {}, {}, {}
    for label, task_meta, data, baseline in prepared:
        t0 = time.time()
        print0(f"Evaluating: {label} ({task_meta['num_fewshot']}-shot, type: {task_meta['task_type']})... ", end="")
        accuracy = evaluate_task(model, tokenizer, data, device, task_meta)
        results[label], centered_results[label] = accuracy, centered_accuracy(accuracy, baseline)
        se, num_examples[label] = accuracy_se(accuracy, len(data)), len(data)
        centered_se[label] = se / (1.0 - 0.01 * baseline)
        print0(f"accuracy: {accuracy:.4f} ± {se:.4f} ({len(data)} examples) | centered: {centered_results[label]:.4f} "
               f"| time: {time.time() - t0:.2f}s")
    labels = list(results)
    partial = not set(CORE_TASK_LABELS) <= set(labels)
    return dict(results=results, centered_results=centered_results, centered_se=centered_se, num_examples=num_examples,
                core_metric=core_metric(centered_results), core_metric_se=core_metric_se(centered_se),
                num_tasks=len(labels), total_tasks=len(CORE_TASK_LABELS), skipped=[label for label, _ in skipped],
                partial=partial, subsampled=max_per_task > 0, core_label=core_label(labels, max_per_task),
                gpt2_targets=gpt2_targets(bundle_dir, labels) if partial else {})


def format_core(out):
    """'0.2219 ± 0.0031 (9,000 examples)' for a full score; '0.1234 ± 0.0210 partial (20/22 tasks; 16 per task; 320
    examples; same tasks: GPT-2 124M 0.1157, ...)' otherwise. (Results saved before CORE had a standard error lack it
    and the count.)"""
    value = f"{out['core_metric']:.4f}"
    if "core_metric_se" in out:
        value += f" ± {out['core_metric_se']:.4f}"
    details = [f"{sum(out['num_examples'].values()):,} examples"] if "num_examples" in out else []
    if not (out["partial"] or out["subsampled"]):
        return f"{value} ({details[0]})" if details else value
    targets = ", ".join(f"{name} {score:.4f}" for name, score in out.get("gpt2_targets", {}).items())
    details += [f"same tasks: {targets}"] if targets else []
    return f"{value} {out['core_label'][:-1]}{''.join('; ' + d for d in details)})"


def write_core_csv(path, out):
    """The padded results table: Task, Accuracy, Centered (as in the bundle's GPT-2 tables), then the centered
    accuracy's standard error and the number of examples; skipped tasks marked; the CORE row, then for a partial
    score GPT-2's CORE on the same tasks."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}, {'SE':<10}, {'Examples':<10}"]
    for label in out["results"]:
        lines.append(f"{label:<35}, {out['results'][label]:<10.6f}, {out['centered_results'][label]:<10.6f}, "
                     f"{out['centered_se'][label]:<10.6f}, {out['num_examples'][label]:<10}")
    for label in out["skipped"]:
        lines.append(f"{label:<35}, {'skipped':<10}, {'skipped':<10}, {'':<10}, {'':<10}")
    core_row = f"CORE {out['core_label']}" if out["partial"] or out["subsampled"] else "CORE"
    num_examples = sum(out["num_examples"].values())
    lines.append(f"{core_row:<35}, {'':<10}, {out['core_metric']:<10.6f}, {out['core_metric_se']:<10.6f}, "
                 f"{num_examples:<10}")
    for name, target in out.get("gpt2_targets", {}).items():  # what GPT-2 scores on the same (partial) task set
        lines.append(f"{name + ' same tasks':<35}, {'':<10}, {target:<10.6f}, {'':<10}, {'':<10}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
