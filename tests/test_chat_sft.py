"""
SFT on a tiny model: the packing loader (assistant-only targets, truncation instead of clogging, every row starts
with BOS; its state resumes exactly and redistributes over another number of ranks, traced conversation by
conversation), the step loss (a micro-batch without supervised tokens gives no NaN), and scripts.chat_sft end to end
(finite losses, checkpoint under chatsft_checkpoints, the "Chat SFT" report section, missing base checkpoint; resume:
bit-identical, SIGTERM, kill -9 during a save, an old final checkpoint, divergence, 2 gloo processes -> 1).
Everything runs offline on hand-made data in a temp NANOCHAT_LOCAL_DATA.
"""

import json
import math
import os
import re
import sys
import time
import signal
import pathlib
import subprocess
from collections import Counter
from dataclasses import asdict

import pytest
import torch

from conftest import script_cmd, terminate_after_line

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
    from nanochat.sft_dataloader import sft_batches
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
    from nanochat.sft_dataloader import sft_batches
    tok = tiny_tokenizer
    long_user = " ".join(["word"] * 200)
    convs = [conversation(long_user, "ok")] * 30  # nothing of the assistant survives a 16-token row: skipped
    convs += [conversation("hi", " ".join(["answer"] * 100))] * 30  # too long: truncated, still trainable
    convs += [conversation("hi", "short")] * 30
    loader = sft_batches(ListTask(convs), tok, B=4, T=16, device="cpu", buffer_size=10)
    for _ in range(20):
        x, y, state = next(loader)
        assert x.shape == (4, 16) and y.shape == (4, 16)
        assert (x[:, 0] == tok.get_bos_token_id()).all()
        assert ((y >= 0).sum(dim=1) > 0).all()  # every row trains on something: no pure-padding rows
    stats = state["stats"]
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


def test_seed_sets_the_mixture_order():
    """--seed shuffles the training mixture (TaskMixture's seed); 42, the default, is the order it always had."""
    import random
    from tasks.common import TaskMixture
    parts = [ListTask([conversation(f"{name}{i}", "ok") for i in range(20)]) for name in "ab"]

    def order(mixture):
        return [example["messages"][0]["content"] for example in mixture]
    assert order(TaskMixture(parts, seed=1)) == order(TaskMixture(parts, seed=1)) != order(TaskMixture(parts, seed=2))
    before = [(t, i) for t in range(2) for i in range(20)]
    random.Random(42).shuffle(before)  # what TaskMixture did before it took a seed
    assert order(TaskMixture(parts)) == [f"{'ab'[t]}{i}" for t, i in before]


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_another_seed_differs(chat_env):
    """Two SFT runs with the same --seed give the same losses and weights bit for bit; another seed trains on the
    mixture in another order. The seed is in the checkpoint meta and the report section."""
    from scripts import chat_sft

    def finetune(seed):
        result = chat_sft.main(["--device-type=cpu", "--num-iterations=3", "--device-batch-size=2", "--eval-every=-1",
                                "--eval-tokens=256", "--chatcore-every=-1", "--simple-spelling-size=20",
                                "--spelling-bee-size=20", f"--seed={seed}"])
        checkpoint = chat_env / "chatsft_checkpoints" / "d2"
        assert json.loads((checkpoint / "meta_000003.json").read_text())["seed"] == seed
        return result, torch.load(checkpoint / "model_000003.pt")
    (first, first_weights), (again, again_weights), (other, other_weights) = finetune(5), finetune(5), finetune(6)
    assert first["history"] == again["history"]
    assert all(torch.equal(first_weights[k], again_weights[k]) for k in first_weights)
    assert [r["loss"] for r in first["history"]["train"]] != [r["loss"] for r in other["history"]["train"]]
    assert not torch.equal(first_weights["lm_head.weight"], other_weights["lm_head.weight"])
    assert "- seed: 6" in (chat_env / "report" / "chat-sft.md").read_text()


# -----------------------------------------------------------------------------
# The loader's state: exact resume, and redistribution over another number of ranks


