"""
Pretraining dataloader: tokenize documents on the fly and pack them into (B, T) rows, BOS-aligned, best fit.

Every row starts with <|bos|> at the start of a document. To fill a row we repeatedly take, from a buffer of
~buffer_size tokenized documents, the largest one that fits whole in the remaining space; when none fits we
crop the shortest one to fill the row exactly (its tail is dropped). No padding: every position is trained.

DDP: rank r reads row groups r, r+W, r+2W, ... of every shard, so ranks see disjoint documents.

Exact resume: each yielded state_dict records the position of the next document to read AND the documents
still waiting in the buffer (as coordinates file/row group/index, re-read and re-tokenized on resume), so a
loader restarted from the state of step k yields exactly the batches the uninterrupted run yields after step k.
The state is per rank (save each rank's own) and JSON-serializable. A state from another rank, or one holding only
a (pq_idx, rg_idx, epoch) position, resumes approximately (skips to the next row group block), with a warning.
"""

import os
import bisect
import functools
import itertools

import torch

from nanochat.common import get_dist_info, print0
from nanochat.dataset import DataError, get_split_files, open_parquet, read_row_group_texts


class _DocumentStream:
    """This rank's documents in order: (file, row group, index) positions walked file by file, epoch after epoch."""

    def __init__(self, split, rank, world_size):
        self.split, self.rank, self.world_size = split, rank, world_size
        self.paths = get_split_files(split)
        self.names = [os.path.basename(p) for p in self.paths]
        # open every footer now: a corrupt shard fails here with one clear line, before any heavy work
        self.files = [open_parquet(p) for p in self.paths]
        self.epoch, self.pq_idx, self.rg_idx, self.doc_idx = 1, 0, rank, 0

    @functools.lru_cache(maxsize=4)  # the row group being read is asked for again and again: decode it once
    def texts(self, pq_idx, rg_idx):
        return read_row_group_texts(self.files[pq_idx], rg_idx, self.paths[pq_idx])

    def file_index(self, name):
        if name not in self.names:
            raise DataError(f"the dataloader state refers to shard {name}, which is no longer in the "
                            f"{self.split} split; restore that file or start without resuming")
        return self.names.index(name)

    def _normalize(self):
        """Move the position forward past exhausted row groups / files; detect a rank with no data at all."""
        empty_files = 0
        while True:
            if self.rg_idx < self.files[self.pq_idx].num_row_groups:
                if self.doc_idx < len(self.texts(self.pq_idx, self.rg_idx)):
                    return
                self.rg_idx += self.world_size
                self.doc_idx = 0
                continue
            self.pq_idx += 1
            self.rg_idx, self.doc_idx = self.rank, 0
            empty_files += 1
            if self.pq_idx == len(self.files):
                self.pq_idx = 0
                self.epoch += 1
            if empty_files > len(self.files):
                raise DataError(f"rank {self.rank} has no {self.split} data: the split's shards have fewer row "
                                f"groups than the world size {self.world_size}; use fewer processes or rebuild the "
                                f"shards with smaller row groups")

    def next_slice(self, max_docs):
        """Up to max_docs texts from the current row group, with their coordinates; advances the position."""
        self._normalize()
        texts = self.texts(self.pq_idx, self.rg_idx)
        start, end = self.doc_idx, min(self.doc_idx + max_docs, len(texts))
        name = self.names[self.pq_idx]
        coords = [(name, self.rg_idx, i) for i in range(start, end)]
        self.doc_idx = end
        return texts[start:end], coords

    def position(self):
        self._normalize()
        return dict(epoch=self.epoch, pq_idx=self.pq_idx, rg_idx=self.rg_idx, doc_idx=self.doc_idx,
                    file=self.names[self.pq_idx])


