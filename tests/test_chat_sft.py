"""
SFT on a tiny model: the packing loader (assistant-only targets, truncation instead of clogging, every row starts
with BOS), the step loss (a micro-batch without supervised tokens gives no NaN), and scripts.chat_sft end to end
(finite losses, checkpoint under chatsft_checkpoints, the "Chat SFT" report section, missing base checkpoint).
Everything runs offline on hand-made data in a temp NANOCHAT_LOCAL_DATA.
"""

import json
import math
import os
import re
from dataclasses import asdict

import pytest
import torch

SEQ_LEN = 64


def build_tiny_base(base_dir, tokenizer, make_tiny_model, tag="d2", step=5, seq_len=SEQ_LEN, with_optimizer=True):
    """A tiny base checkpoint + tokenizer in base_dir, as base_train would leave them."""
    from nanochat.tokenizer import compute_token_bytes
    from nanochat.checkpoint_manager import save_checkpoint
    tok_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tok_dir)
    torch.save(compute_token_bytes(tokenizer), os.path.join(tok_dir, "token_bytes.pt"))
    model = make_tiny_model(tokenizer.get_vocab_size(), sequence_len=seq_len)
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0)
    # one real step so the optimizer has momentum buffers to warm-start from
    x = torch.randint(0, tokenizer.get_vocab_size(), (2, seq_len))
    model(x, x).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    user_config = dict(depth=2, max_seq_len=seq_len, device_batch_size=2, total_batch_size=2 * seq_len,
                       embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02)
    meta = dict(step=step, val_bpb=3.0, model_config=asdict(model.config), user_config=user_config,
                device_batch_size=2, max_seq_len=seq_len, total_batch_size=2 * seq_len)
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", tag), step, model.state_dict(),
                    optimizer.state_dict() if with_optimizer else None, meta)
    return model


