"""
nanochat.loss_eval: bits per byte and its standard error against a direct computation, kept batches, the evaluation
slice (the same rows whatever the batch size and the number of processes, one pass over the split), and one
checkpoint getting the same val bpb from base_train's final evaluation and from base_eval with default flags.
"""

import json
import math
import os

import pytest
import torch

from nanochat import dataloader, loss_eval
from nanochat.loss_eval import evaluate_bpb, eval_batches, keep_batches
from test_base_train import T, NUM_VAL_DOCS, TINY, ckpt_dir, template_dir, train_dir  # noqa: F401 (fixtures)

TOKEN_BYTES = torch.tensor([0, 1, 2, 3, 1, 1, 2, 4], dtype=torch.int32)  # token 0 is "special" (no bytes)


class FixedLosses(torch.nn.Module):
    """The loss of target t is (|t| + 1) / 2, whatever the inputs: every per-token loss is known in advance."""

    def forward(self, x, y, loss_reduction="mean"):
        assert x.dtype == y.dtype == torch.int64  # the model sees int64, also from kept int32 batches
        return (y.float().abs() + 1).reshape(-1) * 0.5


def by_hand(rows):
    """(bpb, se) of target rows: each row one sample, the delta method's SE of the ratio sum(nats) / sum(bytes)."""
    rows = [row for row in rows if any(t >= 0 for t in row)]  # a row without targets is no sample
    nats = [sum((t + 1) / 2 for t in row if t >= 0 and TOKEN_BYTES[t] > 0) for row in rows]
    nbytes = [sum(int(TOKEN_BYTES[t]) for t in row if t >= 0) for row in rows]
    k, ratio = len(rows), sum(nats) / sum(nbytes)
    variance = k / (k - 1) * sum((n - ratio * b) ** 2 for n, b in zip(nats, nbytes)) / sum(nbytes) ** 2
    return ratio / math.log(2), math.sqrt(variance) / math.log(2)


def test_bpb_and_its_standard_error_match_a_direct_computation():
    y1 = torch.tensor([[1, 2, 0, -1], [7, 3, 3, 5]])
    y2 = torch.tensor([[6, -1, -1, 4], [0, 0, 2, 1], [-1, -1, -1, -1]])  # the last row is padding
    batches = [(torch.zeros_like(y1), y1), (torch.zeros_like(y2), y2)]
    result = evaluate_bpb(FixedLosses(), batches, TOKEN_BYTES)
    bpb, se = by_hand(y1.tolist() + y2.tolist())
    assert result.bpb == pytest.approx(bpb, rel=1e-6) and result.se == pytest.approx(se, rel=1e-6)
    # the same rows batched otherwise: the same estimate (rows are the samples, not batches)
    rows = torch.cat([y1, y2])
    assert evaluate_bpb(FixedLosses(), [(r[None], r[None]) for r in rows], TOKEN_BYTES) == pytest.approx(result)
    # the mean loss and the token count are over every non-ignored target, special tokens included
    targets = [t for t in rows.reshape(-1).tolist() if t >= 0]
    assert result.tokens == len(targets) == 13
    assert result.loss == pytest.approx(sum((t + 1) / 2 for t in targets) / len(targets), rel=1e-6)
    assert str(result) == f"{bpb:.6f} ± {se:.6f} (13 tokens)"


def test_standard_error_edge_cases():
    same = torch.tensor([[1, 2], [1, 2]])  # two rows of one ratio: nothing varies
    result = evaluate_bpb(FixedLosses(), [(same, same)], TOKEN_BYTES)
    assert result.se == 0.0 and result.bpb == pytest.approx(by_hand(same.tolist())[0])
    one = torch.tensor([[1, 2, 3]])  # one row: no spread to measure
    assert math.isnan(evaluate_bpb(FixedLosses(), [(one, one)], TOKEN_BYTES).se)
    ignored = torch.full((2, 3), -1)
    empty = evaluate_bpb(FixedLosses(), [(ignored, ignored)], TOKEN_BYTES)
    assert empty.bpb == float("inf") and math.isnan(empty.se) and empty.tokens == 0 and math.isnan(empty.loss)
    special = torch.zeros(2, 3, dtype=torch.long)  # only 0-byte targets: a loss but no bpb
    only_special = evaluate_bpb(FixedLosses(), [(special, special)], TOKEN_BYTES)
    assert only_special.bpb == float("inf") and only_special.loss == 0.5 and only_special.tokens == 6


