"""
Flags of every entry point: each numeric flag rejects NaN, inf, negative and out-of-range values with argparse's one
`error:` line and exit code 2, the sentinels the flags document (-1 = off/auto/all) still parse, and every numeric
flag is typed by the shared common.int_in/float_in (none is a bare int or float). Parse-only and in-process: each
entry point runs until its parse_args returns, which the tests turn into an exception, so nothing trains, loads a
model or downloads. Also: a NANOCHAT_BASE_DIR that cannot be created is one error line, not a traceback, and
the Hugging Face module imports without its optional dependencies and says what to install when used.
"""

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from nanochat.common import positive_ints


class Parsed(Exception):
    """Raised instead of returning from parse_args: the entry point accepted its flags."""

    def __init__(self, parser, namespace):
        super().__init__(namespace)
        self.parser, self.namespace = parser, namespace


def call_main(module):
    return lambda argv: importlib.import_module(module).main(argv)


# Every entry point: (name, how to run it, argv it needs anyway, {numeric flag: bad values besides nan, +-inf, -5}).
# Each flag's help documents the sentinels it accepts; the extra bad values are the edges just outside its range.
ENTRY_POINTS = [
    ("scripts.base_train", call_main("scripts.base_train"), [], {
        "--depth": "0", "--aspect-ratio": "0", "--head-dim": "0", "--max-seq-len": "1", "--num-iterations": "0 2.5",
        "--target-flops": "0", "--target-param-data-ratio": "0", "--device-batch-size": "0", "--total-batch-size": "0",
        "--embedding-lr": "-1", "--unembedding-lr": "-1", "--matrix-lr": "-1", "--scalar-lr": "-1e-3",
        "--weight-decay": "-1", "--adam-beta1": "1 2", "--adam-beta2": "1 -0.1", "--warmup-ratio": "1.5",
        "--warmup-steps": "-1", "--warmdown-ratio": "1.01", "--final-lr-frac": "2", "--resume-from-step": "-2",
        "--save-every": "0", "--keep-last": "0", "--eval-every": "0", "--eval-tokens": "0", "--core-metric-every": "0",
        "--core-metric-max-per-task": "0", "--sample-every": "0", "--seed": "4294967296"}),
    ("scripts.chat_sft", call_main("scripts.chat_sft"), [], {
        "--model-step": "-1", "--load-optimizer": "2", "--mmlu-epochs": "-1", "--gsm8k-epochs": "-1",
        "--identity-epochs": "-1", "--simple-spelling-size": "-1", "--spelling-bee-size": "-1", "--num-iterations": "0",
        "--max-seq-len": "0", "--device-batch-size": "0", "--total-batch-size": "0", "--embedding-lr": "-1",
        "--unembedding-lr": "-1", "--matrix-lr": "-1", "--weight-decay": "-1", "--init-lr-frac": "-1",
        "--warmup-ratio": "1.5", "--warmdown-ratio": "1.5", "--final-lr-frac": "1.5", "--eval-every": "0",
        "--eval-tokens": "0", "--chatcore-every": "0", "--chatcore-max-cat": "0", "--chatcore-max-sample": "0",
        "--chatcore-max-new-tokens": "0", "--dry-run": "2", "--seed": "4294967296", "--save-every": "0", "--keep-last": "0",
        "--resume-from-step": "-2"}),
    ("scripts.chat_rl", call_main("scripts.chat_rl"), [], {
        "--model-step": "-1", "--num-epochs": "0", "--num-steps": "0", "--device-batch-size": "0",
        "--examples-per-step": "0", "--num-samples": "0", "--max-new-tokens": "0", "--temperature": "-0.1",
        "--top-k": "-1", "--embedding-lr": "-1", "--unembedding-lr": "-1", "--matrix-lr": "-1", "--weight-decay": "-1",
        "--init-lr-frac": "-1", "--eval-every": "0", "--eval-examples": "0", "--save-every": "0", "--keep-last": "0",
        "--resume-from-step": "-2", "--seed": "4294967296"}),
    ("scripts.chat_eval", call_main("scripts.chat_eval"), ["-i", "sft"], {
        "--step": "-1", "--max-problems": "0", "--batch-size": "0", "--temperature": "-1", "--max-new-tokens": "0",
        "--num-samples": "0", "--top-k": "-1", "--rows": "0"}),
    ("scripts.chat_cli", call_main("scripts.chat_cli"), [], {
        "--step": "-1", "--temperature": "2.5", "--top-k": "-1", "--max-tokens": "0", "--seed": "4294967296"}),
    ("scripts.chat_web", call_main("scripts.chat_web"), [], {
        "--step": "-1", "--num-gpus": "0", "--temperature": "-1", "--top-k": "-1", "--max-tokens": "0",
        "--seed": "4294967296", "--port": "0 65536", "--max-messages": "0", "--max-message-chars": "0",
        "--max-conversation-chars": "0", "--max-temperature": "-1", "--max-top-k": "-1", "--max-max-tokens": "0",
        "--header-timeout": "0", "--rows-per-replica": "0"}),
    ("scripts.base_eval", call_main("scripts.base_eval"), [], {
        "--step": "-1", "--max-per-task": "0", "--device-batch-size": "0", "--split-tokens": "0"}),
    ("scripts.export_hf", call_main("scripts.export_hf"), [], {"--step": "-1"}),
    ("scripts.infer_bench", call_main("scripts.infer_bench"), [], {
        "--step": "-1", "--prompt-tokens": "0", "--decode-tokens": "1", "--temperature": "-1"}),
    ("scripts.tok_train", call_main("scripts.tok_train"), [], {
        "--max-chars": "0", "--doc-cap": "0", "--vocab-size": "0 264"}),
    ("scripts.tok_eval", call_main("scripts.tok_eval"), [], {}),
    ("nanochat.dataset", call_main("nanochat.dataset"), [], {
        "--num-files": "-2", "--num-workers": "0", "--retries": "0", "--max-doc-chars": "0"}),
    ("nanochat.report", call_main("nanochat.report"), [], {}),
    ("nanochat.engine", call_main("nanochat.engine"), [], {"--step": "-1", "--max-tokens": "0"}),
    ("scripts.offline_corpus", call_main("scripts.offline_corpus"), [], {
        "--max-chars": "0", "--max-doc-chars": "0", "--num-workers": "0"}),
]  # not scripts/sweep_results.py nor scripts/ab_test.py: they stay free of torch (nanochat.common imports it)
ENTRY = {name: (run, argv) for name, run, argv, _ in ENTRY_POINTS}
BAD_VALUES = [(name, flag, ["nan", "inf", "-inf", "-5", *extra.split()])
              for name, _, _, flags in ENTRY_POINTS for flag, extra in flags.items()]


