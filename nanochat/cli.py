"""
The boundary between the library and the command line. The library raises typed errors (common.NanochatError and
its subclasses) and never ends the process; every entry point runs its main through `run`, which turns such an
error into one `error: ...` line on stderr and exit status 1. Any other exception is a bug and keeps its traceback.
"""

import sys

from nanochat.errors import NanochatError


def run(main):
    """Call main(); a NanochatError becomes one error line and exit status 1."""
    try:
        return main()
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
