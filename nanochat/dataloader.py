"""
Pretraining dataloader: tokenize documents on the fly and pack them into (B, T) rows, BOS-aligned, best fit.

Every row starts with <|bos|> at the start of a document. To fill a row we repeatedly take, from a buffer of
~buffer_size tokenized documents, the largest one that fits whole in the remaining space; when none fits we
crop the shortest one to fill the row exactly (its tail is dropped). No padding: every position is trained.

DDP: in each (epoch, file) rank r of W reads row groups r, r+W, r+2W, ..., so ranks see disjoint documents. With a
seed, the documents of each row group are read in an order shuffled by (seed, epoch, file, row group): the same seed
gives the same order, and every epoch a new one.

Exact resume: each yielded state_dict records the position of the next document to read AND the documents
still waiting in the buffer (as coordinates file/row group/raw index, re-read and re-tokenized on resume), so a
loader restarted from the state of step k yields exactly the batches the uninterrupted run yields after step k.
The state is per rank and JSON-serializable; a resume gets the states of every rank of the run (index = rank).
- Same number of ranks: each rank continues from its own state, and the batches are identical.
- N -> M ranks: the stream is resharded so that every document of the epoch is still read exactly once: the
  documents in flight (the old buffers and the unread rest of each old rank's row group) are dealt out to the new
  ranks' buffers, and the row groups no old rank had reached are dealt over the new ranks (the state remembers the
  old ranks' positions until the epoch is past them; a resharded stream can be resharded again). What is not kept
  is the batch composition: which documents are packed together, and in which step, differs from a run on N ranks.
- States of an older format (no buffer, or only a (pq_idx, rg_idx, epoch) position) resume approximately, skipping
  to the next row group block, with a warning.
"""

import os
import bisect
import functools
import itertools
import random

import torch

from nanochat.common import get_dist_info, print0
from nanochat.dataset import DataError, get_split_files, open_parquet, read_row_group_texts