def single_token_words(tokenizer, count):
    """Words that stay one token each when concatenated (' foo bar' -> [' foo', ' bar'])."""
    words = [s for s in (tokenizer.decode([t]) for t in range(tokenizer.get_vocab_size()))
             if len(s) > 2 and s[0] == " " and s[1:].isalpha() and s[1:].islower() and len(tokenizer.encode(s)) == 1]
    assert len(words) >= count
    return words[:count]


class TracedTask:
    """Conversation i says which it is (two words) and how many times it had been used (from the rows) when fetched:
    a fetch for a second use of a conversation renders differently from its first, so the rows tell the uses apart."""
    def __init__(self, tokenizer, length):
        self.words = single_token_words(tokenizer, 23)
        self.length, self.uses = length, Counter()
        self.identify = {}
        for i in range(length):
            for use in (1, 2, 3):
                ids, _ = tokenizer.render_conversation(self.conversation(i, use))
                self.identify[tuple(ids)] = (i, use)
        assert len(self.identify) == 3 * length and len({len(k) for k in self.identify}) == 1  # unique, equal lengths
        self.conversation_len = len(next(iter(self.identify)))

    def conversation(self, i, use):
        w = self.words
        return {"messages": [{"role": "user", "content": w[i // 10] + w[10 + i % 10]},
                             {"role": "assistant", "content": w[19 + use]}]}

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.conversation(i, self.uses[i] + 1)

    def used_in(self, x, y, bos):
        """(conversation, use) of every conversation packed in a batch, row by row; updates the use counts."""
        found = []
        for inputs, targets in zip(x.tolist(), y.tolist()):
            row = inputs + [targets[-1] if targets[-1] >= 0 else bos]
            starts = [j for j, t in enumerate(row) if t == bos] + [len(row)]
            segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:]) if b - a > 1]  # (padding is lone BOS)
            found += [self.identify[s] for s in segments]
        self.uses.update(i for i, _ in found)
        return found


@pytest.mark.parametrize("phases", [
    [(2, [3, 2]), 1],               # 2 -> 1 (the old ranks unevenly far: one batch apart)
    [(1, [3]), 2],                  # 1 -> 2
    [(2, [3, 1]), (3, [1, 2, 0]), 1],  # 2 -> 3 -> 1: a resharded state reshards again
])
def test_every_conversation_of_the_epoch_is_used_once_across_world_size_changes(tiny_tokenizer, phases):
    """Ranks simulated in process (rank, world_size): each phase's loaders start from the previous phase's last
    states; the last phase runs until every conversation was used. Within the epoch none is used twice (each use
    of a conversation renders it differently, so a second use shows in the rows) and none is skipped."""
    from nanochat.sft_dataloader import sft_batches, resume_state
    tok = tiny_tokenizer
    bos = tok.get_bos_token_id()
    task = TracedTask(tok, 80)  # long enough that no rank reaches the next epoch before the last phase
    T = 2 * task.conversation_len - 1  # exactly two conversations per row: a rank uses 2 x B per batch
    uses_by_rank = []  # every (conversation, use) a rank packed, in order, per phase

    def run_phase(world_size, batches_per_rank, states):
        loaders = [sft_batches(task, tok, B=2, T=T, device="cpu", rank=r, world_size=world_size,
                               state=resume_state(states, r, world_size), buffer_size=4) for r in range(world_size)]
        last = [resume_state(states, r, world_size) for r in range(world_size)]
        used = [[] for _ in range(world_size)]
        for round_ in range(max(batches_per_rank) if batches_per_rank else 100):
            if not batches_per_rank and all(task.uses[i] > 0 for i in range(len(task))):
                break  # the epoch is used up
            for r, loader in enumerate(loaders):
                if batches_per_rank and round_ >= batches_per_rank[r]:
                    continue
                x, y, last[r] = next(loader)
                used[r] += task.used_in(x, y, bos)
        uses_by_rank.extend(used)
        return last

    states = None
    for phase in phases[:-1]:
        states = run_phase(*phase, states)
        json.loads(json.dumps(states))  # the states go into a JSON meta
    run_phase(phases[-1], None, states)
    first_uses = Counter(i for used in uses_by_rank for i, use in used if use == 1)
    assert first_uses == Counter(range(len(task))), "a conversation of the epoch used twice or never"
    for used in uses_by_rank:  # a rank goes on to the next epoch only once it has used its share of this one
        assert [use for _, use in used] == sorted(use for _, use in used), used


def test_loader_resumes_exactly_at_the_next_batch(tiny_tokenizer):
    """On the same number of ranks the state of batch k resumes at batch k + 1, also after a reshard and past the end
    of an epoch (the buffer is re-rendered, its conversations are not counted twice)."""
    from nanochat.sft_dataloader import sft_batches, resume_state
    tok = tiny_tokenizer
    convs = [conversation("hi" + " there" * (i % 5), "answer" + " more" * (i % 7)) for i in range(23)]
    start = [resume_state(None, r, 2) for r in range(2)]
    start[1] = next(sft_batches(ListTask(convs), tok, B=2, T=24, device="cpu", rank=1, world_size=2, buffer_size=5))[2]
    start = [resume_state(start, r, 3) for r in range(3)]  # the 2 -> 3 reshard leaves pending positions
    for rank in range(3):
        def loader(state):
            return sft_batches(ListTask(convs), tok, B=2, T=24, device="cpu", rank=rank, world_size=3, state=state,
                               buffer_size=5)
        uninterrupted = [next(b) for b in [loader(start[rank])] for _ in range(12)]
        resumed = [next(b) for b in [loader(json.loads(json.dumps(uninterrupted[4][2])))] for _ in range(7)]
        for (x, y, state), (x2, y2, state2) in zip(uninterrupted[5:], resumed):
            assert torch.equal(x, x2) and torch.equal(y, y2) and state == state2
        assert uninterrupted[-1][2]["epoch"] >= 2  # the run went past the end of the epoch


def test_resharding_keeps_every_position_once(tiny_tokenizer):
    """The positions a set of states has yet to use (buffers, pending, strides up to a horizon) are the same before
    and after a reshard, 2 -> 3 -> 1 -> 2, also near the end of an epoch where ranks stand in different epochs."""
    from nanochat.sft_dataloader import sft_batches, resume_state
    tok = tiny_tokenizer
    convs = [conversation("q" + " word" * (i % 4), "a" + " reply" * (i % 9)) for i in range(11)]

    def ahead(states, horizon=400):
        world = len(states)
        return Counter(p for s in states for p in [*s["buffer"], *s["pending"], *range(s["cursor"], horizon, world)])
    states = [resume_state(None, r, 2) for r in range(2)]
    for world_size, batches in ((2, [3, 5]), (3, [2, 0, 4]), (1, [3]), (2, [1, 1])):
        states = [resume_state(states, r, world_size) for r in range(world_size)]
        for r, n in enumerate(batches):
            loader = sft_batches(ListTask(convs), tok, B=1, T=20, device="cpu", rank=r, world_size=world_size,
                                 state=states[r], buffer_size=3)
            for _ in range(n):
                states[r] = next(loader)[2]
        for new_world in (1, 2, 3, 5):
            resharded = [resume_state(states, r, new_world) for r in range(new_world)]
            assert ahead(resharded) == ahead(states), (world_size, new_world)
            assert all(v == 1 for v in ahead(resharded).values())
            assert sum(s["used"] for s in resharded) == sum(s["used"] for s in states)
    assert len({s["epoch"] for s in states}) >= 1 and max(s["epoch"] for s in states) >= 2

# -----------------------------------------------------------------------------
# Resume end to end: bit-identical, SIGTERM, kill -9 during a save, old checkpoints, 2 processes -> 1

REPO = pathlib.Path(__file__).resolve().parents[1]
# a small mixture (28 rows: ~12 steps of 128 tokens for one pass), eager (a pass over the mixture counts as a long run)
SMALL = ["--device-type=cpu", "--compile=off", "--device-batch-size=2", "--eval-tokens=256", "--chatcore-every=-1",
         "--mmlu-epochs=0", "--gsm8k-epochs=0", "--identity-epochs=1", "--simple-spelling-size=6",
         "--spelling-bee-size=6"]


def step_lines(out):
    """{step: the line without its timings} of the per-step lines."""
    return {int(l.split()[1]): " | ".join(p for p in l.split(" | ") if not p.startswith(("dt:", "tok/sec:", "total time:")))
            for l in out.splitlines() if l.startswith("step ")}


def sft_dir(base_dir):
    return pathlib.Path(base_dir) / "chatsft_checkpoints" / "d2"


def optimizer_file(directory, step):
    (path,) = directory.glob(f"optim_{step:06d}*.pt")  # one file per rank, or one for all (same world size here)
    return path


def assert_same_tensors(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(assert_same_tensors(x, y) is None for x, y in zip(a, b))
    else:
        assert a == b


@pytest.mark.slow
def test_resume_is_bit_identical(chat_env, capsys):
    from scripts import chat_sft
    args = SMALL + ["--save-every=4", "--eval-every=4"]
    full = chat_sft.main(args)
    out_full = capsys.readouterr().out
    end = full["step"]
    assert end > 5 and f"step {end:05d} (" in out_full
    d = sft_dir(chat_env)
    full_model, full_optim = torch.load(d / f"model_{end:06d}.pt"), torch.load(optimizer_file(d, end))
    resumed = chat_sft.main(args + ["--resume-from-step=4"])
    out_resumed = capsys.readouterr().out
    assert f"Resuming from step 4 of {d}: saved by 1 process(es), now 1" in out_resumed
    a, b = step_lines(out_full), step_lines(out_resumed)
    assert sorted(b) == list(range(5, end + 1)), b
    assert all(a[s] == b[s] for s in b), [(a[s], b[s]) for s in b if a[s] != b[s]]
    assert resumed["step"] == end and resumed["val_bpb"] == full["val_bpb"]
    assert resumed["history"] == full["history"]  # the report's curves: the saved part and the rest
    assert resumed["stats"] == full["stats"]  # the packing counts of the whole run, not of its second half
    assert_same_tensors(full_model, torch.load(d / f"model_{end:06d}.pt"))
    assert_same_tensors(full_optim, torch.load(optimizer_file(d, end)))
    meta = json.loads((d / f"meta_{end:06d}.json").read_text())
    assert meta["stage"] == "sft" and meta["world_size"] == 1 and meta["loop_state"]["progress"] >= 1.0
    assert set(meta["dataloader_state_dict"]) >= {"cursor", "pending", "buffer", "used", "stats"}


def sft_env(**extra):
    env = dict(os.environ)  # the chat_env fixture's base dir, local data and offline switch
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NANOCHAT_DTYPE="float32", **extra)
    return env


def chat_sft_cmd(args, nproc=1):
    return script_cmd("scripts.chat_sft", args, nproc)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(chat_env):
    proc = subprocess.Popen(chat_sft_cmd(SMALL + ["--num-iterations=100000", "--eval-every=-1"]), cwd=REPO,
                            env=sft_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = terminate_after_line(proc, "step 00002 ")
    assert proc.returncode == 0, output[-3000:]
    step = int(output.split("Stopped by signal at step ")[1].split(";")[0])
    assert step >= 2 and f"resume with --resume-from-step={step}" in output
    from nanochat.checkpoint_manager import complete_steps
    assert complete_steps(str(sft_dir(chat_env))) == [step]
    meta = json.loads((sft_dir(chat_env) / f"meta_{step:06d}.json").read_text())
    assert meta["step"] == step and meta["loop_state"]["history"]["train"][-1]["step"] == step
    assert not (chat_env / "report" / "chat-sft.md").exists()  # a preempted run is not a finished run


# Run in the child: the write of step 2's model stops the process (SIGSTOP) after a few bytes, inside
# save_checkpoint's atomic write; the test sees the temp file and kills the process with SIGKILL.
STOP_IN_SAVE = """
import os, signal, sys
from nanochat import checkpoint_manager
from nanochat.cli import run
from scripts.chat_sft import main
real_write = checkpoint_manager.atomic_write
def stopping_write(path, write_fn, mode="wb"):
    if os.path.basename(path) != "model_000002.pt":
        return real_write(path, write_fn, mode)
    def partial(f):
        f.write(b"half a model")
        f.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    return real_write(path, partial, mode)
checkpoint_manager.atomic_write = stopping_write
run(lambda: main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_step_loadable(chat_env):
    d = sft_dir(chat_env)
    proc = subprocess.Popen([sys.executable, "-c", STOP_IN_SAVE, *SMALL, "--num-iterations=6", "--save-every=1",
                             "--eval-every=-1"], cwd=REPO, env=sft_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not list(d.glob("model_000002.pt.tmp.*")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no save of step 2 started"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL, inside the save of step 2
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    from nanochat.checkpoint_manager import complete_steps, load_checkpoint, load_model
    assert complete_steps(str(d)) == [1]
    model, _, meta = load_model("sft", "cpu", phase="eval")
    assert meta["step"] == 1 and model.config.n_layer == 2
    _, optimizer_data, _ = load_checkpoint(str(d), 1, "cpu", load_optimizer=True)
    assert optimizer_data


def test_an_old_final_sft_checkpoint_loads_but_does_not_resume(chat_env, tiny_model_factory, tiny_tokenizer, capsys):
    """A checkpoint of chat_sft from before it could resume (a final model, no stage, no loop state) still loads for
    chatting and as chat_rl's start; resuming from it is one line saying why not."""
    from nanochat.checkpoint_manager import save_checkpoint, load_model
    from nanochat.cli import run
    from scripts import chat_sft
    model = tiny_model_factory(tiny_tokenizer.get_vocab_size())
    old_meta = dict(step=7, val_bpb=2.5, val_loss=1.9, model_config=asdict(model.config), user_config={},
                    max_seq_len=SEQ_LEN, device_batch_size=2, total_batch_size=2 * SEQ_LEN, mixture="", chatcore=None)
    save_checkpoint(str(sft_dir(chat_env)), 7, model.state_dict(), None, old_meta)
    loaded, _, meta = load_model("sft", "cpu", phase="eval")
    assert meta["step"] == 7 and loaded.config.n_layer == 2
    with pytest.raises(SystemExit) as excinfo:
        run(lambda: chat_sft.main(SMALL + ["--resume-from-step=7"]))
    err = capsys.readouterr().err.strip()
    assert excinfo.value.code == 1 and "\n" not in err, err
    assert err.startswith("error: --resume-from-step=7:") and "without the state of its training loop" in err


def test_divergence_stops_with_one_line_and_saves_nothing_non_finite(chat_env):
    from scripts import chat_sft
    from nanochat.resume import TrainingDiverged
    from nanochat.checkpoint_manager import complete_steps, is_finite_state
    with pytest.raises(TrainingDiverged) as excinfo:
        chat_sft.main(SMALL + ["--num-iterations=8", "--save-every=1", "--eval-every=-1", "--embedding-lr=3e11",
                               "--unembedding-lr=8e9", "--matrix-lr=2e10"])
    message = str(excinfo.value)
    assert "non-finite" in message and "\n" not in message
    d = sft_dir(chat_env)
    steps = complete_steps(str(d)) if d.exists() else []
    for step in steps:
        assert is_finite_state(torch.load(d / f"model_{step:06d}.pt"))
        assert is_finite_state(torch.load(optimizer_file(d, step)))
    assert (f"last good checkpoint is step {steps[-1]}" if steps else "no checkpoint of this run") in message


@pytest.mark.slow
def test_two_processes_resume_on_one(chat_env):
    """2 gloo processes save at step 2; one process resumes (2 micro-steps for the same 256-token steps), takes the
    conversations the two ranks had not used, and finishes the pass over the mixture."""
    args = SMALL + ["--total-batch-size=256", "--save-every=2", "--eval-every=-1"]
    two = subprocess.run(chat_sft_cmd(args, nproc=2), cwd=REPO, env=sft_env(), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "gradient accumulation steps: 1" in two.stdout
    end = max(step_lines(two.stdout))
    one = subprocess.run(chat_sft_cmd(args + ["--resume-from-step=2"]), cwd=REPO, env=sft_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    out = one.stdout
    assert f"Resuming from step 2 of {sft_dir(chat_env)}: saved by 2 process(es), now 1" in out
    assert "the loader states of 2 rank(s) are redistributed over 1" in out
    assert "gradient accumulation steps: 2" in out
    steps = step_lines(out)
    assert min(steps) == 3 and abs(max(steps) - end) <= 1  # one pass over the mixture, as the 2-process run made
    meta = json.loads((sft_dir(chat_env) / f"meta_{max(steps):06d}.json").read_text())
    assert meta["world_size"] == 1 and meta["loop_state"]["progress"] >= 1.0
