"""The script boundary: a typed library error becomes one `error:` line and exit 1; anything else keeps its traceback."""

import pytest

from nanochat.cli import run
from nanochat.errors import NanochatError


def test_a_typed_error_is_one_line_and_exit_1(capsys):
    def main():
        raise NanochatError("no checkpoint found in /x; train one first")
    with pytest.raises(SystemExit) as excinfo:
        run(main)
    assert excinfo.value.code == 1
    assert capsys.readouterr().err == "error: no checkpoint found in /x; train one first\n"


def test_a_bug_is_not_hidden():
    def main():
        raise KeyError("bug")
    with pytest.raises(KeyError):
        run(main)


def test_main_returns_normally():
    assert run(lambda: 3) == 3