class _DocumentStream:
    """This rank's documents in order: (file, row group, index) positions walked file by file, epoch after epoch.
    In each (epoch, file) the row groups that no earlier world of a resharded run consumed form a list, and this rank
    reads list[rank::world_size] (with no earlier world: row groups rank, rank+W, ...). Within a row group the
    documents are read in the file's order, or with a seed in an order shuffled anew for every epoch."""

    def __init__(self, split, rank, world_size, seed):
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, seed
        self.paths = get_split_files(split)
        self.names = [os.path.basename(p) for p in self.paths]
        # open every footer now: a corrupt shard fails here with one clear line, before any heavy work
        self.files = [open_parquet(p) for p in self.paths]
        self.epoch, self.pq_idx, self.rg_idx, self.doc_idx = 1, 0, 0, 0
        # earlier worlds of a resharded run, oldest first: the (epoch, pq_idx, rg_idx, doc_idx) of each of their ranks
        self.worlds = []

    @functools.lru_cache(maxsize=4)  # the row group being read is asked for again and again: decode it once
    def texts(self, pq_idx, rg_idx):
        return read_row_group_texts(self.files[pq_idx], rg_idx, self.paths[pq_idx])

    @functools.lru_cache(maxsize=4)
    def order(self, epoch, pq_idx, rg_idx):
        """The raw indices of a row group's documents in reading order."""
        order = range(len(self.texts(pq_idx, rg_idx)))
        if self.seed is not None:
            order = list(order)
            random.Random(f"{self.seed}/{epoch}/{self.names[pq_idx]}/{rg_idx}").shuffle(order)
        return order

    @functools.lru_cache(maxsize=4)
    def assigned(self, epoch, pq_idx):
        """This rank's row groups of a file in an epoch, in order."""
        rgs = list(range(self.files[pq_idx].num_row_groups))
        for positions in self.worlds:
            # rank o of that world read rgs[o::n] up to its position; a row group it had started is consumed (its
            # unread tail went to the next world's buffers), the rest are left for the worlds after it
            n = len(positions)
            rgs = sorted(rg for o, pos in enumerate(positions) for rg in rgs[o::n] if (epoch, pq_idx, rg, 0) >= pos)
        return rgs[self.rank::self.world_size]

    def file_index(self, name):
        if name not in self.names:
            raise DataError(f"the dataloader state refers to shard {name}, which is no longer in the "
                            f"{self.split} split; restore that file or start without resuming")
        return self.names.index(name)

    def _normalize(self):
        """Move the position forward to the next unread document; detect a rank with no data at all."""
        empty_files = 0
        while True:
            rgs = self.assigned(self.epoch, self.pq_idx)
            k = bisect.bisect_left(rgs, self.rg_idx)
            if k < len(rgs):
                if rgs[k] != self.rg_idx:
                    self.rg_idx, self.doc_idx = rgs[k], 0
                if self.doc_idx < len(self.texts(self.pq_idx, self.rg_idx)):
                    return
                self.rg_idx, self.doc_idx = self.rg_idx + 1, 0
                continue
            self.pq_idx, self.rg_idx, self.doc_idx = self.pq_idx + 1, 0, 0
            if self.pq_idx == len(self.files):
                self.pq_idx = 0
                self.epoch += 1
                if self.worlds and self.epoch > max(pos[0] for positions in self.worlds for pos in positions):
                    self.worlds = []  # they consumed nothing from this epoch on
            empty_files += not self.worlds  # under earlier worlds a whole epoch may rightly hold nothing for us
            if empty_files > len(self.files):
                raise DataError(f"rank {self.rank} has no {self.split} data: the split's shards have fewer row "
                                f"groups than the world size {self.world_size}; use fewer processes or rebuild the "
                                f"shards with smaller row groups")

    def next_slice(self, max_docs):
        """Up to max_docs texts from the current row group, with their coordinates; advances the position."""
        self._normalize()
        texts = self.texts(self.pq_idx, self.rg_idx)
        indices = self.order(self.epoch, self.pq_idx, self.rg_idx)[self.doc_idx:self.doc_idx + max_docs]
        self.doc_idx += len(indices)
        return [texts[i] for i in indices], [(self.names[self.pq_idx], self.rg_idx, i) for i in indices]

    def position(self):
        self._normalize()
        return dict(epoch=self.epoch, pq_idx=self.pq_idx, rg_idx=self.rg_idx, doc_idx=self.doc_idx,
                    file=self.names[self.pq_idx],
                    worlds=[[[e, self.names[f], rg, d] for e, f, rg, d in positions] for positions in self.worlds])

    def restore(self, state):
        """Continue from a state's position (its buffer is the caller's)."""
        self.pq_idx = self.file_index(state["file"])
        self.epoch, self.rg_idx, self.doc_idx = state["epoch"], state["rg_idx"], state["doc_idx"]
        self.worlds = [[(e, self.file_index(f), rg, d) for e, f, rg, d in positions]
                       for positions in state.get("worlds", [])]


def _compress_coords(coords):
    """[(name, rg, i), ...] -> [[name, rg, first_i, count, first_i, count, ...], ...]: one entry per stretch of one
    row group, its indices as runs (unshuffled buffers hold long runs, shuffled ones at least share row groups)."""
    entries = []
    for name, rg, i in coords:
        if entries and entries[-1][0] == name and entries[-1][1] == rg:
            if entries[-1][-2] + entries[-1][-1] == i:
                entries[-1][-1] += 1
            else:
                entries[-1] += [i, 1]
        else:
            entries.append([name, rg, i, 1])
    return entries


def _expand_coords(entries):
    return [(name, rg, first + k) for name, rg, *runs in entries
            for first, count in zip(runs[::2], runs[1::2]) for k in range(count)]


