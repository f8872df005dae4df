"""
The SFT data loader: conversations rendered and packed into rows by BOS-aligned best fit, with a state that resumes
exactly at the next batch, on the same number of processes or (redistributed) on another.

Data order: the epochs of the mixture laid end to end are one stream of positions p = 0, 1, 2, ... (position p is
conversation p % len(dataset), of epoch p // len(dataset) + 1), and rank r of W fetches positions r, r + W, r + 2W, ...
So the ranks share no conversation, and together they fetch each one exactly once per epoch.

This rank's state, yielded with every batch (JSON-able; it resumes at the batch after the one it came with):
    cursor   the next position of this rank's stride (cursor, cursor + W, ...)
    pending  positions to fetch before the stride, in order (what a reshard handed this rank; usually empty)
    buffer   positions fetched and waiting in the packing buffer, in buffer order (re-rendered on resume)
    used     conversations this rank packed or skipped: the sum over ranks is the run's progress
    stats    packing counts: conversations rendered, truncated, skipped; row tokens, padding tokens
    epoch    the epoch of the last conversation fetched (for the log line)

Resharding N old ranks' states to M new ranks (resume_state): let C be the furthest old cursor. The old strides cover
every position from C on, and below C exactly: every old rank's pending positions, its buffer, and its stride's
positions under C. Those are dealt round-robin to the new ranks (buffers as buffers, the rest as pending), and new
rank j's stride is C + j, C + j + M, ... So across the change no conversation of an epoch is used twice and none is
skipped, and the new states reshard again. What changes is which rank packs what, so batches differ from the
uninterrupted run's after the change; the old ranks' used counts and stats are carried by new rank 0.
"""

import torch

from nanochat.common import NanochatError, print0


def new_packing_stats():
    return dict(conversations=0, truncated=0, skipped=0, tokens=0, padding=0)


def resume_state(states, rank, world_size):
    """This rank's loader state to start from: a fresh one (states None), its own (every old rank's states, as many as
    there are ranks now), or its share of them redistributed over world_size ranks."""
    if states is None:
        return dict(cursor=rank, pending=[], buffer=[], used=0, stats=new_packing_stats(), epoch=1)
    if len(states) == world_size:
        return states[rank]
    old_world = len(states)
    furthest = max(s["cursor"] for s in states)
    unreached = sorted(p for s in states for p in [*s["pending"], *range(s["cursor"], furthest, old_world)])
    waiting = [p for s in states for p in s["buffer"]]
    print0(f"SFT data: the loader states of {old_world} rank(s) are redistributed over {world_size}: {len(waiting)} "
           f"buffered conversation(s) and {len(unreached)} behind the furthest rank are dealt round-robin")
    state = dict(cursor=furthest + rank, pending=unreached[rank::world_size], buffer=waiting[rank::world_size],
                 used=0, stats=new_packing_stats(), epoch=max(s["epoch"] for s in states))
    if rank == 0:  # the counts of the run so far: summed over ranks they stay the run's totals
        state["used"] = sum(s["used"] for s in states)
        state["stats"] = {k: sum(s["stats"][k] for s in states) for k in state["stats"]}
    return state


def sft_batches(dataset, tokenizer, B, T, device, rank=0, world_size=1, state=None, buffer_size=100):
    """
    Yields (inputs, targets, state) forever; inputs/targets are (B, T) int64 on device, targets = -1 where no loss,
    state the loader state after this batch (see the module docstring). state: where to start (resume_state's).

    Each row holds T+1 tokens: whole conversations chosen best-fit from a small buffer (the longest one that still
    fits, the first among equals), then BOS padding. A conversation longer than a row is truncated to fit, or skipped
    when nothing the assistant says survives (one that never fits would clog the buffer); both are counted.
    """
    # Best fit from a buffer of buffer_size conversations keeps padding low while staying close to the data order.
    # Every row starts at a conversation's BOS, so no row opens mid-conversation, and padding only ever sits at the
    # end of a row, where causal attention cannot let it change a real token.
    state = resume_state(None, rank, world_size) if state is None else state
    cursor, pending, used, epoch = state["cursor"], list(state["pending"]), state["used"], state["epoch"]
    stats = dict(state["stats"])
    capacity, bos = T + 1, tokenizer.get_bos_token_id()  # T + 1 tokens: inputs are the first T, targets the last T
    length = len(dataset)

    def render(position):
        try:
            ids, mask = tokenizer.render_conversation(dataset[position % length])
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            raise NanochatError(f"conversation #{position % length} of the SFT mixture is malformed ({e!r}); "
                                f"fix or remove that row in its source file") from e
        return ids, mask

    # the buffer holds (position, ids, mask); a resumed one is rendered again (its stats were counted when fetched)
    buffer = [(p, *(x[:capacity] for x in render(p))) for p in state["buffer"]]
    skipped_in_a_row = 0
    use_pinned = torch.device(device).type == "cuda"
    while True:
        rows_ids, rows_mask = [], []
        for _ in range(B):
            row_ids, row_mask = [], []
            while len(row_ids) < capacity:
                # (the buffer refills before each choice, so the best fit is over buffer_size candidates every time)
                while len(buffer) < buffer_size:
                    if pending:
                        position = pending.pop(0)
                    else:
                        position, cursor = cursor, cursor + world_size
                    epoch = position // length + 1
                    ids, mask = render(position)
                    stats["conversations"] += 1
                    if not any(mask[1:capacity]):
                        stats["skipped"] += 1
                        used += 1  # a skipped conversation still counts as seen for the epoch
                        skipped_in_a_row += 1
                        # a whole pass without a trainable conversation means there is none: stop, do not loop forever
                        if skipped_in_a_row > length:
                            raise NanochatError("no conversation in the mixture has any assistant token to train on "
                                                f"(with --max-seq-len={capacity - 1}); check the data or use a longer "
                                                "--max-seq-len")
                        continue
                    skipped_in_a_row = 0
                    stats["truncated"] += len(ids) > capacity
                    buffer.append((position, ids[:capacity], mask[:capacity]))
                remaining = capacity - len(row_ids)
                fitting = [j for j, (_, ids, _) in enumerate(buffer) if len(ids) <= remaining]
                if not fitting:
                    # nothing fits the tail of this row: pad it (never happens on an empty row, everything fits one)
                    stats["padding"] += remaining
                    row_ids += [bos] * remaining
                    row_mask += [0] * remaining
                    break
                _, ids, mask = buffer.pop(max(fitting, key=lambda j: len(buffer[j][1])))
                row_ids += ids
                row_mask += mask
                used += 1
            rows_ids.append(row_ids)
            rows_mask.append(row_mask)
        ids = torch.tensor(rows_ids, dtype=torch.long)
        # loss only where the assistant speaks (padding has mask 0 too)
        targets = torch.where(torch.tensor(rows_mask, dtype=torch.bool), ids, -1)
        batch = torch.stack([ids[:, :-1], targets[:, 1:]])  # inputs and targets in one host-to-device copy
        stats["tokens"] += B * capacity
        # pinned memory lets the copy to the GPU run while the host packs the next batch
        inputs, targets = (batch.pin_memory() if use_pinned else batch).to(device, non_blocking=use_pinned)
        yield inputs, targets, dict(cursor=cursor, pending=list(pending), buffer=[p for p, _, _ in buffer], used=used,
                                    stats=dict(stats), epoch=epoch)
