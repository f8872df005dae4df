"""
BOS-aligned best-fit dataloader: packing invariants, equality with the spec's algorithm, exact resume
(JSON round trip, across epochs), approximate resume from a position-only state, bad input, and a
2-process gloo run whose ranks see disjoint documents. No network.
"""

import os
import re
import json
import random
import socket

import pytest
import torch

from nanochat import dataset
from nanochat.dataset import DataError
from nanochat.local_data import write_shards
from nanochat.dataloader import (tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_with_state,
                                 tokenizing_distributed_data_loader_bos_bestfit)

WORDS = ("apple river stone cloud quiet bright morning paper window garden silver yellow distant "
         "village thunder gentle market letter winter summer forest ocean candle mirror").split()
DOC_ID = re.compile(r"^doc(\d{5}) ")


def make_docs(n, seed=0, max_words=120):
    rng = random.Random(seed)
    return [f"doc{i:05d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for i in range(n)]


@pytest.fixture
def local_data(base_dir, monkeypatch):
    """Shards of unique numbered documents in the 'local' dataset; returns a builder."""
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    def build(n=600, seed=0, max_words=120):
        return write_shards(make_docs(n, seed, max_words), dataset.get_data_dir("local"), "local", "test",
                            shard_chars=n * max_words * 2)  # ~3 train shards
    return build


def take(loader, n):
    out = []
    for _ in range(n):
        inputs, targets, state = next(loader)
        out.append((inputs.clone(), targets.clone(), json.loads(json.dumps(state))))
    return out


def doc_ids_in_rows(tokenizer, inputs):
    """Ids of the documents whose start appears in the rows (each BOS starts a document)."""
    bos = tokenizer.get_bos_token_id()
    ids = []
    for row in inputs.tolist():
        starts = [i for i, t in enumerate(row) if t == bos]
        for a, b in zip(starts, starts[1:] + [len(row)]):
            m = DOC_ID.match(tokenizer.decode(row[a + 1:b]))
            if m:
                ids.append(int(m.group(1)))
    return ids


def test_packing_invariants(local_data, tiny_tokenizer):
    local_data()
    B, T = 4, 64
    loader = loader_with_state(tiny_tokenizer, B, T, "train", device="cpu", buffer_size=50, tokenizer_batch_size=16)
    bos = tiny_tokenizer.get_bos_token_id()
    seen = []
    for inputs, targets, state in take(loader, 25):
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        assert (inputs[:, 0] == bos).all(), "every row starts with BOS"
        assert torch.equal(inputs[:, 1:], targets[:, :-1]), "targets are inputs shifted by one"
        assert state["epoch"] == 1
        seen += doc_ids_in_rows(tiny_tokenizer, inputs)
    assert len(seen) > 100 and len(seen) == len(set(seen)), "no document is used twice within an epoch"


def reference_packing(tokenizer, B, T, buffer_size, tokenizer_batch_size, num_batches):
    """The spec's algorithm, written naively: linear scans over the buffer in arrival order (single rank)."""
    def slices():
        while True:
            for path in dataset.get_split_files("train"):
                pf = dataset.open_parquet(path)
                for rg in range(pf.num_row_groups):
                    texts = dataset.read_row_group_texts(pf, rg)
                    for i in range(0, len(texts), tokenizer_batch_size):
                        yield texts[i:i + tokenizer_batch_size]
    stream, buffer, batches = slices(), [], []
    for _ in range(num_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer += tokenizer.encode(next(stream), prepend=tokenizer.get_bos_token_id())
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row += buffer.pop(best)
                else:
                    shortest = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                    row += buffer.pop(shortest)[:remaining]
            rows.append(row)
        batches.append(torch.tensor(rows))
    return batches


def test_matches_reference_algorithm(local_data, tiny_tokenizer):
    local_data()
    expected = reference_packing(tiny_tokenizer, 3, 48, buffer_size=40, tokenizer_batch_size=8, num_batches=15)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tiny_tokenizer, 3, 48, "train", device="cpu",
                                                            buffer_size=40, tokenizer_batch_size=8)
    for batch in expected:
        inputs, targets = next(loader)
        assert torch.equal(inputs, batch[:, :-1]) and torch.equal(targets, batch[:, 1:])


@pytest.mark.parametrize("num_docs,resume_at", [(600, [0, 4, 9]), (40, [3, 11, 17])])
def test_exact_resume(local_data, tiny_tokenizer, num_docs, resume_at):
    """The state of step k (through JSON) makes a fresh loader produce exactly the batches k+1, k+2, ...
    The 40-document case wraps around several epochs."""
    local_data(n=num_docs, max_words=120 if num_docs > 100 else 15)
    kwargs = dict(device="cpu", buffer_size=20, tokenizer_batch_size=8)
    reference = take(loader_with_state(tiny_tokenizer, 2, 32, "train", **kwargs), 24)
    if num_docs == 40:
        assert reference[-1][2]["epoch"] > 2
    for k in resume_at:
        resumed = take(loader_with_state(tiny_tokenizer, 2, 32, "train", resume_states=[reference[k][2]], **kwargs), 24 - k - 1)
        for (ri, rt, rs), (xi, xt, xs) in zip(reference[k + 1:], resumed):
            assert torch.equal(ri, xi) and torch.equal(rt, xt) and rs == xs


def test_val_split_and_approximate_resume(local_data, tiny_tokenizer, capsys):
    manifest = local_data()
    val_loader = loader_with_state(tiny_tokenizer, 2, 32, "val", device="cpu", buffer_size=10, tokenizer_batch_size=4)
    import pyarrow.parquet as pq
    val_texts = pq.read_table(os.path.join(dataset.get_data_dir(), manifest["val"])).column("text").to_pylist()
    val_ids = {int(DOC_ID.match(t).group(1)) for t in val_texts}
    for inputs, _, _ in take(val_loader, 10):
        assert set(doc_ids_in_rows(tiny_tokenizer, inputs)) <= val_ids
    # a position-only state (pq_idx, rg_idx, epoch) resumes approximately, with a warning
    loader = loader_with_state(tiny_tokenizer, 2, 32, "train", device="cpu", buffer_size=10,
                               resume_states=[{"pq_idx": 1, "rg_idx": 2, "epoch": 1}])
    inputs, _, state = next(loader)
    assert "resuming approximately" in capsys.readouterr().out
    assert state["pq_idx"] == 1 and state["rg_idx"] >= 3


def test_bad_input(local_data, base_dir, tiny_tokenizer, monkeypatch):
    with pytest.raises(DataError, match="no parquet shards in .*--from-dir"):
        next(loader_with_state(tiny_tokenizer, 2, 32, "train", device="cpu"))
    manifest = local_data(n=100)
    gone = {"file": "shard_09999.parquet", "pq_idx": 0, "rg_idx": 0, "epoch": 1}  # a resume state naming a lost shard
    with pytest.raises(DataError, match="^the dataloader state refers to shard shard_09999.parquet, which is no longer "
                                        "in the train split; restore that file or start without resuming$"):
        next(loader_with_state(tiny_tokenizer, 2, 32, "train", device="cpu", resume_states=[gone]))
    with open(os.path.join(dataset.get_data_dir(), manifest["train"][0]), "r+b") as f:
        f.seek(-20, os.SEEK_END)
        f.write(b"\0" * 20)  # destroy the footer
    with pytest.raises(DataError, match=f"cannot read parquet file .*{manifest['train'][0]}"):
        next(loader_with_state(tiny_tokenizer, 2, 32, "train", device="cpu"))


def _ddp_worker(rank, world_size, port, base_dir, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NANOCHAT_BASE_DIR=base_dir, NANOCHAT_DATASET="local", OMP_NUM_THREADS="1")
    import torch.distributed as dist
    from nanochat.tokenizer import get_tokenizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    tokenizer = get_tokenizer()
    loader = loader_with_state(tokenizer, 2, 32, "train", device="cpu", buffer_size=16, tokenizer_batch_size=4,
                               tokenizer_threads=1)
    ids = []
    for inputs, _, state in take(loader, 12):
        assert state["rank"] == rank and state["epoch"] == 1
        ids += doc_ids_in_rows(tokenizer, inputs)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, ids)
    if rank == 0:
        with open(os.path.join(result_dir, "ids.json"), "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_ranks_see_disjoint_data(local_data, base_dir, tiny_tokenizer, tmp_path):
    local_data()
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(base_dir), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = json.loads((tmp_path / "ids.json").read_text())
    assert len(rank0) > 20 and len(rank1) > 20
    assert not set(rank0) & set(rank1), "ranks must see disjoint documents"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pinned_async_copies_are_correct(local_data, tiny_tokenizer):
    local_data()
    cpu = take(loader_with_state(tiny_tokenizer, 4, 64, "train", device="cpu"), 6)
    gpu_loader = loader_with_state(tiny_tokenizer, 4, 64, "train", device="cuda")
    for inputs, targets, _ in cpu:
        gi, gt, _ = next(gpu_loader)
        assert gi.is_cuda and torch.equal(gi.cpu(), inputs) and torch.equal(gt.cpu(), targets)
