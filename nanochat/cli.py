"""
The boundary between the library and the command line. The library raises typed errors (common.NanochatError and
its subclasses) and never ends the process; every entry point runs its main through `run`, which turns such an
error into one `error: ...` line on stderr and exit status 1. Any other exception is a bug and keeps its traceback.
Also here: the flags every script that loads one model to use it shares (add_model_flags).
"""

import sys

from nanochat.errors import NanochatError  # imports nothing: run() serves torch-free tools too (scripts.ab_test)


def run(main):
    """Call main(); a NanochatError becomes one error line and exit status 1."""
    try:
        return main()
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def add_model_flags(parser, default_source):
    """The flags of the scripts that load one model to use it: which checkpoint (-i/--source, -g/--model-tag,
    -s/--step) and on which device. default_source=None makes -i/--source required. They feed
    checkpoint_manager.load_model (or resolve_checkpoint, then build_model)."""
    from nanochat.common import int_in  # here, not at the top: nanochat.common imports torch
    # (the families of checkpoint_manager.CHECKPOINT_SOURCES, spelled out: this module imports no model code)
    parser.add_argument("-i", "--source", type=str, default=default_source, required=default_source is None,
                        choices=["base", "sft", "rl"], help="checkpoint family to load: base|sft|rl")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: the largest)")
    parser.add_argument("-s", "--step", type=int_in("[0, inf)"), default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