def _can_resume_exactly(states, split):
    """States written by a loader that records its buffer, one per rank of their world, for this split."""
    return (all("buffer" in s and s.get("split", split) == split and s.get("world_size") == len(states) for s in states)
            and [s.get("rank") for s in states] == list(range(len(states))))


def _reshard(states, world_size, stream):
    """The states that continue the streams of len(states) ranks on world_size ranks, each document of the epoch
    read once: the documents in flight (the old buffers and the unread tails of the row groups being read) are dealt
    out into the new buffers, and the row groups no old rank had reached are dealt out by the new ranks' streams,
    which record the old ranks' positions to tell which those are."""
    positions = [(s["epoch"], stream.file_index(s["file"]), s["rg_idx"], s["doc_idx"]) for s in states]
    in_flight = []
    for state, (epoch, pq_idx, rg_idx, doc_idx) in zip(states, positions):
        in_flight += _expand_coords(state["buffer"])
        if doc_idx > 0:  # a row group not started is left to the new world whole
            in_flight += [(state["file"], rg_idx, i) for i in stream.order(epoch, pq_idx, rg_idx)[doc_idx:]]
    # every old rank carries the same earlier worlds, or none once its epoch is past them all
    worlds = next((s["worlds"] for s in states if s.get("worlds")), [])
    worlds = worlds + [[[s["epoch"], s["file"], s["rg_idx"], s["doc_idx"]] for s in states]]
    epoch, pq_idx = min(positions)[:2]  # every row group before the slowest old rank was consumed
    print0(f"Dataloader: resharding the data stream of {len(states)} ranks onto {world_size} ({len(in_flight)} "
           f"documents in flight dealt out; the row groups not yet reached are dealt over the new ranks)")
    return [dict(epoch=epoch, pq_idx=pq_idx, rg_idx=0, doc_idx=0, file=stream.names[pq_idx], worlds=worlds,
                 rank=rank, world_size=world_size, split=stream.split,
                 buffer=_compress_coords(in_flight[rank::world_size])) for rank in range(world_size)]


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128,
        device="cuda", resume_states=None, buffer_size=1000, seed=None, eval_slice=False):
    """Infinite generator of (inputs (B,T) int64, targets (B,T) int64, state_dict) on `device`. resume_states: the
    state_dicts of every rank of the run to continue (index = rank); seed: shuffle each row group's documents.
    eval_slice: the rows of an evaluation instead: every rank reads the whole split once, as one process would, and
    rows take the documents in order (the last one of a row cropped), so the same rows whatever the world size, none
    repeated, and neighbouring rows no more alike than neighbouring documents (best fit would sort them by length);
    the generator ends with the split."""
    _, rank, _, world_size = get_dist_info()
    if eval_slice:
        rank, world_size = 0, 1
    stream = _DocumentStream(split, rank, world_size, seed)
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
    if resume_states is not None:
        if _can_resume_exactly(resume_states, split):
            if len(resume_states) != world_size:
                resume_states = _reshard(resume_states, world_size, stream)
            state = resume_states[rank]
            stream.restore(state)
            coords = _expand_coords(state["buffer"])
            add_docs([stream.texts(stream.file_index(name), rg)[i] for name, rg, i in coords], coords)
        else:
            # an older format (no buffer, or only a position): skip the rest of the row-group block being read
            state = resume_states[min(rank, len(resume_states) - 1)]
            print0(f"WARNING: the dataloader state holds no exact position for rank {rank}/{world_size}; "
                   f"resuming approximately at the next row group (some documents are skipped)")
            pq_idx = state["pq_idx"] if "file" not in state else stream.file_index(state["file"])
            pq_idx = min(pq_idx, len(stream.files) - 1)  # the split may have fewer files now
            stream.pq_idx, stream.epoch = pq_idx, state.get("epoch", 1)
            stream.rg_idx = (state["rg_idx"] // world_size + 1) * world_size + rank

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
