"""
Export a nanochat checkpoint (base, sft or rl) as a Hugging Face transformers model directory.

    python -m scripts.export_hf --source sft --output-dir my_model
    python -m scripts.export_hf --source base --dtype bfloat16

Load it elsewhere with:
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True); AutoTokenizer.from_pretrained(dir)
Needs the optional dependencies: pip install -e .[hf]
"""

import argparse
import os

from nanochat.checkpoint_manager import load_model
from nanochat.cli import run
from nanochat.common import get_base_dir, int_in
from nanochat.hf import export_hf  # its optional dependencies are checked when it is called


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a nanochat checkpoint as a transformers model directory")
    # which checkpoint
    parser.add_argument("--source", type=str, default="sft", choices=["base", "sft", "rl"], help="checkpoint family to export")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=int_in("[0, inf)"), default=None, help="checkpoint step (default: the last)")
    # output
    parser.add_argument("--output-dir", type=str, default=None, help="where to write (default: <base_dir>/hf_export/<source>)")
    parser.add_argument("--dtype", type=str, default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    args = parser.parse_args(argv)

    model, tokenizer, meta = load_model(args.source, "cpu", "eval", args.model_tag, args.step)
    output_dir = args.output_dir or os.path.join(get_base_dir(), "hf_export", args.source)
    export_hf(model, tokenizer, output_dir, args.dtype)
    print(f"Exported {args.source} checkpoint (step {meta.get('step')}) as {args.dtype} to {output_dir}")


if __name__ == "__main__":
    run(main)