def make_local_data(root):
    """A tiny NANOCHAT_LOCAL_DATA folder: GSM8K, MMLU, SmolTalk-style chat, identity conversations, a word list."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "gsm8k").mkdir()
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a in range(2, 9) for b in range(1, 4)]
    for split in ("train", "test"):
        with open(root / "gsm8k" / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    for split in ("test", "auxiliary_train"):
        (root / "mmlu" / split).mkdir(parents=True)
        with open(root / "mmlu" / split / f"trivia_{split}.csv", "w") as f:
            f.write("question,choice0,choice1,choice2,choice3,answer\n")
            for i in range(12):
                f.write(f"What is {i} plus one?,{i + 1},{i + 2},{i + 3},{i + 4},0\n")
    (root / "smoltalk").mkdir()
    for split in ("train", "test"):
        with open(root / "smoltalk" / f"{split}.jsonl", "w") as f:
            for i in range(10):
                messages = [{"role": "user", "content": f"Say hello number {i}."},
                            {"role": "assistant", "content": f"Hello number {i}!"}]
                f.write(json.dumps({"messages": messages}) + "\n")
    (root / "nanochat_identity").mkdir()
    with open(root / "nanochat_identity" / "identity_conversations.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps([{"role": "user", "content": "Who are you?"},
                                {"role": "assistant", "content": f"I am nanochat, a small model (take {i})."}]) + "\n")
    (root / "english_words").mkdir()
    (root / "english_words" / "words_alpha.txt").write_text("apple\r\nbanana\r\ncherry\r\nstrawberry\r\nkiwi\r\n")
    return root


@pytest.fixture
def chat_env(base_dir, tmp_path, monkeypatch, tiny_tokenizer, tiny_model_factory):
    local = make_local_data(tmp_path / "local_data")
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(local))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    build_tiny_base(str(base_dir), tiny_tokenizer, tiny_model_factory)
    return base_dir


class ListTask:
    """A minimal task over a list of conversations (what the loader needs: len and int indexing)."""
    def __init__(self, conversations):
        self.conversations = conversations
    def __len__(self):
        return len(self.conversations)
    def __getitem__(self, i):
        return self.conversations[i]


def conversation(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

# -----------------------------------------------------------------------------
# Loader


def test_targets_are_assistant_tokens_only(tiny_tokenizer):
    from scripts.chat_sft import sft_batches
    tok = tiny_tokenizer
    conv = {"messages": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute "},
                                          {"type": "python", "text": "2+2"},
                                          {"type": "python_output", "text": "4"},
                                          {"type": "text", "text": " so it is 4."}]},
    ]}
    ids, mask = tok.render_conversation(conv)
    T = len(ids) + 5  # room for exactly one conversation plus padding
    x, y, _ = next(sft_batches(ListTask([conv]), tok, B=1, T=T, device="cpu"))
    assert x[0, 0].item() == tok.get_bos_token_id()
    supervised = y[0] >= 0
    expected = torch.zeros(T, dtype=torch.bool)
    expected[:len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.bool)
    assert torch.equal(supervised, expected)
    trained_ids = set(y[0][supervised].tolist())
    never = {tok.get_bos_token_id()} | {tok.encode_special(s) for s in
                                        ("<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                         "<|output_start|>", "<|output_end|>")}
    assert not (trained_ids & never)
    assert tok.encode_special("<|assistant_end|>") in trained_ids
    assert tok.encode_special("<|python_start|>") in trained_ids
    # the user's words are never targets
    user_only = set(tok.encode("What is two plus two?")) - set(tok.encode("Let me compute  so it is 4.2+2"))
    assert user_only and not (trained_ids & user_only)


def test_short_rows_never_clog_and_count_truncations(tiny_tokenizer):
    from scripts.chat_sft import sft_batches, new_packing_stats
    tok = tiny_tokenizer
    long_user = " ".join(["word"] * 200)
    convs = [conversation(long_user, "ok")] * 30  # nothing of the assistant survives a 16-token row: skipped
    convs += [conversation("hi", " ".join(["answer"] * 100))] * 30  # too long: truncated, still trainable
    convs += [conversation("hi", "short")] * 30
    stats = new_packing_stats()
    loader = sft_batches(ListTask(convs), tok, B=4, T=16, device="cpu", stats=stats, buffer_size=10)
    for _ in range(20):
        x, y, _ = next(loader)
        assert x.shape == (4, 16) and y.shape == (4, 16)
        assert (x[:, 0] == tok.get_bos_token_id()).all()
        assert ((y >= 0).sum(dim=1) > 0).all()  # every row trains on something: no pure-padding rows
    assert stats["truncated"] > 0 and stats["skipped"] > 0
    assert stats["padding"] < stats["tokens"] * 0.5


def test_zero_supervised_micro_batch_gives_no_nan(tiny_tokenizer, tiny_model_factory):
    from scripts.chat_sft import backward_token_mean
    V = tiny_tokenizer.get_vocab_size()
    model = tiny_model_factory(V)
    x = torch.randint(0, V, (2, 16))
    y_none = torch.full((2, 16), -1, dtype=torch.long)
    y_some = x.clone()
    y_some[:, :12] = -1
    # one micro-batch with nothing supervised next to a normal one
    n = int((y_some >= 0).sum())
    loss_sum = backward_token_mean(model, [(x, y_none), (x, y_some)], n)
    assert math.isfinite(loss_sum) and loss_sum > 0
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # a micro-batch alone with nothing supervised: zero gradient, not NaN
    model.zero_grad(set_to_none=True)
    backward_token_mean(model, [(x, y_none)], 1)
    for p in model.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad))
    # the normalization is a token mean over the whole step: same value as one big mean
    model.zero_grad(set_to_none=True)
    total = backward_token_mean(model, [(x, y_some)], n)
    reference = model(x, y_some, loss_reduction="mean").item()
    assert abs(total / n - reference) < 1e-4

# -----------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_chat_sft_end_to_end_offline(chat_env, capsys):
    from scripts import chat_sft
    result = chat_sft.main(["--device-type=cpu", "--num-iterations=3", "--device-batch-size=2",
                            "--eval-every=2", "--eval-tokens=256", "--chatcore-every=3", "--chatcore-max-cat=4",
                            "--chatcore-max-sample=1", "--chatcore-max-new-tokens=16",
                            "--simple-spelling-size=20", "--spelling-bee-size=20"])
    out = capsys.readouterr().out
    assert "Inherited max_seq_len=64 from pretrained checkpoint" in out
    assert "Loaded optimizer state from pretrained checkpoint" in out
    assert "OFFLINE" in out and "Training mixture:" in out
    assert result["step"] == 3
    assert all(math.isfinite(r["loss"]) for r in result["history"]["train"])
    assert math.isfinite(result["val_loss"]) and math.isfinite(result["val_bpb"])
    assert "step 00003" in out and re.search(r"Step 00002 \| Validation bpb: \S+ ± \S+ \| Validation loss", out)
    assert result["history"]["val"][-1]["val_bpb_se"] > 0
    assert "lrm: 1.00" in out  # the first step runs at the initial LR
    # ChatCORE at the last step: MMLU (MC accuracy) from local data, ARC/HumanEval absent -> partial
    assert re.search(r"Step 00003 \| ChatCORE: \S+ ± \S+ \| ChatCORE_cat: \S+ ± \S+ partial", out)
    assert "MMLU" in result["history"]["chatcore"][-1]
    ckpt = chat_env / "chatsft_checkpoints" / "d2"
    assert (ckpt / "model_000003.pt").exists() and (ckpt / "meta_000003.json").exists()
    meta = json.loads((ckpt / "meta_000003.json").read_text())
    assert meta["max_seq_len"] == 64 and meta["model_config"]["n_layer"] == 2
    report = (chat_env / "report" / "chat-sft.md").read_text()
    assert "## Chat SFT" in report and "Number of iterations: 3" in report
    assert re.search(r"- Final validation bpb: \S+ ± \S+ \([\d,]+ tokens\)", report)
    # the SFT checkpoint loads back for chatting
    from nanochat.checkpoint_manager import load_model
    model, _, _ = load_model("sft", "cpu", phase="eval")
    assert model.config.n_layer == 2


def test_missing_base_checkpoint_is_a_clear_error(base_dir):
    from scripts import chat_sft
    from nanochat.common import NanochatError
    with pytest.raises(NanochatError) as excinfo:
        chat_sft.main(["--device-type=cpu"])
    assert "no base checkpoint found" in str(excinfo.value)


def test_indivisible_total_batch_size_is_a_clear_error(chat_env):
    from scripts import chat_sft
    from nanochat.common import NanochatError
    with pytest.raises(NanochatError) as excinfo:
        chat_sft.main(["--device-type=cpu", "--total-batch-size=100", "--dry-run=1"])
    assert "must be a multiple of" in str(excinfo.value)


def test_mixture_with_nothing_but_the_checkout(tmp_path, monkeypatch, capsys):
    """Offline with no local data: the parts that need downloads are left out and named; identity conversations and
    the spelling tasks (bundled data) remain, in the same order every time."""
    from scripts.chat_sft import build_parser, build_mixture
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    args = build_parser().parse_args(["--simple-spelling-size=50", "--spelling-bee-size=30"])
    train, val, description, unavailable = build_mixture(args)
    assert [u.split(" (")[0] for u in unavailable] == ["SmolTalk train", "MMLU auxiliary_train", "GSM8K train",
                                                      "SmolTalk test", "MMLU test[:5200]", "GSM8K test[:420]"]
    assert description.startswith("identity conversations") and "SimpleSpelling 50" in description
    assert "SpellingBee 30" in description and len(val) == 256
    out = capsys.readouterr().out
    assert "OFFLINE" in out and "unavailable: GSM8K train" in out
    again, _, _, _ = build_mixture(args)
    assert [json.dumps(train[i]) for i in range(len(train))] == [json.dumps(again[i]) for i in range(len(again))]


def test_truncated_base_checkpoint_is_one_clear_line(chat_env, capsys):
    from nanochat.cli import run
    from scripts import chat_sft
    model_file = chat_env / "base_checkpoints" / "d2" / "model_000005.pt"
    model_file.write_bytes(model_file.read_bytes()[:500])
    with pytest.raises(SystemExit) as excinfo:  # through cli.run, as `python -m scripts.chat_sft` runs main
        run(lambda: chat_sft.main(["--device-type=cpu", "--dry-run=1"]))
    message = capsys.readouterr().err.strip()
    assert excinfo.value.code == 1 and message.startswith("error:") and "\n" not in message and str(model_file) in message
    assert "no earlier complete step" in message


def test_model_tag_is_a_plain_name(chat_env):
    from scripts import chat_sft
    from nanochat.common import NanochatError
    with pytest.raises(NanochatError) as excinfo:
        chat_sft.main(["--device-type=cpu", "--model-tag=../../x", "--dry-run=1"])
    assert str(excinfo.value).startswith("--model-tag=")


def test_full_disk_at_the_save_is_one_clear_line(chat_env, full_disk):
    from scripts import chat_sft
    from nanochat.checkpoint_manager import CheckpointSaveError
    with pytest.raises(CheckpointSaveError) as excinfo:
        chat_sft.main(["--device-type=cpu", "--num-iterations=1", "--device-batch-size=2", "--eval-tokens=256",
                       "--chatcore-every=-1", "--simple-spelling-size=20", "--spelling-bee-size=20"])
    message = str(excinfo.value)
    assert message.startswith("could not save the checkpoint of step 1") and "\n" not in message, message
    assert "No space left on device" in message
    assert os.listdir(chat_env / "chatsft_checkpoints" / "d2") == []