def test_kept_batches_are_copies_that_every_evaluation_replays():
    def reusing_loader():  # like the CUDA loaders: every batch is written into the same buffers
        x, y = torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64)
        for k in range(100):
            x.fill_(k % 8), y.copy_(torch.arange(8).reshape(2, 4).roll(k) % 8)
            yield x, y, {"k": k}

    fresh = [tuple(t.clone() for t in batch[:2]) for _, batch in zip(range(3), reusing_loader())]
    kept = keep_batches(reusing_loader(), 3)
    assert len(kept) == 3 and all(x.dtype == y.dtype == torch.int32 for x, y in kept)
    assert [int(x[0, 0]) for x, _ in kept] == [0, 1, 2]  # not three views of the last batch
    expected = evaluate_bpb(FixedLosses(), fresh, TOKEN_BYTES)
    assert evaluate_bpb(FixedLosses(), kept, TOKEN_BYTES) == expected
    assert evaluate_bpb(FixedLosses(), kept, TOKEN_BYTES) == expected  # a list replays

# -----------------------------------------------------------------------------
# The slice: the same rows whatever the batch size and the world size


@pytest.fixture
def val_split(train_dir, monkeypatch):
    """The tiny base dir of test_base_train: NUM_VAL_DOCS val documents, each longer than a row of T tokens."""
    from nanochat.tokenizer import get_tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(train_dir))
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    return get_tokenizer()


def slice_rows(batches):
    """The (input, target) rows of kept batches, padding rows dropped."""
    return [(x, y) for xb, yb in batches for x, y in zip(xb.tolist(), yb.tolist()) if max(y) >= 0]


def as_rank(monkeypatch, rank, world_size):
    # the slice must not follow the process's rank: the loader is told this rank too, not only eval_batches
    info = lambda: (world_size > 1, rank, rank, world_size)  # noqa: E731
    monkeypatch.setattr(loss_eval, "get_dist_info", info)
    monkeypatch.setattr(dataloader, "get_dist_info", info)


def test_slice_is_independent_of_batch_size_and_world_size(val_split, monkeypatch):
    rows = slice_rows(eval_batches(val_split, "val", 6 * T, T, 4, "cpu"))
    assert len(rows) == 6 and len({tuple(y) for _, y in rows}) == 6  # 6 different documents
    assert all(len(x) == len(y) == T for x, y in rows)
    for batch_size in (1, 5, 32):
        batches = eval_batches(val_split, "val", 6 * T, T, batch_size, "cpu")
        assert all(x.shape == (batch_size, T) and x.dtype == torch.int32 for x, _ in batches)  # one shape
        assert slice_rows(batches) == rows
    for world_size in (2, 4):  # rank r gets rows r, r+W, ...
        for rank in range(world_size):
            as_rank(monkeypatch, rank, world_size)
            assert slice_rows(eval_batches(val_split, "val", 6 * T, T, 2, "cpu")) == rows[rank::world_size]


def test_slice_rows_are_the_documents_in_order(val_split, train_dir):
    """Rows take the split's documents in order, the last one of a row cropped (best fit would group documents by
    length, making neighbouring rows alike and the standard error too small)."""
    import pyarrow.parquet as pq
    texts = pq.read_table(train_dir / "base_data_local" / "shard_00001.parquet").column("text").to_pylist()
    docs = val_split.encode(texts, prepend=val_split.get_bos_token_id())
    row_len = 2 * len(docs[0]) + 30  # two whole documents and a crop of the third
    expected, queue = [], [list(d) for d in docs]
    while queue:
        row = []
        while queue and len(row) < row_len:
            row += queue.pop(0)[:row_len - len(row)]
        if len(row) == row_len:  # the split's unfinished last row is dropped
            expected.append((row[:-1], row[1:]))
    rows = slice_rows(eval_batches(val_split, "val", 100 * row_len, row_len - 1, 4, "cpu"))
    assert rows == expected and len(rows) == NUM_VAL_DOCS // 3


def test_slice_ends_with_the_split(val_split, capsys):
    rows = slice_rows(eval_batches(val_split, "val", 100 * T, T, 8, "cpu"))
    assert len(rows) == NUM_VAL_DOCS and len({tuple(y) for _, y in rows}) == NUM_VAL_DOCS  # no document twice
    assert f"holds {NUM_VAL_DOCS} rows of {T} tokens, fewer than the 100 asked for" in capsys.readouterr().out


def in_toy_vocab(batches):
    """Targets mapped into TOKEN_BYTES's 8 ids, ignored ones (padding rows) kept."""
    return [(x, torch.where(y >= 0, y % len(TOKEN_BYTES), y)) for x, y in batches]


def _dist_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from nanochat.tokenizer import get_tokenizer
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    batches = eval_batches(get_tokenizer(), "val", 7 * T, T, 2, "cpu")
    result = evaluate_bpb(FixedLosses(), in_toy_vocab(batches), TOKEN_BYTES)
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(list(result), f)


def test_two_processes_give_the_single_process_estimate(val_split, tmp_path):
    import torch.multiprocessing as mp
    from test_core_eval import _closed_port
    batches = eval_batches(val_split, "val", 7 * T, T, 3, "cpu")
    single = evaluate_bpb(FixedLosses(), in_toy_vocab(batches), TOKEN_BYTES)
    # fork: the children need not re-import torch; each evaluates its own rows, the sums are all-reduced
    mp.start_processes(_dist_worker, args=(2, _closed_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(list(single), rel=1e-12) and single.tokens == 7 * T and single.se > 0

# -----------------------------------------------------------------------------
# One checkpoint, one number: base_train's final val bpb is base_eval's with default flags


def val_line(out):
    """(bpb, se, tokens) from base_eval's 'val bpb: 1.234567 ± 0.012345 (512 tokens)' line."""
    line = next(line for line in out.splitlines() if line.startswith("val bpb: "))
    bpb, _, se, tokens = line.split()[2:6]
    return float(bpb), float(se), int(tokens.strip("(").replace(",", ""))


@pytest.mark.slow
def test_base_train_and_base_eval_report_the_same_val_bpb(train_dir, monkeypatch, capsys):
    from scripts import base_eval, base_train
    # the one default, in both scripts; made small here so the tiny split holds it
    assert base_train.build_parser().get_default("eval_tokens") == loss_eval.EVAL_TOKENS
    assert base_eval.build_parser().get_default("split_tokens") == loss_eval.EVAL_TOKENS
    for module in (base_train, base_eval):
        monkeypatch.setattr(module, "EVAL_TOKENS", 6 * T)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(train_dir))
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    flags = [a for a in TINY if not a.startswith("--eval-tokens")]
    base_train.main(flags + ["--device-type=cpu", "--num-iterations=3", "--eval-every=3"])
    summary = json.loads((ckpt_dir(train_dir) / "summary.json").read_text())
    assert summary["val_tokens"] == 6 * T and summary["val_bpb_se"] > 0
    capsys.readouterr()
    for flags in ([], ["--device-batch-size=5"]):  # base_eval's default device batch is 32; 5 pads its last batch
        base_eval.main(["--eval=bpb", "--device-type=cpu"] + flags)
        bpb, se, tokens = val_line(capsys.readouterr().out)
        assert bpb == pytest.approx(summary["val_bpb"], abs=2e-6) and se == pytest.approx(summary["val_bpb_se"], abs=2e-6)
        assert tokens == summary["val_tokens"]
    report = (train_dir / "report" / "base-model-evaluation.md").read_text()
    assert f"- val bpb: {summary['val_bpb']:.4f} ± {summary['val_bpb_se']:.4f} ({6 * T} tokens)" in report
    training = (train_dir / "report" / "base-model-training.md").read_text()
    assert f"- Final validation bpb: {summary['val_bpb']:.4f} ± {summary['val_bpb_se']:.4f} ({6 * T} tokens)" in training
