"""
BOS-aligned best-fit dataloader: packing invariants, equality with the spec's algorithm, exact resume
(JSON round trip, across epochs, with and without a seed), the seeded order, approximate resume from a
position-only state, bad input, a 2-process gloo run whose ranks see disjoint documents, and resharding N -> M
(ranks simulated in one process) traced document by document. No network.
"""

import os
import re
import json
import random
import socket
import itertools
import collections

import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat import dataset, dataloader
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
                                                            buffer_size=40, tokenizer_batch_size=8, seed=None)
    for batch in expected:
        inputs, targets = next(loader)
        assert torch.equal(inputs, batch[:, :-1]) and torch.equal(targets, batch[:, 1:])


@pytest.mark.parametrize("seed", [None, 11])
@pytest.mark.parametrize("num_docs,resume_at", [(600, [0, 4, 9]), (40, [3, 11, 17])])
def test_exact_resume(local_data, tiny_tokenizer, num_docs, resume_at, seed):
    """The state of step k (through JSON) makes a fresh loader produce exactly the batches k+1, k+2, ...
    The 40-document case wraps around several epochs."""
    local_data(n=num_docs, max_words=120 if num_docs > 100 else 15)
    kwargs = dict(device="cpu", buffer_size=20, tokenizer_batch_size=8, seed=seed)
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


# -----------------------------------------------------------------------------
# The seeded order and resharding N -> M. Ranks are simulated in one process (the loader does no collectives:
# it only asks get_dist_info who it is), and documents are traced by IdTokenizer.