def _compress_coords(coords):
    """[(name, rg, i), ...] -> [[name, rg, first_i, count], ...] runs (buffers hold long consecutive runs)."""
    runs = []
    for name, rg, i in coords:
        if runs and runs[-1][0] == name and runs[-1][1] == rg and runs[-1][2] + runs[-1][3] == i:
            runs[-1][3] += 1
        else:
            runs.append([name, rg, i, 1])
    return runs


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128,
        device="cuda", resume_state_dict=None, buffer_size=1000, eval_slice=False):
    """Infinite generator of (inputs (B,T) int64, targets (B,T) int64, state_dict) on `device`.
    eval_slice: the rows of an evaluation instead: every rank reads the whole split once, as one process would, and
    rows take the documents in order (the last one of a row cropped), so the same rows whatever the world size, none
    repeated, and neighbouring rows no more alike than neighbouring documents (best fit would sort them by length);
    the generator ends with the split."""
    _, rank, _, world_size = get_dist_info()
    if eval_slice:
        rank, world_size = 0, 1
    stream = _DocumentStream(split, rank, world_size)
    row_capacity = T + 1

    # The buffer: seq -> (tokens, coord), in arrival order (dicts keep it); by_len holds (len, seq) sorted for
    # best-fit lookups.
    buffer = {}
    by_len = []
    next_seq = 0

    def add_docs(texts, coords):
        nonlocal next_seq
        for tokens, coord in zip(tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=tokenizer_threads), coords):
            buffer[next_seq] = (tokens, coord)
            bisect.insort(by_len, (len(tokens), next_seq))
            next_seq += 1

    def take(index):
        length, seq = by_len.pop(index)
        return buffer.pop(seq)[0]

    # --- resume
    state = resume_state_dict
    if state is not None:
        exact = ("buffer" in state and state.get("rank") == rank and state.get("world_size") == world_size
                 and state.get("split", split) == split)
        if exact:
            stream.pq_idx = stream.file_index(state["file"])
            stream.epoch, stream.rg_idx, stream.doc_idx = state["epoch"], state["rg_idx"], state["doc_idx"]
            coords = [(name, rg, first + k) for name, rg, first, count in state["buffer"] for k in range(count)]
            add_docs([stream.texts(stream.file_index(name), rg)[i] for name, rg, i in coords], coords)
        else:
            # approximate: skip the rest of the row-group block that was being read
            print0(f"WARNING: dataloader state is not this rank's exact state (rank {rank}/{world_size}); "
                   f"resuming approximately at the next row group (some documents are skipped)")
            pq_idx = state["pq_idx"] if "file" not in state else stream.file_index(state["file"])
            pq_idx = min(pq_idx, len(stream.files) - 1)  # the split may have fewer files now
            stream.pq_idx, stream.epoch = pq_idx, state.get("epoch", 1)
            stream.rg_idx = (state["rg_idx"] // world_size + 1) * world_size + rank
            stream.doc_idx = 0

    # --- output staging. On CUDA: pinned host buffers + async copies, double-buffered so we never overwrite
    # a pinned buffer whose copy to the GPU is still in flight (a CUDA event guards each slot).
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        host = [torch.empty((2, B, T), dtype=torch.long, pin_memory=True) for _ in range(2)]
        gpu = [torch.empty((2, B, T), dtype=torch.long, device=device) for _ in range(2)]
        copied = [None, None]

    for step in itertools.count():
        rows = []
        for _ in range(B):
            row = []
            while len(row) < row_capacity:
                while len(buffer) < buffer_size and not (eval_slice and stream.position()["epoch"] > 1):
                    add_docs(*stream.next_slice(tokenizer_batch_size))
                if not buffer:  # the evaluation's one pass is over (the unfinished row is dropped)
                    return
                remaining = row_capacity - len(row)
                if eval_slice:  # the document that arrived first, cropped to the room left
                    seq = next(iter(buffer))
                    row.extend(take(bisect.bisect_left(by_len, (len(buffer[seq][0]), seq)))[:remaining])
                    continue
                i = bisect.bisect_right(by_len, (remaining, float("inf"))) - 1
                if i >= 0:
                    # the largest doc that fits whole; among equal lengths the one that arrived first
                    row.extend(take(bisect.bisect_left(by_len, (by_len[i][0], -1))))
                else:
                    # nothing fits: crop the shortest doc (first arrived among ties) to fill the row exactly
                    row.extend(take(0)[:remaining])
            rows.append(row)
        full = torch.tensor(rows, dtype=torch.long)
        state_dict = dict(stream.position(), rank=rank, world_size=world_size, split=split,
                          buffer=_compress_coords([coord for _, coord in buffer.values()]))
        if use_cuda:
            slot = step % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # the copy from this pinned buffer two steps ago is done
            host[slot][0].copy_(full[:, :-1])
            host[slot][1].copy_(full[:, 1:])
            gpu[slot].copy_(host[slot], non_blocking=True)
            copied[slot] = torch.cuda.current_stream().record_event()
            inputs, targets = gpu[slot][0], gpu[slot][1]
        else:
            inputs = full[:, :-1].contiguous().to(device)
            targets = full[:, 1:].contiguous().to(device)
        yield inputs, targets, state_dict


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same as above, yielding only (inputs, targets)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets
