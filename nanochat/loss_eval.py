"""
Bits per byte: a tokenizer-independent validation loss.

Mean cross-entropy per token depends on the vocabulary (a bigger vocab packs more bytes into each token), so we
instead sum the loss (nats) over all target tokens and divide by the number of UTF-8 bytes those tokens decode to.
Special tokens have 0 bytes in token_bytes and are left out of both sums, as are ignored targets (-1).
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import is_ddp_initialized


@torch.no_grad()
def evaluate_loss(model, batches, steps, token_bytes):
    """
    model: returns per-token losses with forward(x, y, loss_reduction='none').
    batches: iterable of (inputs, targets) (extra items, e.g. a loader state, are ignored).
    steps: number of batches to consume. token_bytes: int tensor (V,) of bytes per token id.
    Returns (bits per byte, mean loss per target token, number of target tokens), summed over all ranks; the bpb is
    inf when there are no bytes, the mean loss nan when there are no targets. Ignored targets (-1) count nowhere;
    special tokens count in the mean loss but not in the bpb.
    """
    nats = torch.zeros(2, dtype=torch.float32, device=token_bytes.device)  # of byte-carrying targets, of all targets
    counts = torch.zeros(2, dtype=torch.int64, device=token_bytes.device)  # bytes, targets
    for _, batch in zip(range(steps), batches):  # range first: no batch is read beyond `steps`
        x, y = batch[0].long(), batch[1].long()  # kept batches are int32 (see keep_batches)
        loss = model(x, y, loss_reduction="none").reshape(-1).float()
        y = y.reshape(-1)
        valid = y.int() >= 0  # int32 compare works on every backend (MPS has no int64 compare for some ops)
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))], 0)
        nats += torch.stack([torch.where(num_bytes > 0, loss, 0.0).sum(), torch.where(valid, loss, 0.0).sum()])
        counts += torch.stack([num_bytes.sum(), valid.sum()]).to(torch.int64)
    if is_ddp_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    (byte_nats, all_nats), (num_bytes, num_tokens) = nats.tolist(), counts.tolist()
    bpb = byte_nats / (math.log(2) * num_bytes) if num_bytes > 0 else float("inf")
    return bpb, all_nats / num_tokens if num_tokens > 0 else float("nan"), num_tokens


def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte over `steps` batches (see evaluate_loss)."""
    return evaluate_loss(model, batches, steps, token_bytes)[0]


def keep_batches(batches, steps):
    """The first `steps` (inputs, targets) of a loader, copied (loaders reuse their buffers) as int32 (half the memory),
    in a list every evaluation can replay: a validation split does not change, and tokenizing it again costs seconds."""
    return [(batch[0].to(torch.int32, copy=True), batch[1].to(torch.int32, copy=True))
            for _, batch in zip(range(steps), batches)]