class IdTokenizer:
    """Stands in for the tokenizer: docNNNNN becomes [BOS] + [NNNNN + 1] * k, an even number of tokens, so every
    token after a BOS names its document and, with rows of even length (odd T), no crop leaves a bare BOS. It
    records the ids of the documents it encodes, in order."""
    def __init__(self):
        self.encoded = []

    def get_bos_token_id(self):
        return 0

    def encode(self, texts, prepend, num_threads=0):
        ids = [int(DOC_ID.match(t).group(1)) for t in texts]
        self.encoded += ids
        return [[prepend] + [i + 1] * (1 + 2 * (len(t) // 30)) for i, t in zip(ids, texts)]


@pytest.fixture
def small_shards(base_dir, monkeypatch):
    """3 train shards of 40, 22 and 30 documents in row groups of 6 (each shard's last one shorter) and a val shard.
    Returns the train layout: {shard name: [[doc ids of row group 0], [of row group 1], ...]}, in file order."""
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    data_dir = dataset.get_data_dir("local")
    os.makedirs(data_dir)
    docs, layout, start = make_docs(100, max_words=30), {}, 0
    for k, size in enumerate([40, 22, 30, 8]):
        name = dataset.shard_name(k)
        pq.write_table(pa.Table.from_pydict({"text": docs[start:start + size]}), os.path.join(data_dir, name), row_group_size=6)
        layout[name] = [list(range(first, min(first + 6, start + size))) for first in range(start, start + size, 6)]
        start += size
    with open(os.path.join(data_dir, dataset.MANIFEST), "w") as f:
        json.dump({"val": name}, f)
    del layout[name]
    return layout


def start_ranks(monkeypatch, world_size, resume_states=None, seed=None, B=2, tokenizer=None):
    """One loader per simulated rank; each reads its rank from get_dist_info when it is first advanced."""
    loaders = []
    for rank in range(world_size):
        monkeypatch.setattr(dataloader, "get_dist_info", lambda rank=rank: (world_size > 1, rank, rank, world_size))
        loader = loader_with_state(tokenizer or IdTokenizer(), B, 15, "train", device="cpu", buffer_size=6,
                                   tokenizer_batch_size=4, resume_states=resume_states, seed=seed)
        loaders.append(itertools.chain([next(loader)], loader))
    return loaders


def run_ranks(loaders, done):
    """Step every rank together until done(states) holds for their states (each the state AFTER its batch, i.e. the
    one that resumes at the next batch). Returns the ids of the documents trained (one per BOS), the states and the
    batches."""
    trained, batches = [], []
    while True:
        step = [next(loader) for loader in loaders]
        batches.append([(inputs, targets) for inputs, targets, _ in step])
        for inputs, targets, _ in step:
            rows = torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
            trained += [row[i + 1] - 1 for row in rows for i, token in enumerate(row) if token == 0]
        states = [json.loads(json.dumps(state)) for _, _, state in step]
        if done(states):
            return trained, states, batches


def after(steps):
    count = itertools.count(1)
    return lambda states: next(count) == steps


def buffered_ids(layout, states):
    """The ids of the documents waiting in the states' buffers, from their (file, row group, raw index) runs."""
    return [layout[name][rg][first + k] for state in states for name, rg, *runs in state["buffer"]
            for first, count in zip(runs[::2], runs[1::2]) for k in range(count)]


def check_every_document_once(layout, trained, final_states):
    """Everything trained, plus what waits in the final buffers, is every document once per epoch that all the new
    ranks have finished, plus what each read of the epochs after: under the plain stride (rank r of M reads row
    groups r, r+M, ... of every file), as the earlier worlds are behind them (their states have dropped them)."""
    assert all(s["worlds"] == [] for s in final_states)
    seen = collections.Counter(trained) + collections.Counter(buffered_ids(layout, final_states))
    low = min(s["epoch"] for s in final_states)
    expected = collections.Counter([doc for groups in layout.values() for group in groups for doc in group] * (low - 1))
    names = list(layout)
    for s in final_states:
        rank, world_size = s["rank"], s["world_size"]
        for name in names:
            for rg in range(rank, len(layout[name]), world_size):
                whole_epochs = s["epoch"] - low + ((name, rg) < (s["file"], s["rg_idx"]))
                expected.update(layout[name][rg] * whole_epochs)
    assert not expected - seen, "documents skipped"
    extra = seen - expected  # the documents read of each rank's current row group: doc_idx of them, each once
    assert all(count == 1 for count in extra.values()), "documents read twice"
    for s in final_states:
        assert len(set(extra) & set(layout[s["file"]][s["rg_idx"]])) == s["doc_idx"]
    assert sum(extra.values()) == sum(s["doc_idx"] for s in final_states)


def test_seeded_order(small_shards, monkeypatch):
    """seed=None reads the files' order; a seed reads each row group in a shuffled order, another every epoch; the
    same seed gives the same batches, another seed others."""
    row_groups = [group for groups in small_shards.values() for group in groups]
    num_docs = sum(map(len, row_groups))
    reads, batches = {}, {}
    for seed in (None, 5, 5, 6):
        tokenizer = IdTokenizer()
        loaders = start_ranks(monkeypatch, 1, seed=seed, B=8, tokenizer=tokenizer)
        _, _, run = run_ranks(loaders, lambda states: states[0]["epoch"] == 3)
        reads.setdefault(seed, []).append(tokenizer.encoded[:2 * num_docs])
        batches.setdefault(seed, []).append(torch.cat([inputs for (inputs, _), in run]))
    def by_row_group(ids):
        out = []
        for group in row_groups:
            out.append(ids[:len(group)])
            ids = ids[len(group):]
        return out
    epoch1, epoch2 = by_row_group(reads[None][0][:num_docs]), by_row_group(reads[None][0][num_docs:])
    assert epoch1 == epoch2 == row_groups
    epoch1, epoch2 = by_row_group(reads[5][0][:num_docs]), by_row_group(reads[5][0][num_docs:])
    assert [sorted(ids) for ids in epoch1] == [sorted(ids) for ids in epoch2] == row_groups
    assert sum(ids != group for ids, group in zip(epoch1, row_groups)) > len(row_groups) // 2, "shuffled"
    assert sum(a != b for a, b in zip(epoch1, epoch2)) > len(row_groups) // 2, "another order every epoch"
    assert reads[5][0] == reads[5][1] and torch.equal(batches[5][0], batches[5][1])
    n = min(len(batches[5][0]), len(batches[6][0]))
    assert reads[6][0] != reads[5][0] and not torch.equal(batches[6][0][:n], batches[5][0][:n])


@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (1, 2)])
def test_reshard_reads_every_document_once(small_shards, monkeypatch, capsys, old, new, seed):
    """N ranks train 4 steps; their states resume on M ranks, which run until each is in epoch 2: no document of
    epoch 1 was trained twice or skipped."""
    trained, states, _ = run_ranks(start_ranks(monkeypatch, old, seed=seed), after(4))
    assert {s["epoch"] for s in states} == {1}
    more, final, _ = run_ranks(start_ranks(monkeypatch, new, resume_states=states, seed=seed),
                               lambda states: min(s["epoch"] for s in states) == 2)
    assert f"Dataloader: resharding the data stream of {old} ranks onto {new} (" in capsys.readouterr().out
    check_every_document_once(small_shards, trained + more, final)


def test_reshard_across_an_epoch_boundary(small_shards, monkeypatch):
    """Rank 1 of 2 has fewer row groups and enters epoch 2 first: resharded onto 3 ranks while the old ranks are in
    different epochs (and files), every document is still trained once per epoch."""
    trained, states, _ = run_ranks(start_ranks(monkeypatch, 2), lambda states: states[1]["epoch"] == 2)
    assert states[0]["epoch"] == 1
    more, final, _ = run_ranks(start_ranks(monkeypatch, 3, resume_states=states),
                               lambda states: min(s["epoch"] for s in states) == 3)
    check_every_document_once(small_shards, trained + more, final)


@pytest.mark.parametrize("steps3,epochs3", [(1, [1, 1, 1]), (3, [1, 1, 2])])
def test_chained_reshard_and_exact_resume_of_a_resharded_stream(small_shards, monkeypatch, steps3, epochs3):
    """2 -> 3 -> 1 ranks, with a seed: every document trained once per epoch. The 3 ranks stop in the file where the 2
    stopped (so the 2 ranks' positions still matter after the second reshard), or straddling an epoch. The 3-rank
    stream, which carries the 2 ranks' positions, also resumes on 3 ranks with identical batches."""
    trained, states2, _ = run_ranks(start_ranks(monkeypatch, 2, seed=7), after(4))
    loaders = start_ranks(monkeypatch, 3, resume_states=states2, seed=7)
    more, states3, _ = run_ranks(loaders, after(steps3))
    assert [s["epoch"] for s in states3] == epochs3
    assert [len(s["worlds"]) for s in states3] == [int(epoch == 1) for epoch in epochs3]  # dropped past epoch 1
    _, _, expected = run_ranks(loaders, after(6))
    _, _, resumed = run_ranks(start_ranks(monkeypatch, 3, resume_states=states3, seed=7), after(6))
    assert all(torch.equal(a, b) for step_a, step_b in zip(expected, resumed) for pair_a, pair_b in zip(step_a, step_b)
               for a, b in zip(pair_a, pair_b))
    loaders = start_ranks(monkeypatch, 1, resume_states=states3, seed=7)
    last, states1, _ = run_ranks(loaders, after(1))
    assert len(states1[0]["worlds"]) == 2  # the positions of the 2 ranks and of the 3 ranks
    rest, final, _ = run_ranks(loaders, lambda states: states[0]["epoch"] == 3)
    check_every_document_once(small_shards, trained + more + last + rest, final)
