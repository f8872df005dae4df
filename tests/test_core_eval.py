"""
CORE evaluation: prompt rendering, which tokens are scored, the three task types, seeds, the real bundle, distributed
evaluation and the base_eval command line. Uses a byte-level tokenizer and a bigram "model" written here, so the
tests do not depend on the rest of the package; the real tiny GPT is used too where it is available.
"""

import io
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nanochat import core_eval
from nanochat.core_eval import (
    batch_sequences_lm, batch_sequences_mc, batch_sequences_schema, centered_accuracy, core_label, core_metric,
    evaluate_task, render_prompts_lm, render_prompts_mc, render_prompts_schema, sample_fewshot, score_example,
    shuffle_and_truncate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_BUNDLE = SHARED_DATA / "eval_bundle"


# -----------------------------------------------------------------------------
# Stand-ins: a byte tokenizer (ids 0-255 = bytes, 256 = BOS) and a bigram model (logits depend on the current token)

class ByteTokenizer:
    bos = 256

    def get_bos_token_id(self):
        return self.bos

    def get_vocab_size(self):
        return 257

    def _one(self, text, prepend):
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids

    def encode(self, text, prepend=None, append=None, num_threads=1):
        if isinstance(text, str):
            return self._one(text, prepend)
        return [self._one(t, prepend) for t in text]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class MergingTokenizer(ByteTokenizer):
    """Like ByteTokenizer but "ab" is one token (id 300): token sequences of a text and its extension may diverge."""

    def _one(self, text, prepend):
        ids, i, raw = [], 0, text.encode("utf-8")
        while i < len(raw):
            if raw[i:i + 2] == b"ab":
                ids.append(300)
                i += 2
            else:
                ids.append(raw[i])
                i += 1
        return ([prepend] if prepend is not None else []) + ids


class BigramModel(nn.Module):
    """logits[b, t] = table[idx[b, t]]. "successor" mode: each byte strongly predicts the next byte value."""

    def __init__(self, vocab_size=301, successor=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab_size, vocab_size, generator=g)
        if successor:
            table = torch.zeros(vocab_size, vocab_size)
            for i in range(255):
                table[i, i + 1] = 10.0
        self.table = nn.Parameter(table)

    def forward(self, idx):
        return self.table[idx]


class ConstantModel(nn.Module):
    """Always predicts token 0 (NUL, never in the text) with logit 100: every scored token costs exactly 100.0, so
    all choices tie and choice 0 wins, and greedy decoding never reproduces a continuation."""

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 301)
        logits[..., 0] = 100.0
        return logits


TOK = ByteTokenizer()
MC_META = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}


# -----------------------------------------------------------------------------
# Prompt rendering: the exact strings of the reference

def test_render_multiple_choice_exact_strings():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c"], "gold": 0}]
    item = {"query": "Q", "choices": ["x", "y"], "gold": 0}
    assert render_prompts_mc(item, " ", shots) == ["Q1 b\n\nQ2 c\n\nQ x", "Q1 b\n\nQ2 c\n\nQ y"]
    assert render_prompts_mc(item, "\nAnswer: ", []) == ["Q\nAnswer: x", "Q\nAnswer: y"]


def test_render_schema_exact_strings():
    shots = [{"context_options": ["c0", "c1"], "continuation": "k", "gold": 1}]
    item = {"context_options": ["A", "B"], "continuation": "end.", "gold": 0}
    assert render_prompts_schema(item, " ", shots) == ["c1 k\n\nA end.", "c1 k\n\nB end."]


def test_render_language_modeling_strips_without_prompt():
    shots = [{"context": "  s1 ", "continuation": "r1"}]
    item = {"context": " ctx\n", "continuation": "cont"}
    without, with_cont = render_prompts_lm(item, "\nAnswer: ", shots)
    assert without == "s1\nAnswer: r1\n\nctx\nAnswer:"
    assert with_cont == "s1\nAnswer: r1\n\nctx\nAnswer: cont"


# -----------------------------------------------------------------------------
# Which tokens are scored

def test_mc_scores_only_where_choices_differ():
    tokens, starts, ends = batch_sequences_mc(TOK, ["Q: cat", "Q: car", "Q: dog"])
    assert all(t[0] == TOK.bos for t in tokens)
    # common prefix is BOS + "Q: " = 4 tokens, so "cat"/"car"/"dog" are scored whole
    assert starts == [4, 4, 4] and ends == [7, 7, 7]
    tokens, starts, ends = batch_sequences_mc(TOK, ["Q: cat", "Q: car"])
    assert starts == [6, 6]  # shared "ca" is not scored: only the differing last byte


def test_mc_prefix_option_gets_nonempty_span_and_no_nan():
    # "ab" is a token-prefix of "abc": the reference would score an empty span (NaN) for it
    tokens, starts, ends = batch_sequences_mc(TOK, ["Q ab", "Q abc"])
    assert all(s < e for s, e in zip(starts, ends))
    data = [{"query": "Q ", "choices": ["ab", "abc"], "gold": 1}, {"query": "Q ", "choices": ["ab", "ab"], "gold": 0}]
    model = BigramModel(seed=1)
    for idx in range(2):
        correct, losses = score_example(idx, model, TOK, data, "cpu", MC_META)
        assert all(math.isfinite(x) for x in losses), losses
    # successor model: "ab" and "abc" both score only successor tokens, so they tie exactly and choice 0 wins:
    # item 0 (gold 1) is wrong, item 1 (gold 0) is right
    assert evaluate_task(BigramModel(successor=True), TOK, data, "cpu", MC_META) == 0.5
    # identical choices tie, and the first one wins (gold 0 -> correct)
    assert score_example(1, model, TOK, data, "cpu", MC_META)[0] is True


def test_schema_scores_shared_continuation():
    tokens, starts, ends = batch_sequences_schema(TOK, ["the cat sat.", "a dog sat."])
    # common suffix is " sat." (5 bytes)
    assert [e - s for s, e in zip(starts, ends)] == [5, 5]
    assert [TOK.decode(t[s:e]) for t, s, e in zip(tokens, starts, ends)] == [" sat.", " sat."]


def test_lm_scores_the_continuation_and_handles_merges():
    tokens, starts, ends = batch_sequences_lm(TOK, ["ctx:", "ctx: word"])
    assert len(tokens) == 1 and TOK.decode(tokens[0][starts[0]:ends[0]]) == " word"
    # with a merge across the boundary the reference asserts; we score from the common prefix
    merging = MergingTokenizer()
    tokens, starts, ends = batch_sequences_lm(merging, ["xa", "xab"])
    assert tokens[0] == [256, ord("x"), 300] and (starts, ends) == ([2], [3])


def test_crop_to_model_window_shifts_spans():
    model = BigramModel(successor=True)
    model.max_seq_len = 6
    data = [{"context": "abcdefgh", "continuation": "ijk"}]
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": ""}
    tokens, starts, ends = core_eval.prepare_example(0, model, TOK, data, meta)
    assert len(tokens[0]) == 6 and TOK.decode(tokens[0][starts[0]:ends[0]]) == "ijk"
    assert evaluate_task(model, TOK, data, "cpu", meta) == 1.0


# -----------------------------------------------------------------------------
# The three task types end to end with a model whose answers we know

def test_language_modeling_exact_match():
    model = BigramModel(successor=True)  # greedy continuation of "abc" is "def..."
    data = [{"context": "abc", "continuation": "def"}, {"context": "abc", "continuation": "dxf"},
            {"context": "pq", "continuation": "rs"}]
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": ""}
    results = [score_example(i, model, TOK, data, "cpu", meta)[0] for i in range(3)]
    assert results == [True, False, True]
    assert evaluate_task(model, TOK, data, "cpu", meta) == pytest.approx(2 / 3)


def test_multiple_choice_picks_lowest_mean_loss():
    model = BigramModel(successor=True)
    data = [{"query": "ab", "choices": ["cd", "xy"], "gold": 0}, {"query": "ab", "choices": ["zz", "cdefg"], "gold": 0}]
    assert evaluate_task(model, TOK, data, "cpu", MC_META) == 0.5


def test_schema_picks_context_that_predicts_continuation():
    model = BigramModel(successor=True)
    data = [{"context_options": ["xyz", "abc"], "continuation": "def", "gold": 1},
            {"context_options": ["abc", "qqq"], "continuation": "def", "gold": 1}]
    meta = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": ""}
    assert [score_example(i, model, TOK, data, "cpu", meta)[0] for i in range(2)] == [True, False]


# -----------------------------------------------------------------------------
# Seeds and metric

def test_shuffle_and_fewshot_seeds_are_the_references():
    data = list(range(10))
    assert shuffle_and_truncate(data, 3) == [0, 3, 7]  # random.Random(1337).shuffle, pinned
    assert data == list(range(10))  # caller's list untouched
    assert shuffle_and_truncate(data) == shuffle_and_truncate(data)
    expected = random.Random(1234 + 0).sample([1, 2, 3, 4, 5, 6, 7, 8, 9], 3)
    assert expected == [8, 2, 1]
    assert sample_fewshot(data, 0, 3) == expected
    assert sample_fewshot(data, 5, 4) == sample_fewshot(data, 5, 4)
    assert 5 not in sample_fewshot(data, 5, 9)
    assert sample_fewshot(data, 5, 0) == []


def test_accuracy_standard_error_at_the_edges():
    from nanochat.core_eval import accuracy_se
    # the Wilson interval's half-width at one sigma: sqrt(c (n - c) / n + 1/4) / (n + 1) for c of n right
    assert accuracy_se(0.0, 1) == accuracy_se(1.0, 1) == 0.25  # one example, wrong or right: far from certain
    assert accuracy_se(0.0, 4) == accuracy_se(1.0, 4) == pytest.approx(0.1)  # 0/4, 4/4: not the plug-in 0
    assert accuracy_se(0.25, 4) == pytest.approx(0.2)  # 1 of 4: sqrt(3/4 + 1/4) / 5
    assert accuracy_se(0.5, 2) == pytest.approx(math.sqrt(0.75) / 3)
    assert accuracy_se(0.2, 10) == pytest.approx(accuracy_se(0.8, 10))  # right and wrong are symmetric
    assert 0 < accuracy_se(0.0, 1000) < accuracy_se(0.0, 10) < accuracy_se(0.0, 1)  # shrinks with n, never 0
    for p in (0.05, 0.3, 0.5):  # many examples: the textbook sqrt(p (1 - p) / n)
        assert accuracy_se(p, 100000) == pytest.approx(math.sqrt(p * (1 - p) / 100000), rel=1e-3)


def test_core_standard_error_propagates_the_centered_task_errors():
    from nanochat.core_eval import core_metric_se
    assert core_metric_se({"a": 0.3, "b": 0.4}) == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    assert core_metric_se({"a": 0.1}) == pytest.approx(0.1)


def test_centered_accuracy_and_core_mean():
    assert centered_accuracy(0.6, 50) == pytest.approx(0.2)
    assert centered_accuracy(0.2566, 9.1) == pytest.approx(0.182178, abs=1e-6)  # GPT-2 language id, from the bundle
    assert core_metric({"a": 0.1, "b": 0.3}) == pytest.approx(0.2)
    assert core_label(core_eval.CORE_TASK_LABELS) == "full (22/22 tasks)"
    assert core_label(core_eval.CORE_TASK_LABELS[:20]) == "partial (20/22 tasks)"
    assert core_label(core_eval.CORE_TASK_LABELS, max_per_task=16) == "full (22/22 tasks; 16 per task)"


def test_reference_gpt2_csv_mean_is_core():
    """The bundle's GPT-2 table: the mean of its centered column is its CORE row (our metric definition)."""
    path = REAL_BUNDLE / "openai-community-gpt2.csv"
    if not path.is_file():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    rows = [[c.strip() for c in line.split(",")] for line in path.read_text().splitlines()[1:]]
    centered = {r[0]: float(r[2]) for r in rows if r[0] != "CORE"}
    core_row = [float(r[2]) for r in rows if r[0] == "CORE"][0]
    assert len(centered) == 22
    assert core_metric(centered) == pytest.approx(core_row, abs=1e-6)


