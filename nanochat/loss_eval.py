"""
Bits per byte: a tokenizer-independent validation loss, with its standard error, on one fixed slice of a split.

Mean cross-entropy per token depends on the vocabulary (a bigger vocab packs more bytes into each token), so we
instead sum the loss (nats) over all target tokens and divide by the number of UTF-8 bytes those tokens decode to.
Special tokens have 0 bytes in token_bytes and are left out of both sums, as are ignored targets (-1).

The slice (eval_batches) is the first num_tokens // sequence_len rows of the split as ONE process packs them, whatever
the batch size and the number of processes, so base_train's validation and base_eval measure the same tokens (both
default to EVAL_TOKENS) and the same checkpoint gets the same number in both. Its rows are stretches of consecutive
documents, not best fit, which groups documents by length: on the offline corpus (runcpu's model at step 120), best-fit
rows in 32-row chunks spread 0.41 bpb where the standard error said 0.09; rows in order, 0.12 where it said 0.13.
"""

import itertools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import get_dist_info, is_ddp_initialized, print0
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit

# Tokens of a bpb evaluation, the default of both base_train --eval-tokens and base_eval --split-tokens: 10,240 rows of
# 2048 tokens, so the standard error is the rows' spread of bpb / 101 (0.003 for a spread of 0.3 bpb)
EVAL_TOKENS = 40 * 524288


class BpbEstimate(NamedTuple):
    bpb: float     # bits per byte over the rows (inf when there are no bytes)
    se: float      # its standard error over the rows (nan with fewer than two rows)
    tokens: int    # target tokens evaluated (ignored targets not counted)
    loss: float    # mean loss per target token in nats, special tokens included (nan when there are no targets)

    def __str__(self):
        return format_bpb(self.bpb, self.se, self.tokens)


def format_bpb(bpb, se, tokens, digits=6):
    """'1.395101 ± 0.032404 (97,792 tokens)': a bpb always shows its standard error and how many tokens it covers."""
    return f"{bpb:.{digits}f} ± {se:.{digits}f} ({tokens:,} tokens)"


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes):
    """
    model: returns per-token losses with forward(x, y, loss_reduction='none').
    batches: (inputs, targets, ...) of shape (B, T) (extra items, e.g. a loader state, are ignored).
    token_bytes: int tensor (V,) of bytes per token id. Returns a BpbEstimate over all ranks.

    The standard error takes each row as one sample: packing never splits a document across rows (it crops), so rows
    hold disjoint documents, and eval_batches' rows (consecutive documents) are as independent as documents are;
    sums per row cost nothing extra.
    bpb is a ratio of sums, R = sum_i nats_i / (ln2 sum_i bytes_i) over the K rows, and the delta method gives
    Var(R) = K/(K-1) * sum_i (nats_i - ln2 R bytes_i)^2 / (ln2 sum_i bytes_i)^2. Rows without a target (padding, or
    every target ignored) are no sample. The SE says how much the number would move on another slice of as many
    rows; it knows nothing of training noise (seeds), and pieces of one text landing in several rows understate it.
    """
    rows = []  # per row: nats of byte-carrying targets, bytes, nats of all targets, targets
    for batch in batches:
        x, y = batch[0].long(), batch[1].long()  # kept batches are int32 (see eval_batches)
        loss = model(x, y, loss_reduction="none").view(y.shape).float()
        valid = y.int() >= 0  # int32 compare works on every backend (MPS has no int64 compare for some ops)
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))], 0)
        rows.append(torch.stack([torch.where(num_bytes > 0, loss, 0.0).sum(1), num_bytes.sum(1).float(),
                                 torch.where(valid, loss, 0.0).sum(1), valid.sum(1).float()], dim=1))
    # float64 from here (on the CPU: MPS has none); every rank holds its rows, the sums are over all ranks
    per_row = torch.cat(rows).cpu().double() if rows else torch.zeros(0, 4, dtype=torch.float64)
    per_row = per_row[per_row[:, 3] > 0]
    totals = torch.cat([per_row.sum(0), torch.tensor([len(per_row)], dtype=torch.float64)])
    byte_nats, num_bytes, all_nats, num_targets, num_rows = sum_over_ranks(totals, token_bytes.device).tolist()
    loss = all_nats / num_targets if num_targets else float("nan")
    if num_bytes == 0:
        return BpbEstimate(float("inf"), float("nan"), int(num_targets), loss)
    ratio = byte_nats / num_bytes  # nats per byte; then the residuals in a second pass (no cancellation)
    squares = sum_over_ranks(((per_row[:, 0] - ratio * per_row[:, 1]) ** 2).sum()[None], token_bytes.device).item()
    se = math.sqrt(num_rows / (num_rows - 1) * squares) / (math.log(2) * num_bytes) if num_rows > 1 else float("nan")
    return BpbEstimate(ratio / math.log(2), se, int(num_targets), loss)


def sum_over_ranks(values, device):
    if is_ddp_initialized() and dist.get_world_size() > 1:
        values = values.to(device)  # NCCL reduces only CUDA tensors
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def eval_batches(tokenizer, split, num_tokens, sequence_len, batch_size, device):
    """This rank's share of the slice: the first max(1, num_tokens // sequence_len) rows of `split`, packed as one
    process does in one pass, documents in order (all rows if the split holds fewer), rank r taking rows r, r+W, ...,
    in batches of batch_size rows. Rows do not depend on the batch size (the packer fills them one after the other),
    so neither does the slice. The last batch is padded with rows of ignored targets (a compiled model keeps one
    shape). Kept as int32 (half the memory) in a list that every evaluation replays: tokenizing again costs seconds."""
    _, rank, _, world_size = get_dist_info()
    num_rows = max(1, num_tokens // sequence_len)
    rows = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 1, sequence_len, split, device="cpu",
                                                          eval_slice=True)
    mine, found = [], 0
    for found, (x, y) in enumerate(itertools.islice(rows, num_rows), start=1):
        if (found - 1) % world_size == rank:
            mine.append((x, y))
    if found < num_rows:  # a row that came round again would be no new sample: the slice ends with the split
        print0(f"NOTE: the {split} split holds {found:,} rows of {sequence_len} tokens, fewer than the "
               f"{num_rows:,} asked for; evaluating all of them")
    batches = []
    for start in range(0, len(mine), batch_size):
        x, y = (torch.cat([row[k] for row in mine[start:start + batch_size]]) for k in (0, 1))
        pad = batch_size - len(x)
        x, y = F.pad(x, (0, 0, 0, pad)), F.pad(y, (0, 0, 0, pad), value=-1)
        batches.append((x.to(device, torch.int32), y.to(device, torch.int32)))
    return batches


def keep_batches(batches, steps):
    """The first `steps` (inputs, targets) of a loader, copied (loaders reuse their buffers) as int32 (half the memory),
    in a list every evaluation can replay: a validation split does not change, and tokenizing it again costs seconds."""
    return [(batch[0].to(torch.int32, copy=True), batch[1].to(torch.int32, copy=True))
            for _, batch in zip(range(steps), batches)]
