"""
Chat evaluation: the categorical loop picks the argmax letter at the <|assistant_start|> position (checked with a
scripted model), ChatCORE centering, and scripts.chat_eval end to end on a tiny checkpoint with hand-made local data
(offline: tasks without data are skipped, ChatCORE is marked partial, the report section names the skips), plus the
bad-input paths (missing checkpoint, unknown task, a sandbox that refuses to run model code).
"""

import json
import math
import os
from dataclasses import asdict

import pytest
import torch

from conftest import RowCounter


def save_tiny_checkpoint(base_dir, tokenizer, make_tiny_model, family="chatsft_checkpoints", tag="d2", step=3):
    from nanochat.tokenizer import compute_token_bytes
    from nanochat.checkpoint_manager import save_checkpoint
    tok_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tok_dir)
    torch.save(compute_token_bytes(tokenizer), os.path.join(tok_dir, "token_bytes.pt"))
    model = make_tiny_model(tokenizer.get_vocab_size(), sequence_len=64)
    meta = dict(step=step, model_config=asdict(model.config), user_config={}, max_seq_len=64)
    save_checkpoint(os.path.join(base_dir, family, tag), step, model.state_dict(), None, meta)
    return model


def make_local_data(root):
    (root / "gsm8k").mkdir(parents=True)
    with open(root / "gsm8k" / "test.jsonl", "w") as f:
        for a in range(1, 6):
            f.write(json.dumps({"question": f"What is {a} plus {a}?",
                                "answer": f"{a}+{a}=<<{a}+{a}={2 * a}>>{2 * a}\n#### {2 * a}"}) + "\n")
    (root / "mmlu" / "test").mkdir(parents=True)
    with open(root / "mmlu" / "test" / "numbers_test.csv", "w") as f:
        f.write("question,choice0,choice1,choice2,choice3,answer\n")
        for i in range(8):
            f.write(f"Which number comes after {i}?,{i + 1},{i + 5},{i + 7},{i + 9},{i % 4}\n")
    (root / "english_words").mkdir()
    (root / "english_words" / "words_alpha.txt").write_text("apple\r\nbanana\r\ncherry\r\n")
    return root


@pytest.fixture
def eval_env(base_dir, tmp_path, monkeypatch, tiny_tokenizer, tiny_model_factory):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(make_local_data(tmp_path / "local")))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    save_tiny_checkpoint(str(base_dir), tiny_tokenizer, tiny_model_factory)
    return base_dir

# -----------------------------------------------------------------------------
# Loops with scripted stand-ins


class AlwaysLetterModel:
    """Scripted model: at every position the logit of `letter` is highest among the vocabulary."""
    def __init__(self, tokenizer, letter):
        self.vocab_size = tokenizer.get_vocab_size()
        self.letter_id = tokenizer.encode(letter)[0]
        self.calls = []
    def __call__(self, ids):
        self.calls.append(ids.shape)
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        logits[:, :, self.letter_id] = 10.0
        return logits
    def get_device(self):
        return torch.device("cpu")


class MCTask:
    eval_type = "categorical"
    def __init__(self, answers):
        self.answers = answers
    def __len__(self):
        return len(self.answers)
    def __getitem__(self, i):
        letters = ("A", "B", "C", "D")
        question = f"Question {i}?\n" + "".join(f"- choice{j}={l}\n" for j, l in enumerate(letters))
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": self.answers[i]}], "letters": letters}
    def evaluate(self, conversation, response):
        assert response in conversation["letters"]
        return response == conversation["messages"][-1]["content"]


def test_categorical_eval_takes_argmax_letter(tiny_tokenizer):
    from tasks.evaluate import run_categorical_eval
    task = MCTask(["B", "A", "B", "D", "B", "C", "B"])  # 4 of 7 answers are B
    model = AlwaysLetterModel(tiny_tokenizer, "B")
    accuracy, problems = run_categorical_eval(task, tiny_tokenizer, model, batch_size=3)
    assert accuracy == pytest.approx(4 / 7) and problems == 7
    assert len(model.calls) == 3  # ceil(7 / 3) batched forwards
    model = AlwaysLetterModel(tiny_tokenizer, "D")
    assert run_categorical_eval(task, tiny_tokenizer, model, batch_size=8, max_problems=4) == (pytest.approx(1 / 4), 4)