def test_gpt2_targets_on_real_bundle():
    """GPT-2's CORE on the 20 tasks the bundle has (squad, coqa missing), from its own GPT-2 tables."""
    if not REAL_BUNDLE.is_dir():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    tasks, skipped = core_eval.load_core_tasks(str(REAL_BUNDLE))
    targets = core_eval.gpt2_targets(str(REAL_BUNDLE), [t[0] for t in tasks])
    assert targets["GPT-2 1.5B"] == pytest.approx(0.2527278, abs=1e-6)
    assert targets["GPT-2 124M"] == pytest.approx(0.1156836, abs=1e-6)
    full = core_eval.gpt2_targets(str(REAL_BUNDLE), core_eval.CORE_TASK_LABELS)
    assert full["GPT-2 1.5B"] == pytest.approx(0.256525, abs=1e-6)
    assert full["GPT-2 124M"] == pytest.approx(0.113891, abs=1e-6)


def test_gpt2_targets_and_format_on_tiny_tables(tmp_path):
    header = "Task                               , Accuracy  , Centered  \n"
    (tmp_path / "openai-community-gpt2.csv").write_text(
        header + "a , 0.5 , 0.1\nb , 0.5 , 0.3\nc , 0.5 , 0.8\nCORE ,  , 0.4\n")
    (tmp_path / "openai-community-gpt2-xl.csv").write_text(header + "a , 0.5 , 0.5\nCORE ,  , 0.5\n")
    # only the 124M table has both a and b; CORE row and unused task c are ignored
    assert core_eval.gpt2_targets(str(tmp_path), ["a", "b"]) == pytest.approx({"GPT-2 124M": 0.2})
    assert core_eval.gpt2_targets(str(tmp_path), ["a"]) == pytest.approx({"GPT-2 124M": 0.1, "GPT-2 1.5B": 0.5})
    out = {"core_metric": 0.05, "partial": True, "subsampled": False, "core_label": "partial (2/22 tasks)",
           "gpt2_targets": {"GPT-2 124M": 0.2}}
    assert core_eval.format_core(out) == "0.0500 partial (2/22 tasks; same tasks: GPT-2 124M 0.2000)"
    assert core_eval.format_core({**out, "gpt2_targets": {}}) == "0.0500 partial (2/22 tasks)"
    assert core_eval.format_core({**out, "partial": False}) == "0.0500"
    # a subsampled score says so, also next to GPT-2's (all examples) and when every task was run
    subsampled = {**out, "subsampled": True, "core_label": "partial (2/22 tasks; 16 per task)"}
    assert core_eval.format_core(subsampled) == "0.0500 partial (2/22 tasks; 16 per task; same tasks: GPT-2 124M 0.2000)"
    full = {**subsampled, "partial": False, "core_label": "full (22/22 tasks; 16 per task)", "gpt2_targets": {}}
    assert core_eval.format_core(full) == "0.0500 full (22/22 tasks; 16 per task)"
    core_eval.write_core_csv(str(tmp_path / "full.csv"), {**full, "results": {"a": 0.5}, "centered_results": {"a": 0.1},
                                                          "centered_se": {"a": 0.2}, "num_examples": {"a": 16},
                                                          "core_metric_se": 0.2, "skipped": []})
    rows = [[c.strip() for c in line.split(",")] for line in (tmp_path / "full.csv").read_text().splitlines()]
    assert rows[0] == ["Task", "Accuracy", "Centered", "SE", "Examples"]  # the GPT-2 tables' columns first
    assert rows[1] == ["a", "0.500000", "0.100000", "0.200000", "16"]
    assert rows[-1] == ["CORE full (22/22 tasks; 16 per task)", "", "0.050000", "0.200000", "16"]


# -----------------------------------------------------------------------------
# Bundles: hand-made, real, corrupt, missing, zipped

def make_bundle(root, tasks, bad_line=None):
    """tasks: list of (label, type, shots, delimiter, items, baseline)."""
    root = Path(root)
    (root / "eval_data" / "t").mkdir(parents=True)
    lines = ["icl_tasks:"]
    meta = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    for label, task_type, shots, delim, items, baseline in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: t/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {task_type}"]
        if delim is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(delim)}")
        meta.append(f"{label},x,x,{shots},{len(items or [])},{baseline},,d")
        if items is not None:
            text = "".join(json.dumps(it) + "\n" for it in items)
            if bad_line is not None and bad_line[0] == label:
                text += bad_line[1] + "\n"
            (root / "eval_data" / "t" / f"{label}.jsonl").write_text(text)
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return root


