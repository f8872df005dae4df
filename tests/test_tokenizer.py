"""
Tokenizer: training, round trips (special tokens, unseen and non-UTF-8 bytes), token_bytes, chat rendering masks,
and the tok_train / tok_eval scripts end to end on locally built shards. No network.
"""

import os
import re
import sys
import runpy

import pytest
import torch

from nanochat.errors import NanochatError
from nanochat.tokenizer import (RustBPETokenizer, SPECIAL_TOKENS, compute_token_bytes, get_tokenizer,
                                get_token_bytes)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Naïve café owners déjà vu.",
    "你好世界，这是一个测试。中文文本也需要正确处理。",
    "Emoji are bytes too: 🌍🚀✨ and so are accents: ñ, ü, ø.",
    "def add(a, b):\n    return a + b  # 12345 67890\n",
] * 8


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(CORPUS), vocab_size=256 + 9 + 35)


def test_vocab_size_and_special_order(tok):
    assert tok.get_vocab_size() == 300
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(300 - 9, 300)), "specials take the last ids, in the spec's order"
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>") == 291
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)


def test_round_trip_including_unseen_text(tok):
    for text in CORPUS[:4] + ["Completely unseen: Ωμέγα ℵ₀ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_special_text_is_not_parsed_as_special(tok):
    ids = tok.encode("<|bos|>")
    assert len(ids) > 1 and tok.get_bos_token_id() not in ids


def test_prepend_append_and_batch(tok):
    texts = ["hello world", "the lazy dog", ""]
    ids = tok.encode("hello world", prepend="<|bos|>", append="<|assistant_end|>")
    assert ids[0] == tok.get_bos_token_id() and ids[-1] == tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend=tok.get_bos_token_id())[0] == tok.get_bos_token_id()
    batch = tok.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [tok.encode(t, prepend="<|bos|>") for t in texts]
    with pytest.raises(ValueError):
        tok.encode(123)


def test_token_bytes_are_raw_bytes(tok):
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (300,)
    for s in SPECIAL_TOKENS:
        assert token_bytes[tok.encode_special(s)] == 0
    # byte 0x80 alone is not valid UTF-8: a lossy decode gives U+FFFD (3 bytes), the truth is 1 byte
    assert tok.decode([0x80]) == "\ufffd" and token_bytes[0x80] == 1
    invalid = 0
    for i in range(tok.get_vocab_size() - 9):
        raw = tok.enc.decode_single_token_bytes(i)
        assert token_bytes[i] == len(raw)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
    assert invalid > 128, "the corpus (Chinese, emoji) should yield merged tokens that are partial UTF-8"


def test_save_load_and_missing(tok, base_dir):
    with pytest.raises(NanochatError, match="^no tokenizer at .*; train a tokenizer first with: python -m scripts.tok_train$"):
        get_tokenizer()
    with pytest.raises(NanochatError, match="^no token bytes at .*; train a tokenizer first with: python -m scripts.tok_train$"):
        get_token_bytes()
    tok.save(os.path.join(base_dir, "tokenizer"))
    loaded = get_tokenizer()
    assert loaded.encode("The quick brown fox 🌍") == tok.encode("The quick brown fox 🌍")
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()
    assert torch.equal(get_token_bytes(), compute_token_bytes(tok))  # save writes token_bytes.pt too


def conversation():
    return {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "3*7"},
            {"type": "python_output", "text": "21"},
            {"type": "text", "text": "The answer is 21."},
        ]},
    ]}


