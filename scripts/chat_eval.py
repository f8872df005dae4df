"""
Evaluate a chat model on the chat benchmarks and compute ChatCORE.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Two kinds of task:
- categorical (ARC, MMLU): one forward pass per batch, the answer is the argmax over the letters' logits at the
  <|assistant_start|> position, so the model always answers with a valid letter;
- generative (GSM8K, HumanEval, SpellingBee): sample completions with the Engine, a problem passes if any of the
  -n samples is correct (pass@n). Problems are decoded together, -r sequences (problems x samples) per forward.

ChatCORE = mean over the six tasks of (accuracy - chance) / (1 - chance): 0 is chance, 1 is perfect. ChatCORE-5 is
the same without SpellingBee. Every accuracy and ChatCORE is printed and logged with its standard error and the number
of problems it covers (tasks/evaluate.py says how). A task whose data cannot be had (e.g. offline, nothing cached) is skipped with a line
saying so, and ChatCORE is then printed and logged as partial (k/6 tasks) so it is never mistaken for a full score.
"""

import argparse

from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.cli import add_model_flags, run
from nanochat.common import (COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, autodetect_device_type, int_in, float_in,
                             compute_cleanup, compute_init, print0)
from nanochat.engine import Engine
from nanochat.errors import NanochatError
from nanochat.execution import isolation
from nanochat.report import get_report
from tasks.evaluate import ALL_TASKS, BASELINES, chatcore_lines, format_accuracy, run_chat_evals

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee")
    add_model_flags(parser, default_source=None)
    # what to evaluate
    parser.add_argument("-a", "--task-name", type=str, default=None,
                        help=f"task(s) joined with '|' (default: all of {'|'.join(ALL_TASKS)})")
    parser.add_argument("-x", "--max-problems", type=int_in("[1, inf)"), default=None, help="cap on problems per task")
    parser.add_argument("-b", "--batch-size", type=int_in("[1, inf)"), default=8, help="batch size of the categorical evaluation")
    parser.add_argument("-r", "--rows", type=int_in("[1, inf)"), default=32,
                        help="sequences decoded together in the generative tasks (problems x samples per forward)")
    # sampling (generative tasks)
    parser.add_argument("-t", "--temperature", type=float_in("[0, inf)"), default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-m", "--max-new-tokens", type=int_in("[1, inf)"), default=512, help="max tokens generated per sample")
    parser.add_argument("-n", "--num-samples", type=int_in("[1, inf)"), default=1, help="samples per problem (pass@n)")
    parser.add_argument("-k", "--top-k", type=int_in("[0, inf)"), default=50, help="top-k sampling (0 disables)")
    args = parser.parse_args(argv)

    task_names = ALL_TASKS if args.task_name is None else [t.strip() for t in args.task_name.split("|") if t.strip()]
    unknown = [t for t in task_names if t not in BASELINES]
    if unknown:
        raise NanochatError(f"unknown task(s) {', '.join(unknown)} in -a/--task-name; choose from {'|'.join(ALL_TASKS)}")
    checkpoint = resolve_checkpoint(args.source, args.model_tag, args.step)

    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    print0(f"Compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    if "HumanEval" in task_names:
        print0(f"HumanEval code sandbox: {isolation()} isolation")  # SandboxUnavailable: one error line (cli.run)

    model, tokenizer, meta = build_model(*checkpoint, device, phase="eval")
    engine = Engine(model, tokenizer)

    results, skipped = run_chat_evals(task_names, model, tokenizer, engine, max_problems=args.max_problems,
                                      batch_size=args.batch_size, rows=args.rows, num_samples=args.num_samples,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)

    # ChatCORE only over full task lists (a skipped task makes it partial, and the line says so)
    chatcore = chatcore_lines(results, task_names)
    for key, line in chatcore.items():
        print0(f"{key}: {line}")
    if skipped:
        print0(f"Tasks skipped because their data is unavailable: {', '.join(skipped)}")

    # Skipped tasks appear under their own name (the report's summary table picks rows by task name)
    task_lines = {t: (format_accuracy(*results[t]) if t in results else "skipped (data unavailable)") for t in task_names}
    get_report().log(section=f"Chat evaluation {args.source}", data=[vars(args), task_lines, chatcore])
    compute_cleanup()
    return results


if __name__ == "__main__":
    run(main)