def small_tasks():
    mc = [{"query": f"q{i}", "choices": ["ab", "cd", "xy"], "gold": i % 3} for i in range(7)]
    schema = [{"context_options": ["abc", "xyz"], "continuation": f"d{i}", "gold": i % 2} for i in range(5)]
    lm = [{"context": f"c{i} abc", "continuation": "def" if i % 2 else "dzz"} for i in range(6)]
    return [("mc_task", "multiple_choice", 2, " ", mc, 25), ("schema_task", "schema", 0, None, schema, 50),
            ("lm_task", "language_modeling", 1, "", lm, 0), ("missing_task", "multiple_choice", 0, None, None, 25)]


def test_evaluate_core_on_handmade_bundle(tmp_path, base_dir):
    from nanochat.core_eval import evaluate_core, format_core
    bundle = make_bundle(tmp_path / "b", small_tasks())
    model = BigramModel(seed=3)
    out = evaluate_core(model, TOK, "cpu", max_per_task=-1, bundle_dir=str(bundle))
    assert list(out["results"]) == ["mc_task", "schema_task", "lm_task"]
    assert out["skipped"] == ["missing_task"] and out["partial"] and out["num_tasks"] == 3
    assert out["core_label"] == "partial (0/22 tasks)"
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    assert "partial" in format_core(out)
    # same numbers again: everything is seeded
    assert evaluate_core(model, TOK, "cpu", bundle_dir=str(bundle))["results"] == out["results"]
    # successor model: mc choices tie (first byte from " ", then a successor) -> choice 0 -> right for gold 0 (3 of 7);
    # schema contexts tie likewise -> right for gold 0 (3 of 5); lm continues "c" with "def" -> right for odd i (3 of 6)
    out = evaluate_core(BigramModel(successor=True), TOK, "cpu", bundle_dir=str(bundle))
    assert out["results"] == pytest.approx({"mc_task": 3 / 7, "schema_task": 3 / 5, "lm_task": 0.5})
    assert out["centered_results"] == pytest.approx({"mc_task": (3 / 7 - 0.25) / 0.75, "schema_task": 0.2,
                                                     "lm_task": 0.5})
    # each task's SE (3 right of 7, of 5, of 6) scaled by its centering (baselines 25%, 50%, 0%), then CORE's
    wilson = {"mc_task": math.sqrt(3 * 4 / 7 + 0.25) / 8, "schema_task": math.sqrt(3 * 2 / 5 + 0.25) / 6,
              "lm_task": math.sqrt(3 * 3 / 6 + 0.25) / 7}
    centered_se = {"mc_task": wilson["mc_task"] / 0.75, "schema_task": wilson["schema_task"] / 0.5,
                   "lm_task": wilson["lm_task"]}
    assert out["centered_se"] == pytest.approx(centered_se) and out["num_examples"] == {"mc_task": 7, "schema_task": 5,
                                                                                        "lm_task": 6}
    core_se = math.sqrt(sum(se * se for se in centered_se.values())) / 3
    assert out["core_metric_se"] == pytest.approx(core_se) and 0.16 < core_se < 0.17
    assert format_core(out).startswith(f"{out['core_metric']:.4f} ± {core_se:.4f} partial (0/22 tasks; 18 examples)")


def test_corrupt_jsonl_line_names_file_and_line(tmp_path, base_dir):
    from nanochat.core_eval import evaluate_core
    from nanochat.eval_bundle import BundleError
    bundle = make_bundle(tmp_path / "b", small_tasks()[:3], bad_line=("schema_task", '{"context_options": ['))
    with pytest.raises(BundleError, match=r"schema_task\.jsonl:6: not valid JSON"):
        evaluate_core(BigramModel(), TOK, "cpu", bundle_dir=str(bundle))


