"""
The one error type of the library. NanochatError is a failure the user can act on: bad input, a missing file, no
network. Its message is one line saying what went wrong and what to do. The library raises it (or a subclass) and
never ends the process; entry points print it as `error: <message>` and exit 1 through nanochat.cli.run.
This module imports nothing, so torch-free tools (the code sandbox, the sweep scripts) can raise it too.
"""


class NanochatError(Exception):
    """A failure the user can act on; the message is one line without the 'error: ' prefix."""
