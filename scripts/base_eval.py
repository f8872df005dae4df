"""
Evaluate a base model: prompt samples, bits per byte on the train/val splits, and the CORE metric.

Examples:
    python -m scripts.base_eval                                   # everything, latest base checkpoint
    python -m scripts.base_eval --eval=core --max-per-task=16     # quick partial CORE
    python -m scripts.base_eval --bundle-dir=../shared/data/eval_bundle
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

The CORE eval bundle is found in this order: --bundle-dir, env NANOCHAT_EVAL_BUNDLE, <base_dir>/eval_bundle, else it is
downloaded (once, with a lock) to <base_dir>/eval_bundle.zip and unpacked. Tasks whose data files are missing are
skipped and named, and the score is then labelled "partial (k/22 tasks)".
Base training's --core-metric-every calls evaluate_core() from this file.
"""

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
import zipfile

import yaml

from nanochat.common import DownloadError, download_file_with_lock, get_base_dir, print0
from nanochat.core_eval import (
    CORE_TASK_LABELS, TASK_TYPES, centered_accuracy, core_label, core_metric, evaluate_task, is_full_core,
    shuffle_and_truncate,
)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_MODES = ("core", "bpb", "sample")
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
RULE = "=" * 80


class BundleError(RuntimeError):
    """The eval bundle is missing, unreadable or malformed. The message says which file and what to do."""


# -----------------------------------------------------------------------------
# Finding (or downloading) the eval bundle


def _bundle_ready(path):
    return os.path.isfile(os.path.join(path, "core.yaml"))


def _extract_bundle(zip_path):
    """Unpack the zip next to itself as <base>/eval_bundle, atomically (extract to a temp dir, then rename)."""
    target = os.path.join(os.path.dirname(zip_path), "eval_bundle")
    tmp_dir = tempfile.mkdtemp(prefix="eval_bundle_tmp_", dir=os.path.dirname(zip_path))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp_dir)
        source = os.path.join(tmp_dir, "eval_bundle")
        if not _bundle_ready(source):
            source = tmp_dir if _bundle_ready(tmp_dir) else None
        if source is None:
            raise BundleError(f"{zip_path} has no eval_bundle/core.yaml inside; delete it and run again to re-download")
        try:
            os.replace(source, target)
        except OSError:
            if not _bundle_ready(target):  # someone else's finished copy is fine; anything else is a real error
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print0(f"Placed eval bundle at {target}")


def resolve_bundle_dir(bundle_dir=None):
    """Return a directory holding core.yaml. Raises BundleError with a what-to-do message."""
    if not bundle_dir:
        bundle_dir = os.environ.get("NANOCHAT_EVAL_BUNDLE") or None
        source = "NANOCHAT_EVAL_BUNDLE"
    else:
        source = "--bundle-dir"
    if bundle_dir:
        if not _bundle_ready(bundle_dir):
            raise BundleError(f"{source}={bundle_dir}: no core.yaml there; point it at the unzipped eval_bundle folder")
        return os.path.abspath(bundle_dir)
    base_dir = get_base_dir()
    target = os.path.join(base_dir, "eval_bundle")
    if _bundle_ready(target):
        return target
    for attempt in range(2):
        try:
            zip_path = download_file_with_lock(EVAL_BUNDLE_URL, "eval_bundle.zip", postprocess_fn=_extract_bundle)
        except DownloadError as e:
            raise BundleError(
                f"CORE eval bundle not found at {target} and the download failed ({e}). Copy an unzipped eval_bundle "
                f"there, or pass --bundle-dir DIR / set NANOCHAT_EVAL_BUNDLE, or run without CORE (--eval=bpb,sample)"
            ) from None
        if _bundle_ready(target):
            return target
        # The zip exists but the folder does not (the reference never re-extracts in this case): unpack it now.
        try:
            _extract_bundle(zip_path)
            return target
        except zipfile.BadZipFile:
            print0(f"{zip_path} is not a valid zip; deleting it and downloading again")
            os.remove(zip_path)
    raise BundleError(f"could not obtain a valid eval bundle at {target}; delete {target}.zip and try again")


# -----------------------------------------------------------------------------
# Reading the bundle

REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


_JSONL_CACHE = {}  # (path, task_type) -> ((mtime, size), data): base_train calls evaluate_core many times


def load_jsonl(path, task_type):
    """Read one task's examples, checking every line; a bad line is an error naming file and line."""
    stat = os.stat(path)
    key, version = (os.path.abspath(path), task_type), (stat.st_mtime_ns, stat.st_size)
    cached = _JSONL_CACHE.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    data = _read_jsonl(path, task_type)
    _JSONL_CACHE[key] = (version, data)
    return data


def _read_jsonl(path, task_type):
    data = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise BundleError(f"{path}:{lineno}: corrupt JSON line ({e.msg}); repair the file or re-download "
                                  f"the eval bundle") from None
            missing = [k for k in REQUIRED_FIELDS[task_type] if not isinstance(item, dict) or k not in item]
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