class RecordingTask:
    """Generative stand-in: records the completions it grades; a problem passes when one contains an "x"."""
    eval_type = "generative"
    def __init__(self, n):
        self.n, self.graded = n, {}
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        question = f"Question {i}: " + "why " * (3 * i)  # prompts of different lengths
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
    def evaluate(self, conversation, completion):
        self.graded.setdefault(conversation["messages"][0]["content"], []).append(completion)
        return "x" in completion


def test_generative_eval_batches_problems(tiny_tokenizer, tiny_model_factory):
    """Problems decoded together (rows per forward = -r/--rows) get the completions they get one at a time, so the
    same pass@n: greedy, and sampled with the per-problem seed."""
    from nanochat.engine import Engine
    from tasks.evaluate import run_generative_eval
    model = tiny_model_factory(tiny_tokenizer.get_vocab_size(), sequence_len=64)
    with torch.no_grad():  # decisive greedy choices: a batch's float rounding cannot flip a near-tie
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(30)
    # (temperature, samples per problem, rows): the most rows in one forward (whole problems, at least one)
    for temperature, num_samples, most_rows in ((0.0, 1, [1, 5]), (1.0, 3, [3, 6])):
        runs = []
        for rows, expected_rows in zip((1, 7), most_rows):
            task, counter = RecordingTask(5), RowCounter(model)
            accuracy, problems = run_generative_eval(task, tiny_tokenizer, model, Engine(counter, tiny_tokenizer),
                                                     num_samples=num_samples, max_new_tokens=10,
                                                     temperature=temperature, top_k=50, rows=rows)
            assert problems == 5
            assert max(counter.rows) == expected_rows
            runs.append((accuracy, task.graded))
        assert runs[0] == runs[1] and len(runs[0][1]) == 5 and 0 < runs[0][0] < 1


def test_chatcore_centering_and_standard_error():
    from nanochat.core_eval import accuracy_se
    from tasks.evaluate import CHATCORE_VARIANTS, chatcore_from_results, chatcore_lines, format_accuracy, ALL_TASKS
    results = {t: (0.25, 100) for t in ("ARC-Easy", "ARC-Challenge", "MMLU")}  # (accuracy, problems)
    results.update({"GSM8K": (0.5, 4), "HumanEval": (0.0, 4), "SpellingBee": (1.0, 4)})
    value, se, label = chatcore_from_results(results)
    assert label == "full" and value == pytest.approx((0 + 0 + 0 + 0.5 + 0 + 1.0) / 6)
    # each task's SE centered as its accuracy is (/ (1 - chance)); independent tasks: root of summed variances / 6
    centered_se = [accuracy_se(0.25, 100) / 0.75] * 3 + [accuracy_se(0.5, 4), accuracy_se(0.0, 4), accuracy_se(1.0, 4)]
    assert se == pytest.approx(math.sqrt(sum(s * s for s in centered_se)) / 6)
    assert accuracy_se(0.0, 4) == pytest.approx(0.1)  # 0 of 4 solved is no certainty of 0
    value, se5, label = chatcore_from_results(results, CHATCORE_VARIANTS["ChatCORE-5 metric"])
    assert label == "full" and value == pytest.approx(0.5 / 5)  # the 5-task value leaves SpellingBee out
    assert se5 == pytest.approx(math.sqrt(sum(s * s for s in centered_se[:5])) / 5)
    assert chatcore_lines(results) == {"ChatCORE metric": f"0.2500 ± {se:.4f} (312 examples)",
                                       "ChatCORE-5 metric": f"0.1000 ± {se5:.4f} (308 examples)"}
    assert format_accuracy(0.25, 100) == f"0.2500 ± {accuracy_se(0.25, 100):.4f} (100 examples)"
    del results["HumanEval"]
    value, se, label = chatcore_from_results(results)
    assert label == "partial (5/6 tasks)" and value == pytest.approx(1.5 / 5)
    _, se5, _ = chatcore_from_results(results, CHATCORE_VARIANTS["ChatCORE-5 metric"])
    assert chatcore_lines(results) == {"ChatCORE metric": f"0.3000 ± {se:.4f} partial (5/6 tasks; 308 examples)",
                                       "ChatCORE-5 metric": f"0.1250 ± {se5:.4f} partial (4/5 tasks; 304 examples)"}
    assert chatcore_lines(results, ["MMLU", "GSM8K"]) == {}  # neither variant's task list was asked for
    assert chatcore_from_results({}) == (None, None, "no task evaluated")
    assert len(ALL_TASKS) == 6