def test_real_bundle_small_run(base_dir, tmp_path):
    if not REAL_BUNDLE.is_dir():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    from nanochat.core_eval import evaluate_core
    model = ConstantModel()
    model.max_seq_len = 256  # exercise cropping of long 10-shot prompts
    out = evaluate_core(model, TOK, "cpu", max_per_task=2, bundle_dir=str(REAL_BUNDLE))
    assert out["num_tasks"] == 20 and sorted(out["skipped"]) == ["coqa", "squad"]
    assert out["core_label"] == "partial (20/22 tasks; 2 per task)"
    # all choices tie, so choice 0 is picked: accuracy is the share of gold == 0 among the 2 items kept; LM is 0
    tasks, _ = core_eval.load_core_tasks(str(REAL_BUNDLE))
    for label, meta, path, _ in tasks:
        items = shuffle_and_truncate(core_eval.load_jsonl(path, meta["task_type"]), 2)
        expected = 0.0 if meta["task_type"] == "language_modeling" else sum(it["gold"] == 0 for it in items) / 2
        assert out["results"][label] == expected, label
    assert out["gpt2_targets"]["GPT-2 1.5B"] == pytest.approx(0.2527, abs=1e-4)
    assert out["gpt2_targets"]["GPT-2 124M"] == pytest.approx(0.1157, abs=1e-4)
    assert "same tasks: GPT-2 124M 0.1157" in core_eval.format_core(out)
    csv_path = tmp_path / "core.csv"
    core_eval.write_core_csv(str(csv_path), out)
    rows = [[c.strip() for c in line.split(",")] for line in csv_path.read_text().splitlines()]
    assert rows[-3][0] == "CORE partial (20/22 tasks; 2 per task)"
    assert float(rows[-3][2]) == pytest.approx(out["core_metric"], abs=1e-6)
    assert rows[-2:] == [["GPT-2 124M same tasks", "", "0.115684", "", ""], ["GPT-2 1.5B same tasks", "", "0.252728", "", ""]]


def test_real_bundle_with_real_tiny_gpt(base_dir, tiny_model_factory, request):
    """The real GPT and BPE tokenizer on the real bundle. The GPT's window is its rotary table, so long few-shot
    prompts get cropped instead of crashing."""
    if not REAL_BUNDLE.is_dir():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    from nanochat.core_eval import evaluate_core
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    model = tiny_model_factory(tokenizer.get_vocab_size(), sequence_len=16)  # window 160 tokens: quick on CPU
    model.eval()
    assert core_eval.model_max_length(model) == model.cos.size(1)
    out = evaluate_core(model, tokenizer, "cpu", max_per_task=1, bundle_dir=str(REAL_BUNDLE))
    assert out["num_tasks"] == 20 and math.isfinite(out["core_metric"])


def test_env_var_bundle_and_bad_bundle_dir(tmp_path, base_dir, monkeypatch):
    from nanochat.eval_bundle import BundleError, resolve_bundle_dir
    bundle = make_bundle(tmp_path / "b", small_tasks()[:1])
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(bundle))
    assert resolve_bundle_dir() == str(bundle)
    with pytest.raises(BundleError, match="--bundle-dir"):
        resolve_bundle_dir(str(tmp_path / "nope"))