def load_random_baselines(bundle_dir):
    path = os.path.join(bundle_dir, "eval_meta_data.csv")
    if not os.path.isfile(path):
        raise BundleError(f"{path} is missing; the bundle is incomplete (re-download it)")
    baselines = {}
    with open(path, "r", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (KeyError, TypeError, ValueError):
                continue
    return baselines


def load_core_tasks(bundle_dir):
    """-> (tasks, skipped). tasks: list of (label, task_meta, data_path, random_baseline) whose files exist;
    skipped: list of (label, reason). Reads and checks core.yaml but not the data files."""
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    try:
        with open(yaml_path, "r", encoding="utf-8") as f:
            config = yaml.safe_load(f)
        task_list = config["icl_tasks"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise BundleError(f"{yaml_path}: cannot read the task list ({e}); re-download the eval bundle") from None
    baselines = load_random_baselines(bundle_dir)
    tasks, skipped = [], []
    for task in task_list:
        label = task["label"]
        task_meta = {
            "task_type": task["icl_task_type"],
            "dataset_uri": task["dataset_uri"],
            "num_fewshot": task["num_fewshot"][0],
            "continuation_delimiter": task.get("continuation_delimiter", " "),
        }
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


# -----------------------------------------------------------------------------
# CORE


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None):
    """Run every available CORE task. Returns dict(results, centered_results, core_metric, num_tasks, total_tasks,
    skipped, partial, core_label). Missing tasks are skipped and named; CORE is then the mean over the rest and
    `partial` is True. All ranks must call this together under torchrun; all get the same numbers."""
    bundle_dir = resolve_bundle_dir(bundle_dir)
    tasks, skipped = load_core_tasks(bundle_dir)
    for label, reason in skipped:
        print0(f"Skipping task {label}: {reason}")
    # read and check every file first, so a corrupt line stops us before any model work
    cache = {}
    prepared = []
    for label, task_meta, data_path, baseline in tasks:
        if data_path not in cache:
            cache[data_path] = load_jsonl(data_path, task_meta["task_type"])
        prepared.append((label, task_meta, shuffle_and_truncate(cache[data_path], max_per_task), baseline))
    results, centered_results = {}, {}
    for label, task_meta, data, baseline in prepared:
        t0 = time.time()
        print0(f"Evaluating: {label} ({task_meta['num_fewshot']}-shot, type: {task_meta['task_type']})... ", end="")
        accuracy = evaluate_task(model, tokenizer, data, device, task_meta)
        centered = centered_accuracy(accuracy, baseline)
        results[label] = accuracy
        centered_results[label] = centered
        print0(f"accuracy: {accuracy:.4f} | centered: {centered:.4f} | time: {time.time() - t0:.2f}s")
    labels = list(results)
    return {
        "results": results,
        "centered_results": centered_results,
        "core_metric": core_metric(centered_results),
        "num_tasks": len(labels),
        "total_tasks": len(CORE_TASK_LABELS),
        "skipped": [label for label, _ in skipped],
        "partial": not is_full_core(labels),
        "core_label": core_label(labels),
    }


def format_core(out):
    """'0.2219' for a full score, '0.1234 partial (20/22 tasks)' otherwise."""
    value = f"{out['core_metric']:.4f}"
    return value if not out["partial"] else f"{value} {out['core_label']}"


def write_core_csv(path, out):
    """The reference's padded CSV: Task, Accuracy, Centered; skipped tasks marked; final CORE row."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label in out["results"]:
        lines.append(f"{label:<35}, {out['results'][label]:<10.6f}, {out['centered_results'][label]:<10.6f}")
    for label in out["skipped"]:
        lines.append(f"{label:<35}, {'skipped':<10}, {'skipped':<10}")
    core_row = "CORE" if not out["partial"] else f"CORE {out['core_label']}"
    lines.append(f"{core_row:<35}, {'':<10}, {out['core_metric']:<10.6f}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Command line


def parse_eval_modes(value):
    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown or not modes:
        raise SystemExit(f"error: --eval={value!r}: unknown mode(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose a comma-separated subset of {','.join(EVAL_MODES)}")
    return modes


def check_checkpoint_exists(model_tag, step):
    """One clear line, before any heavy work, when there is nothing to evaluate."""
    checkpoints_dir = os.path.join(get_base_dir(), "base_checkpoints")
    hint = "train one first with python -m scripts.base_train"
    if not os.path.isdir(checkpoints_dir) or not os.listdir(checkpoints_dir):
        raise SystemExit(f"error: no base model checkpoints in {checkpoints_dir}; {hint}")
    if model_tag is not None:
        tag_dir = os.path.join(checkpoints_dir, model_tag)
        if not os.path.isdir(tag_dir):
            raise SystemExit(f"error: --model-tag={model_tag}: no such directory {tag_dir} "
                             f"(available: {', '.join(sorted(os.listdir(checkpoints_dir)))})")
        if step is not None and not os.path.isfile(os.path.join(tag_dir, f"model_{step:06d}.pt")):
            raise SystemExit(f"error: --step={step}: no checkpoint {os.path.join(tag_dir, f'model_{step:06d}.pt')}")


def run_samples(model, tokenizer):
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    samples, unconditioned = [], []
    print0("\nConditioned samples:")
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=bos)
        results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        text = tokenizer.decode(results[0])
        print0("-" * 80)
        print0(text)
        samples.append(text)
    print0("\nUnconditioned samples:")
    results, _ = engine.generate_batch([bos], num_samples=8, max_tokens=128, temperature=1.0)
    for sample in results:
        text = tokenizer.decode(sample)
        print0("-" * 80)
        print0(text)
        unconditioned.append(text)
    return samples, unconditioned


def run_bpb(model, tokenizer, device, device_batch_size, sequence_len, split_tokens, world_size):
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    tokens_per_step = device_batch_size * sequence_len * world_size
    if split_tokens < tokens_per_step:
        raise SystemExit(f"error: --split-tokens={split_tokens} is less than one step of {tokens_per_step} tokens "
                         f"(device batch {device_batch_size} x sequence {sequence_len} x world {world_size})")
    if split_tokens % tokens_per_step != 0:
        adjusted = (split_tokens // tokens_per_step) * tokens_per_step
        print0(f"Adjusting split_tokens from {split_tokens} to {adjusted} (a multiple of {tokens_per_step})")
        split_tokens = adjusted
    steps = split_tokens // tokens_per_step
    token_bytes = get_token_bytes(device=device)
    bpb = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, device_batch_size, sequence_len, split,
                                                                device=device)
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.6f}")
    return bpb


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a base model: samples, bits per byte, CORE")
    # what to evaluate
    parser.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    # CORE
    parser.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1 = all)")
    parser.add_argument("--bundle-dir", type=str, default=None,
                        help="local unzipped eval_bundle folder (else env NANOCHAT_EVAL_BUNDLE, else download)")
    # bits per byte
    parser.add_argument("--device-batch-size", type=int, default=32, help="per-device batch rows for bpb")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    # runtime
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    args = parser.parse_args(argv)

    # cheap checks first: bad flags, no checkpoint, no bundle
    modes = parse_eval_modes(args.eval)
    if args.device_type not in ("", "cuda", "cpu", "mps"):
        raise SystemExit(f"error: --device-type={args.device_type!r}: choose cuda, cpu or mps (or leave empty)")
    if args.device_batch_size <= 0:
        raise SystemExit(f"error: --device-batch-size={args.device_batch_size} must be positive")
    check_checkpoint_exists(args.model_tag, args.step)
    bundle_dir = None
    if "core" in modes:
        try:
            bundle_dir = resolve_bundle_dir(args.bundle_dir)
        except BundleError as e:
            raise SystemExit(f"error: {e}") from None

    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type, compute_cleanup, compute_init
    from nanochat.report import get_report

    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    try:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    except FileNotFoundError as e:
        raise SystemExit(f"error: could not load the base checkpoint: {e}") from None
    step = meta.get("step", args.step or 0)
    sequence_len = meta["model_config"]["sequence_len"]
    model_name = f"base_model (step {step})"
    model_slug = f"base_model_{step:06d}"
    print0(f"Evaluating {model_name}")

    summary = {"Model": model_name}
    samples, unconditioned, core_out = [], [], None
    # order as HEAD: quick samples first, then bpb, then the long CORE run
    if "sample" in modes:
        print0(RULE + "\nModel Samples\n" + RULE)
        if rank == 0:
            samples, unconditioned = run_samples(model, tokenizer)
    if "bpb" in modes:
        print0(RULE + "\nBPB Evaluation\n" + RULE)
        bpb = run_bpb(model, tokenizer, device, args.device_batch_size, sequence_len, args.split_tokens, world_size)
        summary["train bpb"] = bpb["train"]
        summary["val bpb"] = bpb["val"]
    if "core" in modes:
        print0(RULE + "\nCORE Evaluation\n" + RULE)
        try:
            core_out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, bundle_dir=bundle_dir)
        except BundleError as e:
            raise SystemExit(f"error: {e}") from None
        if rank == 0:
            csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_slug}.csv")
            write_core_csv(csv_path, core_out)
            print0(f"Results written to {csv_path}")
        if core_out["skipped"]:
            print0(f"Skipped tasks ({len(core_out['skipped'])}): {', '.join(core_out['skipped'])}")
        print0(f"CORE metric: {format_core(core_out)}")
        summary["CORE metric"] = format_core(core_out)
        if core_out["skipped"]:
            summary["CORE skipped tasks"] = ", ".join(core_out["skipped"])

    get_report().log("Base model evaluation", [
        summary,
        core_out["centered_results"] if core_out else None,
        {f"sample {i}": s for i, s in enumerate(samples)},
        {f"unconditioned {i}": s for i, s in enumerate(unconditioned)},
    ])
    compute_cleanup()


if __name__ == "__main__":
    main()