def test_render_conversation_mask(tok):
    ids, mask = tok.render_conversation(conversation())
    assert len(ids) == len(mask)
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    sp = tok.encode_special
    # supervised tokens are exactly the assistant replies (incl. tool call) and <|assistant_end|>
    supervised = [i for i, m in zip(ids, mask) if m == 1]
    expected = (tok.encode("It is 4.") + [sp("<|assistant_end|>")] + tok.encode("Let me compute. ")
                + [sp("<|python_start|>")] + tok.encode("3*7") + [sp("<|python_end|>")]
                + tok.encode("The answer is 21.") + [sp("<|assistant_end|>")])
    assert supervised == expected
    # user text, starts of turns and tool output (output_start..output_end inclusive) are never supervised
    for special in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|output_start|>", "<|output_end|>"):
        assert all(m == 0 for i, m in zip(ids, mask) if i == sp(special))
    start, end = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
    assert ids[start + 1:end] == tok.encode("21") and set(mask[start:end + 1]) == {0}


def test_render_system_message_and_errors(tok):
    with_system = {"messages": [{"role": "system", "content": "sys prompt"}] + conversation()["messages"]}
    folded = conversation()
    folded["messages"][0]["content"] = "sys prompt\n\n" + folded["messages"][0]["content"]
    assert tok.render_conversation(with_system) == tok.render_conversation(folded)
    assert with_system == {"messages": [{"role": "system", "content": "sys prompt"}] + conversation()["messages"]}, \
        "the caller's conversation is not mutated"
    with pytest.raises(AssertionError):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": [{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": [{"type": "image", "text": "?"}]}]})


def test_render_truncation_and_completion(tok):
    ids, mask = tok.render_conversation(conversation(), max_tokens=32)
    assert len(ids) == 32 and len(mask) == 32
    conv = conversation()
    prompt = tok.render_for_completion(conv)
    assert conv == conversation()  # the caller's conversation keeps its last message
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.encode_special("<|python_start|>") not in prompt
    full_ids, _ = tok.render_conversation(conversation())
    assert prompt[:-1] == full_ids[:len(prompt) - 1]
    assert "\x1b[92m" in tok.visualize_tokenization(ids, mask)


def run_script(module, *args):
    """Run a script in-process (as `python -m module args`): interpreter start-up is slow on small machines."""
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv


def test_tok_train_and_tok_eval_scripts(base_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    # bad input first: no shards / bad vocab size / no tokenizer -> one clear line, nothing written
    with pytest.raises(SystemExit) as excinfo:
        run_script("scripts.tok_train", "--vocab-size=300")
    assert excinfo.value.code == 1
    assert re.fullmatch(r"error: no parquet shards in .*--from-dir.*\n", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        run_script("scripts.tok_train", "--vocab-size=100")
    assert "--vocab-size: must be an integer in [265, inf), got 100" in capsys.readouterr().err
    # shards from our own text
    src = tmp_path / "text"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(f"Document number {i}. " + " ".join(CORPUS[i % 4] for _ in range(3)))
    from nanochat.local_data import build_from_dir
    build_from_dir(str(src))
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        run_script("scripts.tok_eval")
    assert excinfo.value.code == 1
    assert re.fullmatch(r"error: no tokenizer at .*python -m scripts.tok_train\n", capsys.readouterr().err)
    assert not (base_dir / "tokenizer").exists()
    capsys.readouterr()
    run_script("scripts.tok_train", "--vocab-size=400", "--max-chars=100000", "--doc-cap=500")
    assert "token_bytes_mean" in capsys.readouterr().out
    tokenizer_dir = base_dir / "tokenizer"
    assert (tokenizer_dir / "tokenizer.pkl").exists()
    token_bytes = torch.load(tokenizer_dir / "token_bytes.pt")
    assert token_bytes.shape == (400,) and int(token_bytes[-9:].sum()) == 0 and int(token_bytes[0x80]) == 1
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")  # never let tiktoken try to download the GPT-2/GPT-4 encodings
    run_script("scripts.tok_eval")
    out = capsys.readouterr().out
    assert "local-train" in out and "local-val" in out
    assert "comparison with GPT-2 and GPT-4 skipped" in out
    report = (base_dir / "report" / "tokenizer-evaluation.md")
    if report.exists():  # written when nanochat.report is present
        assert "| local-val |" in report.read_text()