@pytest.fixture(autouse=True)
def stop_after_parsing(monkeypatch, tmp_path):
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(self, real_parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # nothing should get this far; if so, not ~


def entry(name):
    return ENTRY[name]


def parse(name, *flags):
    """Run the entry point up to its parse_args; returns Parsed (.parser, .namespace)."""
    run, argv = entry(name)
    with pytest.raises(Parsed) as parsed:
        run([*argv, *flags])
    return parsed.value


def refused(name, flag, value, capsys):
    """stderr of the entry point refusing flag=value with argparse's exit code 2 (accepting it raises Parsed)."""
    run, argv = entry(name)
    with pytest.raises(SystemExit) as excinfo:
        run([*argv, f"{flag}={value}"])
    assert excinfo.value.code == 2, f"{name} {flag}={value}: exit code {excinfo.value.code!r}"
    return capsys.readouterr().err


@pytest.mark.parametrize("name,flag,values", BAD_VALUES, ids=[f"{n}:{f}" for n, f, _ in BAD_VALUES])
def test_bad_numeric_values_are_one_error_line(name, flag, values, capsys):
    for value in values:
        err = refused(name, flag, value, capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert flag in errors[0] and "must be " in errors[0] and errors[0].endswith(f"got {value}"), errors[0]
        assert " in [" in errors[0] or " in (" in errors[0], f"the range is not stated: {errors[0]}"


@pytest.mark.parametrize("name,flags", [(name, flags) for name, _, _, flags in ENTRY_POINTS],
                         ids=[name for name, *_ in ENTRY_POINTS])
def test_every_numeric_flag_uses_the_shared_types(name, flags):
    """No bare int/float flag (they take nan, inf and negatives), and the table above lists every numeric flag of
    the entry point, so a new one cannot go unchecked."""
    actions = parse(name).parser._actions
    assert not [a.option_strings for a in actions if a.type in (int, float)], "bare int/float flags"
    assert {max(a.option_strings, key=len) for a in actions if a.type not in (None, str, positive_ints)} == set(flags)


SENTINELS = [  # documented special values and edges that must stay accepted
    ("scripts.base_train", ["--num-iterations=-1", "--target-flops=-1", "--target-param-data-ratio=-1",
                            "--total-batch-size=-1", "--resume-from-step=-1", "--save-every=-1", "--keep-last=-1",
                            "--eval-every=-1", "--core-metric-every=-1", "--core-metric-max-per-task=-1",
                            "--sample-every=-1", "--warmup-steps=0", "--warmup-ratio=0", "--warmdown-ratio=1",
                            "--final-lr-frac=0", "--adam-beta1=0", "--adam-beta2=0.999", "--target-flops=1e18",
                            "--resume-from-step=0", "--matrix-lr=0"]),
    ("scripts.chat_sft", ["--num-iterations=-1", "--eval-every=-1", "--chatcore-every=-1", "--chatcore-max-cat=-1",
                          "--load-optimizer=0", "--dry-run=1", "--mmlu-epochs=0", "--spelling-bee-size=0"]),
    ("scripts.chat_rl", ["--num-steps=-1", "--top-k=0", "--temperature=0", "--keep-last=-1", "--resume-from-step=-1",
                         "--resume-from-step=0"]),
    ("scripts.chat_cli", ["-t", "0", "-t", "2", "-k", "0", "--seed", "0", "--step", "0"]),
    ("scripts.chat_web", ["--port", "65535", "--seed", "4294967295", "-k", "0", "-t", "0"]),
    ("scripts.base_eval", ["--max-per-task=-1"]),
    ("scripts.tok_train", ["--vocab-size=265"]),
    ("nanochat.dataset", ["-n", "-1", "-n", "0"]),
]


@pytest.mark.parametrize("name,flags", SENTINELS, ids=[n for n, _ in SENTINELS])
def test_documented_sentinels_still_parse(name, flags):
    args = parse(name, *flags).namespace
    given = dict(flag[2:].split("=") for flag in flags if flag.startswith("--") and "=" in flag)  # the last one wins
    for key, value in given.items():
        assert getattr(args, key.replace("-", "_")) == float(value)


def test_positive_ints_states_its_range(capsys):
    from scripts import infer_bench
    with pytest.raises(SystemExit):
        infer_bench.main(["--batch-sizes", "1,0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --batch-sizes: must be comma-separated integers in [1, inf), got 1,0")

# -----------------------------------------------------------------------------
# NANOCHAT_BASE_DIR that cannot be created


@pytest.mark.parametrize("where", ["under a file", "in a read-only directory"])
def test_uncreatable_base_dir_is_one_error_line(tmp_path, monkeypatch, where):
    from nanochat.common import NanochatError, get_base_dir
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        base = tmp_path / "file" / "base"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write into read-only directories")
        (tmp_path / "ro").mkdir(mode=0o555)
        base = tmp_path / "ro" / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with pytest.raises(NanochatError) as excinfo:
        get_base_dir()
    message = str(excinfo.value)
    assert message.startswith(f"cannot create the base dir {base} (NANOCHAT_BASE_DIR): ") and "\n" not in message


def test_entry_point_with_uncreatable_base_dir_exits_with_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "file" / "base")}
    proc = subprocess.run([sys.executable, "-m", "nanochat.report", "reset"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot create the base dir {tmp_path}/file/base "
                                                "(NANOCHAT_BASE_DIR): Not a directory"]

# -----------------------------------------------------------------------------
# Optional dependencies: missing ones are an error where they are used, never at import (export_hf parses its flags)


def test_without_the_optional_dependencies_the_module_imports_and_says_what_to_install(monkeypatch):
    import importlib
    import nanochat
    import nanochat.hf  # imported as usual first, so that the copy below is dropped again afterwards
    from nanochat.errors import NanochatError
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    monkeypatch.delitem(sys.modules, "nanochat.hf")
    monkeypatch.setattr(nanochat, "hf", None)
    hf = importlib.import_module("nanochat.hf")
    for call in (lambda: hf.export_hf(None, None, "unused"), lambda: hf.load_hf_model("unused", "cpu")):
        with pytest.raises(NanochatError, match=r"^Hugging Face interop needs the optional dependencies: "
                                                r"pip install -e \.\[hf\]$"):
            call()