def _zip_bundle(bundle_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in Path(bundle_dir).rglob("*"):
            if path.is_file():
                zf.write(path, "eval_bundle/" + str(path.relative_to(bundle_dir)))
    return buf.getvalue()


def test_zip_present_but_folder_deleted_is_reextracted(tmp_path, base_dir, monkeypatch):
    from nanochat import eval_bundle
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    (base_dir / "eval_bundle.zip").write_bytes(_zip_bundle(make_bundle(tmp_path / "b", small_tasks()[:1])))
    monkeypatch.setattr(eval_bundle, "EVAL_BUNDLE_URL", "http://127.0.0.1:9/never-used")
    assert eval_bundle.resolve_bundle_dir() == str(base_dir / "eval_bundle")
    assert (base_dir / "eval_bundle" / "eval_data" / "t" / "mc_task.jsonl").is_file()


def test_bundle_download_from_local_server(tmp_path, base_dir, monkeypatch):
    from nanochat import eval_bundle
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    payload = _zip_bundle(make_bundle(tmp_path / "b", small_tasks()[:2]))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(eval_bundle, "EVAL_BUNDLE_URL", f"http://127.0.0.1:{server.server_port}/eval_bundle.zip")
        path = eval_bundle.resolve_bundle_dir()
    finally:
        server.shutdown()
    assert path == str(base_dir / "eval_bundle") and (base_dir / "eval_bundle" / "core.yaml").is_file()
    tasks, skipped = core_eval.load_core_tasks(path)
    assert [t[0] for t in tasks] == ["mc_task", "schema_task"] and skipped == []


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_bundle_missing_offline_is_one_clear_error(base_dir, monkeypatch):
    from nanochat import eval_bundle
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setattr(eval_bundle, "EVAL_BUNDLE_URL", f"http://127.0.0.1:{_closed_port()}/eval_bundle.zip")
    with pytest.raises(eval_bundle.BundleUnavailable, match="--bundle-dir"):
        eval_bundle.resolve_bundle_dir()
    assert not (base_dir / "eval_bundle").exists() and not (base_dir / "eval_bundle.zip").exists()


# -----------------------------------------------------------------------------
# Distributed: 2 gloo processes give exactly the single-process numbers

def _dist_worker(rank, world_size, port, data_by_type, out_dir, bundle_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = BigramModel(seed=7)
    results = {name: evaluate_task(model, TOK, data, "cpu", meta) for name, (data, meta) in data_by_type.items()}
    from nanochat.core_eval import evaluate_core
    core = evaluate_core(model, TOK, "cpu", bundle_dir=bundle_dir)
    results["core"] = [core["core_metric"], core["results"]]
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_distributed_equals_single_process(tmp_path, base_dir):
    import torch.multiprocessing as mp
    rng = random.Random(0)
    words = ["ab", "cd", "ef", "gh", "xy", "zq"]
    mc = [{"query": f"q{i}", "choices": rng.sample(words, 3), "gold": rng.randrange(3)} for i in range(9)]
    schema = [{"context_options": rng.sample(words, 2), "continuation": rng.choice(words), "gold": rng.randrange(2)}
              for _ in range(7)]
    lm = [{"context": rng.choice(words), "continuation": rng.choice(words)} for _ in range(8)]
    data_by_type = {
        "mc": (mc, {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}),
        "schema": (schema, {"task_type": "schema", "num_fewshot": 1, "continuation_delimiter": " "}),
        "lm": (lm, {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": ""}),
    }
    model = BigramModel(seed=7)
    single = {name: evaluate_task(model, TOK, data, "cpu", meta) for name, (data, meta) in data_by_type.items()}
    from nanochat.core_eval import evaluate_core
    bundle = str(make_bundle(tmp_path / "b", small_tasks()))
    core = evaluate_core(model, TOK, "cpu", bundle_dir=bundle)
    # fork: the children need not re-import torch (slow on a busy 2-core machine); CPU-only, so forking is safe
    mp.start_processes(_dist_worker, args=(2, _closed_port(), data_by_type, str(tmp_path), bundle), nprocs=2,
                       join=True, start_method="fork")
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got.pop("core") == [core["core_metric"], core["results"]]
        assert got == single
    assert len(set(single.values())) > 1 or 0.0 < single["mc"] < 1.0  # not a degenerate all-same answer


# -----------------------------------------------------------------------------
# Command line: bad input is one typed error, which the command line prints as one clear line with exit status 1

def run_cli(args, base_dir, extra_env=None):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    env.pop("NANOCHAT_EVAL_BUNDLE", None)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "scripts.base_eval", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_unknown_eval_mode(base_dir):
    from nanochat.errors import NanochatError
    from scripts.base_eval import main  # noqa
    with pytest.raises(NanochatError) as e:
        main(["--eval", "core,bogus"])
    assert str(e.value).startswith("--eval='core,bogus': unknown mode(s) bogus")


def test_cli_no_checkpoint(base_dir):
    from nanochat.errors import NanochatError
    from scripts.base_eval import main  # noqa
    with pytest.raises(NanochatError) as e:
        main(["--eval", "bpb"])
    assert str(e.value).startswith("no base checkpoint found") and "base_train" in str(e.value)


def test_cli_bundle_missing_offline(base_dir, monkeypatch):
    # a (complete) checkpoint exists, so the bundle is the first problem found (before loading anything)
    from nanochat import eval_bundle
    from scripts import base_eval
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    (base_dir / "base_checkpoints" / "d2").mkdir(parents=True)
    (base_dir / "base_checkpoints" / "d2" / "model_000001.pt").write_bytes(b"")
    (base_dir / "base_checkpoints" / "d2" / "complete_000001.json").write_text("{}")
    monkeypatch.setattr(eval_bundle, "EVAL_BUNDLE_URL", f"http://127.0.0.1:{_closed_port()}/eval_bundle.zip")
    with pytest.raises(eval_bundle.BundleUnavailable) as e:
        base_eval.main(["--eval", "core"])
    message = str(e.value)
    assert message.startswith("CORE eval bundle not found") and "--bundle-dir" in message
    assert "\n" not in message


def test_cli_corrupt_jsonl_before_model_work(tmp_path, base_dir):
    bundle = make_bundle(tmp_path / "b", small_tasks()[:1], bad_line=("mc_task", "not json"))
    from nanochat.core_eval import load_core_tasks, load_jsonl
    from nanochat.eval_bundle import BundleError
    tasks, _ = load_core_tasks(str(bundle))
    with pytest.raises(BundleError, match=r"mc_task\.jsonl:8"):
        load_jsonl(tasks[0][2], "multiple_choice")


def test_fewer_items_than_shots_uses_what_there_is():
    data = [{"query": "a", "choices": ["b", "c"], "gold": 0}, {"query": "d", "choices": ["e", "f"], "gold": 1}]
    assert sample_fewshot(data, 0, 10) == [data[1]]
    meta = {"task_type": "multiple_choice", "num_fewshot": 10, "continuation_delimiter": " "}
    # the two choices tie, so choice 0 is picked: item 0 (gold 0) right, item 1 (gold 1) wrong
    assert evaluate_task(ConstantModel(), TOK, data, "cpu", meta) == 0.5


@pytest.mark.slow
def test_cli_end_to_end_with_real_checkpoint(tmp_path, base_dir, tiny_model_factory, request):
    """tokenizer + shards + a tiny GPT checkpoint -> python -m scripts.base_eval runs samples, bpb and CORE."""
    import dataclasses
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.local_data import build_from_dir
    from nanochat.tokenizer import compute_token_bytes
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(compute_token_bytes(tokenizer), base_dir / "tokenizer" / "token_bytes.pt")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 20)
    os.environ["NANOCHAT_DATASET"] = "local"
    try:
        build_from_dir(str(texts))
    finally:
        del os.environ["NANOCHAT_DATASET"]
    model = tiny_model_factory(tokenizer.get_vocab_size())
    meta = {"step": 3, "model_config": dataclasses.asdict(model.config), "user_config": {}}
    save_checkpoint(str(base_dir / "base_checkpoints" / "d2"), 3, model.state_dict(), None, meta)
    bundle = make_bundle(tmp_path / "b", small_tasks())
    result = run_cli(["--eval", "sample,bpb,core", "--max-per-task", "4", "--device-batch-size", "2",
                      "--split-tokens", "300", "--device-type", "cpu", "--bundle-dir", str(bundle)],
                     base_dir, {"NANOCHAT_DATASET": "local"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Skipping task missing_task: missing file" in out
    # subsampled: labelled so, with its standard error and the examples it covers (3 tasks x 4)
    assert re.search(r"CORE metric: \S+ ± \S+ partial \(0/22 tasks; 4 per task; 12 examples\)", out)
    # bpb over whole rows: 300 tokens are 4 rows of the model's 64; the val split (2 documents) holds only 2 rows
    assert re.search(r"train bpb: \S+ ± \S+ \(256 tokens\)", out)
    assert "the val split holds 2 rows of 64 tokens, fewer than the 4 asked for" in out
    assert re.search(r"val bpb: \S+ ± \S+ \(128 tokens\)", out)
    assert "Unconditioned samples:" in out
    csv_text = (base_dir / "base_eval" / "base_model_000003.csv").read_text()
    assert csv_text.splitlines()[0].startswith("Task") and "missing_task" in csv_text and "skipped" in csv_text
    assert csv_text.splitlines()[-1].startswith("CORE partial (0/22 tasks; 4 per task)")
    section = (base_dir / "report" / "base-model-evaluation.md").read_text()
    assert "- CORE metric: " in section and "- val bpb: " in section and "- sample 0: " in section
    assert re.search(r"- mc_task: \S+ ± \S+ \(4 examples\)", section)  # each task's centered accuracy
