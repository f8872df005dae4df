"""
Evaluate a base model: prompt samples, bits per byte on the train/val splits, and the CORE metric, each with its
standard error. The val bpb is measured on the rows base_train's validation uses (the first --split-tokens of the
split, packed as by one process): with the defaults a checkpoint gets the same val bpb here as in its training log.

Examples:
    python -m scripts.base_eval                                   # everything, latest base checkpoint
    python -m scripts.base_eval --eval=core --max-per-task=16     # quick partial CORE
    python -m scripts.base_eval --bundle-dir=/path/to/eval_bundle
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

The CORE eval bundle is found in this order: --bundle-dir, env NANOCHAT_EVAL_BUNDLE, <base_dir>/eval_bundle, else it is
downloaded (once, with a lock) to <base_dir>/eval_bundle.zip and unpacked. Tasks whose data files are missing are
skipped and named, and the score is then labelled "partial (k/22 tasks)" and shown next to GPT-2's CORE on the same
tasks (from the GPT-2 results tables that ship with the bundle). With --max-per-task N the label, printed and in the
CSV, says "N per task".
"""

import argparse
import os

from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.cli import run
from nanochat.common import autodetect_device_type, compute_cleanup, compute_init, get_base_dir, int_in, print0
from nanochat.core_eval import evaluate_core, format_core, write_core_csv
from nanochat.engine import SAMPLE_PROMPTS, Engine
from nanochat.errors import NanochatError
from nanochat.eval_bundle import resolve_bundle_dir
from nanochat.loss_eval import EVAL_TOKENS, evaluate_bpb, eval_batches, format_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

EVAL_MODES = ("core", "bpb", "sample")
RULE = "=" * 80


def parse_eval_modes(value):
    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown or not modes:
        raise NanochatError(f"--eval={value!r}: unknown mode(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose a comma-separated subset of {','.join(EVAL_MODES)}")
    return modes


def run_samples(model, tokenizer, engine=None):
    """Greedy completions of SAMPLE_PROMPTS, and 8 unconditioned samples at temperature 1."""
    engine = engine or Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        results, _ = engine.generate_batch(tokenizer.encode(prompt, prepend=bos), num_samples=1, max_tokens=16,
                                           temperature=0)
        samples.append(tokenizer.decode(results[0]))
    results, _ = engine.generate_batch([bos], num_samples=8, max_tokens=128, temperature=1.0)
    unconditioned = [tokenizer.decode(sample) for sample in results]
    for title, texts in (("Conditioned samples:", samples), ("Unconditioned samples:", unconditioned)):
        print0("\n" + title)
        for text in texts:
            print0("-" * 80 + "\n" + text)
    return samples, unconditioned


def run_bpb(model, tokenizer, device, device_batch_size, sequence_len, split_tokens, token_bytes=None):
    """{split: BpbEstimate} on the first rows of the train and val splits: the val rows are those base_train's
    validation evaluates with the same --eval-tokens, so a checkpoint gets the same val bpb in both."""
    token_bytes = get_token_bytes(device=device) if token_bytes is None else token_bytes
    bpb = {}
    for split in ("train", "val"):
        batches = eval_batches(tokenizer, split, split_tokens, sequence_len, device_batch_size, device)
        bpb[split] = evaluate_bpb(model, batches, token_bytes)
        print0(f"{split} bpb: {bpb[split]}")
    return bpb


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a base model: samples, bits per byte, CORE")
    # what to evaluate
    parser.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the largest model)")
    parser.add_argument("--step", type=int_in("[0, inf)"), default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--hf-path", type=str, default=None, help="evaluate a transformers causal LM (directory or hub name) instead")
    # CORE
    parser.add_argument("--max-per-task", type=int_in("[1, inf)", -1), default=-1, help="examples per CORE task (-1 = all)")
    parser.add_argument("--bundle-dir", type=str, default=None,
                        help="local unzipped eval_bundle folder (else env NANOCHAT_EVAL_BUNDLE, else download)")
    # bits per byte
    parser.add_argument("--device-batch-size", type=int_in("[1, inf)"), default=32, help="per-device batch rows for bpb")
    parser.add_argument("--split-tokens", type=int_in("[1, inf)"), default=EVAL_TOKENS,
                        help="tokens per split for bpb (the default is base_train's --eval-tokens: the same val rows)")
    # runtime
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    # cheap checks first: bad flags, no checkpoint, no bundle
    modes = parse_eval_modes(args.eval)
    if not args.hf_path:
        checkpoint = resolve_checkpoint("base", args.model_tag, args.step)
    bundle_dir = resolve_bundle_dir(args.bundle_dir) if "core" in modes else None

    _, rank, _, _, device = compute_init(args.device_type or autodetect_device_type())

    # the model under evaluation: one of ours, or any transformers causal LM
    engine = token_bytes = None
    if args.hf_path:
        from nanochat.hf import HFEngine, load_hf_model  # optional dependency: pip install -e .[hf]
        model, tokenizer = load_hf_model(args.hf_path, device)
        engine, token_bytes, sequence_len = HFEngine(model, tokenizer), tokenizer.token_bytes(device), model.sequence_len
        model_name, model_slug = args.hf_path, "hf_" + os.path.basename(os.path.normpath(args.hf_path))
    else:
        model, tokenizer, meta = build_model(*checkpoint, device, phase="eval")
        step = meta.get("step", args.step or 0)
        sequence_len = meta["model_config"]["sequence_len"]
        model_name, model_slug = f"base_model (step {step})", f"base_model_{step:06d}"
    print0(f"Evaluating {model_name}")

    summary = {"Model": model_name}
    samples, unconditioned, core_out = [], [], None
    # quick samples first, then bpb, then the long CORE run
    if "sample" in modes:
        print0(RULE + "\nModel Samples\n" + RULE)
        if rank == 0:
            samples, unconditioned = run_samples(model, tokenizer, engine)
    if "bpb" in modes:
        print0(RULE + "\nBPB Evaluation\n" + RULE)
        bpb = run_bpb(model, tokenizer, device, args.device_batch_size, sequence_len, args.split_tokens, token_bytes)
        summary.update({f"{split} bpb": format_bpb(v.bpb, v.se, v.tokens, digits=4) for split, v in bpb.items()})
    if "core" in modes:
        print0(RULE + "\nCORE Evaluation\n" + RULE)
        core_out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, bundle_dir=bundle_dir)
        if rank == 0:
            csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_slug}.csv")
            write_core_csv(csv_path, core_out)
            print0(f"Results written to {csv_path}")
        summary["CORE metric"] = format_core(core_out)
        if core_out["skipped"]:
            summary["CORE skipped tasks"] = ", ".join(core_out["skipped"])
            print0(f"Skipped tasks ({len(core_out['skipped'])}): {summary['CORE skipped tasks']}")
        print0(f"CORE metric: {summary['CORE metric']}")

    get_report().log("Base model evaluation", [
        summary,
        {label: f"{centered:.4f} ± {core_out['centered_se'][label]:.4f} ({core_out['num_examples'][label]} examples)"
         for label, centered in core_out["centered_results"].items()} if core_out else None,
        {f"sample {i}": s for i, s in enumerate(samples)},
        {f"unconditioned {i}": s for i, s in enumerate(unconditioned)},
    ])
    compute_cleanup()


if __name__ == "__main__":
    run(main)
