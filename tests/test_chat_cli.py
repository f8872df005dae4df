"""
The terminal chat (scripts/chat_cli.py) on a tiny checkpoint in a temporary NANOCHAT_BASE_DIR: the flags, the
banner, one-shot prompts, quit/exit/clear, streamed replies without stray special-token text.
"""

import os
import sys
import subprocess
from pathlib import Path

import pytest

from scripts import chat_cli
from test_chat_web import save_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_seed_flags_and_defaults(capsys):
    args = chat_cli.parse_args([])
    assert (args.source, args.model_tag, args.step, args.prompt, args.temperature, args.top_k) == ("sft", None, None, "", 0.6, 50)
    args = chat_cli.parse_args(["-i", "rl", "-g", "d4", "-s", "7", "-p", "hi", "-t", "0", "-k", "5", "--device-type", "cpu"])
    assert (args.source, args.model_tag, args.step, args.prompt, args.temperature, args.top_k, args.device_type) == \
        ("rl", "d4", 7, "hi", 0.0, 5, "cpu")
    for argv, needle in [(["-t", "3"], "--temperature"), (["-k", "-1"], "--top-k"), (["-m", "0"], "--max-tokens")]:
        with pytest.raises(SystemExit) as excinfo:
            chat_cli.parse_args(argv)
        assert excinfo.value.code == 2 and needle in capsys.readouterr().err


def run_cli(base_dir, argv, stdin=""):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *argv], input=stdin,
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_one_shot_prompt(base_dir, tiny_tokenizer):
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    result = run_cli(base_dir, ["-i", "sft", "-p", "What is 2+2?", "-m", "12"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NanoChat Interactive Mode" in out and "Type 'clear' to start a new conversation" in out
    assert "User: What is 2+2?" in out and "Assistant: " in out
    assert "<|" not in out.split("Assistant: ", 1)[1]  # no raw special tokens in the reply


def test_interactive_session(base_dir, tiny_tokenizer, monkeypatch, capsys):
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    inputs = iter(["hello there", "", "CLEAR", "and again", "quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    chat_cli.main(["--device-type", "cpu", "-m", "6"])
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "Conversation cleared." in out and out.rstrip().endswith("Goodbye!")
    assert "<|" not in out
    assert next(inputs) == "never read"  # quit really ended the loop


def test_end_of_input_says_goodbye(base_dir, tiny_tokenizer, monkeypatch, capsys):
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    inputs = iter(["hi"])

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError  # Ctrl-D
    monkeypatch.setattr("builtins.input", fake_input)
    chat_cli.main(["--device-type", "cpu", "-m", "4"])
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 1 and out.rstrip().endswith("Goodbye!")


def test_same_conversation_same_reply(base_dir, tiny_tokenizer, monkeypatch, capsys):
    # default seed 42: the first reply of a conversation is reproducible, and 'clear' restarts it
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    inputs = iter(["tell me something", "clear", "tell me something", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    chat_cli.main(["--device-type", "cpu", "-m", "8", "-t", "1.0"])
    replies = [part.split("\n", 1)[0] for part in capsys.readouterr().out.split("Assistant: ")[1:]]
    assert len(replies) == 2 and replies[0] == replies[1]


def test_long_conversation_keeps_fitting_the_context(base_dir, tiny_tokenizer, monkeypatch, capsys):
    save_tiny_checkpoint(base_dir, tiny_tokenizer)  # context 256 tokens
    inputs = iter(["word " * 60] * 5 + ["exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    chat_cli.main(["--device-type", "cpu", "-m", "4"])
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 5 and "forgot the oldest" in out


def test_missing_checkpoint_is_one_clear_line(base_dir, capsys):
    from nanochat.cli import run
    with pytest.raises(SystemExit) as excinfo:  # through cli.run, as `python -m scripts.chat_cli` runs main
        run(lambda: chat_cli.main(["--device-type", "cpu"]))
    message = capsys.readouterr().err.strip()
    assert excinfo.value.code == 1 and message.startswith("error:") and "scripts.chat_sft" in message and "\n" not in message


def test_one_shot_prompt_longer_than_the_context_is_an_error(base_dir, tiny_tokenizer, capsys):
    from nanochat.errors import NanochatError
    save_tiny_checkpoint(base_dir, tiny_tokenizer)  # context 256 tokens
    with pytest.raises(NanochatError, match=r"^-p/--prompt is too long for the model's 256-token context"):
        chat_cli.main(["--device-type", "cpu", "-p", "word " * 400])
    assert "Assistant:" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["nan", "garbage"])
def test_unusable_checkpoint_is_one_line_and_no_reply(base_dir, tiny_tokenizer, damage):
    import torch
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    model_file = base_dir / "chatsft_checkpoints" / "d2" / "model_000005.pt"
    if damage == "nan":  # a complete checkpoint of a diverged model
        state = torch.load(model_file)
        state["lm_head.weight"][0, 0] = float("nan")
        torch.save(state, model_file)
    else:
        model_file.write_bytes(bytes(range(256)) * 8)
    result = run_cli(base_dir, ["-i", "sft", "-p", "What is 2+2?", "-m", "4"])
    assert result.returncode == 1 and "Assistant:" not in result.stdout, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()  # the log lines of the load, then one error line
    assert "Traceback" not in result.stderr and [l for l in lines if "error" in l.lower()] == lines[-1:], result.stderr
    assert lines[-1].startswith("error:") and str(model_file) in lines[-1], result.stderr


def test_tool_calls_are_shown_readably(tiny_tokenizer):
    tok = tiny_tokenizer
    special = tok.encode_special
    script = tok.encode("Sure: ") + [special("<|python_start|>")] + tok.encode("6*7") + [special("<|python_end|>"),
             special("<|output_start|>")] + tok.encode("42") + [special("<|output_end|>")] + tok.encode(" done") + \
             [special("<|assistant_end|>")] + tok.encode("never shown")

    class ScriptedEngine:
        def generate(self, tokens, **kwargs):
            for t in script:
                yield [t], [1]

    shown = []
    reply, finish = chat_cli.stream_reply(ScriptedEngine(), tok, [tok.get_bos_token_id()], 100, 0.6, 50, 42, shown.append)
    assert "".join(shown) == "Sure: [calculator: 6*7 = 42] done" and "" not in shown
    assert reply == script[:script.index(special("<|assistant_end|>"))] and finish == "stop"  # tool tokens kept
