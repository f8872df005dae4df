"""
Bits per byte: a tokenizer-independent validation loss.

Mean cross-entropy per token depends on the vocabulary (a bigger vocab packs more bytes into each token), so we
instead sum the loss (nats) over all target tokens and divide by the number of UTF-8 bytes those tokens decode to.
Special tokens have 0 bytes in token_bytes and are left out of both sums, as are ignored targets (-1).
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model: returns per-token losses with forward(x, y, loss_reduction='none').
    batches: iterator of (inputs, targets) (extra items, e.g. a loader state, are ignored).
    steps: number of batches to consume. token_bytes: int tensor (V,) of bytes per token id.
    Returns bits per byte summed over all ranks (all-reduce when a multi-rank process group is up); inf if no bytes.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _, batch in zip(range(steps), batches):  # range first: no batch is read beyond `steps`
        x, y = batch[0], batch[1]
        loss = model(x, y, loss_reduction="none").reshape(-1).float()
        y = y.reshape(-1)
        ignored = y.int() < 0  # int32 compare works on every backend (MPS has no int64 compare for some ops)
        num_bytes = token_bytes[torch.where(ignored, torch.zeros_like(y), y)]
        num_bytes = torch.where(ignored, torch.zeros_like(num_bytes), num_bytes)
        total_nats += (loss * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum().to(torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