# -----------------------------------------------------------------------------
# The script


def test_chat_eval_selected_tasks(eval_env, capsys):
    from scripts import chat_eval
    results = chat_eval.main(["-i", "sft", "-a", "MMLU|GSM8K", "-x", "3", "-m", "8", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert set(results) == {"MMLU", "GSM8K"}
    # the same three MMLU problems scored one at a time: the argmax over the letters' logits after the prompt
    from nanochat.checkpoint_manager import load_model
    from tasks.mmlu import MMLU
    model, tokenizer, _ = load_model("sft", torch.device("cpu"), phase="eval")
    task, correct = MMLU(subset="all", split="test"), 0
    for i in range(3):
        conversation = task[i]
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.render_for_completion(conversation)]))[0, -1]
        letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
        predicted = conversation["letters"][int(logits[letter_ids].argmax())]
        correct += predicted == conversation["messages"][-1]["content"]
    assert results["MMLU"] == (correct / 3, 3)
    assert results["GSM8K"] == (0.0, 3)  # 8 greedy tokens of an untrained model hold no "#### <answer>"
    assert "MMLU accuracy:" in out and "GSM8K accuracy:" in out and "Final: " in out
    assert "ChatCORE metric" not in out  # only over the default task list
    report = (eval_env / "report" / "chat-evaluation-sft.md").read_text()
    assert "## Chat evaluation sft" in report and "ChatCORE" not in report
    assert f"- MMLU: {correct / 3:.4f} ± " in report and "(3 examples)" in report


def test_chat_eval_default_tasks_offline_is_partial(eval_env, capsys):
    from scripts import chat_eval
    results = chat_eval.main(["-i", "sft", "-x", "2", "-m", "4", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert set(results) == {"MMLU", "GSM8K", "SpellingBee"}
    assert "SKIPPED ARC-Easy" in out and "SKIPPED HumanEval" in out
    assert "ChatCORE metric: " in out and "partial (3/6 tasks; 6 examples)" in out
    assert "ChatCORE-5 metric: " in out and "partial (2/5 tasks; 4 examples)" in out
    report = (eval_env / "report" / "chat-evaluation-sft.md").read_text()
    assert "- ARC-Challenge: skipped (data unavailable)" in report
    assert "- ChatCORE metric: " in report and "partial (3/6 tasks; 6 examples)" in report
    assert "- ChatCORE-5 metric: " in report and "partial (2/5 tasks; 4 examples)" in report


def test_missing_checkpoint_is_a_clear_error(base_dir, capsys):
    from nanochat.errors import NanochatError
    from scripts import chat_eval
    with pytest.raises(SystemExit) as excinfo:
        chat_eval.main(["-i", "rl", "-r", "0", "--device-type", "cpu"])
    assert excinfo.value.code == 2 and "argument -r/--rows: must be" in capsys.readouterr().err
    with pytest.raises(NanochatError) as excinfo:
        chat_eval.main(["-i", "rl", "--device-type", "cpu"])
    assert "no rl checkpoint found" in str(excinfo.value)


def test_missing_tag_and_unknown_task_are_clear_errors(eval_env):
    from nanochat.errors import NanochatError
    from scripts import chat_eval
    with pytest.raises(NanochatError) as excinfo:
        chat_eval.main(["-i", "sft", "-g", "d99", "--device-type", "cpu"])
    assert "d99" in str(excinfo.value) and "d2" in str(excinfo.value)
    with pytest.raises(NanochatError, match=r"^unknown task\(s\) NotATask in -a/--task-name; choose from ARC-Easy\|"):
        chat_eval.main(["-i", "sft", "-a", "NotATask", "--device-type", "cpu"])


def test_a_refused_sandbox_is_a_clear_error(eval_env, monkeypatch):
    from scripts import chat_eval
    from nanochat.execution import SandboxUnavailable

    def refuse():
        raise SandboxUnavailable("refusing to run model-written code: bubblewrap is installed but cannot run python")
    monkeypatch.setattr(chat_eval, "isolation", refuse)
    with pytest.raises(SandboxUnavailable, match="^refusing to run model-written code: bubblewrap"):
        chat_eval.main(["-i", "sft", "-a", "HumanEval", "--device-type", "cpu"])
