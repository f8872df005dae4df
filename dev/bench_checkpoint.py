"""
The optimizer state's checkpoint layouts at one model size, on CPU: the per-rank files of before (every rank saves its
own shard and loads it back) against the consolidated file (rank 0 gathers the one-process state and saves it, every
rank loads its part), timed and sized with 1 process or N gloo processes. The layouts alternate for --rounds rounds
and the medians are printed (a shared machine's disk is noisy). The files are read back from the page cache, so load
times are memory-bound, not disk-bound. --plan-depth prints what rank 0 holds while saving a larger
model on more ranks, from the shapes alone (nothing is allocated).

    python -m dev.bench_checkpoint --depth=12
    torchrun --standalone --nproc-per-node=2 -m dev.bench_checkpoint --depth=12
    python -m dev.bench_checkpoint --plan-depth=26 --plan-world=8
"""

import os
import math
import time
import shutil
import argparse
import tempfile
import statistics

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat.common import atomic_write, print0
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import row_shard_size


def build_optimizer(depth, vocab_size, device):
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab_size=vocab_size))
    if device != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model, model.setup_optimizer()


def plan(depth, world, vocab_size):
    """Bytes of the optimizer state: the whole (rank 0's CPU copy while saving), the largest tensor gathered at once
    (rank 0's device buffer), one rank's shard, and every per-rank file of before together (padding and replicas)."""
    _, optimizer = build_optimizer(depth, vocab_size, "meta")
    whole = largest = shard = per_rank_files = 0
    for group in optimizer.param_groups:
        params = group["params"]
        if group["kind"] == "adamw":
            for p in params:
                rows = row_shard_size(p, world)
                tensor = p.numel() * p.element_size()
                whole, largest = whole + 2 * tensor, max(largest, tensor)
                shard += 2 * tensor if rows is None else 2 * tensor // world
                per_rank_files += 2 * tensor * (world if rows is None else 1)
        else:
            K, (r, c) = len(params), params[0].shape
            chunk = math.ceil(K / world)
            matrix = r * c * params[0].element_size() + max(r, c) * 4  # momentum + fp32 second moment
            whole, largest = whole + K * matrix, max(largest, chunk * world * r * c * params[0].element_size())
            shard, per_rank_files = shard + chunk * matrix, per_rank_files + chunk * world * matrix
    gb = 1024 ** 3
    print(f"d{depth} on {world} ranks: optimizer state {whole / gb:.2f} GB (rank 0's CPU memory while saving); "
          f"largest gather buffer {largest / gb:.2f} GB (rank 0's device, one tensor at a time); "
          f"one rank's shard {shard / gb:.2f} GB; per-rank files of before {per_rank_files / gb:.2f} GB in all")


def timed(fn, world):
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    if world > 1:
        dist.barrier()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Per-rank vs consolidated optimizer checkpoints: time and size")
    parser.add_argument("--depth", type=int, default=12, help="model depth to time (config_from_depth)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--plan-depth", type=int, default=None, help="only print the memory plan of this depth")
    parser.add_argument("--plan-world", type=int, default=8, help="ranks of the memory plan")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every measurement")
    args = parser.parse_args(argv)
    if args.plan_depth is not None:
        plan(args.plan_depth, args.plan_world, args.vocab_size)
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    model, optimizer = build_optimizer(args.depth, args.vocab_size, "cpu")
    for p in model.parameters():  # one step with stand-in gradients fills every state tensor
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    model.zero_grad(set_to_none=True)
    root = tempfile.mkdtemp(prefix="bench_checkpoint_") if rank == 0 else None
    if world > 1:
        holder = [root]
        dist.broadcast_object_list(holder)
        root = holder[0]
    old_dir, new_dir = os.path.join(root, "per_rank"), os.path.join(root, "consolidated")
    os.makedirs(old_dir, exist_ok=True)
    os.makedirs(new_dir, exist_ok=True)

    def save_per_rank():
        atomic_write(ckpt.rank_optim_path(old_dir, 1, rank), lambda f: torch.save(optimizer.state_dict(), f))

    def gather():
        optimizer.consolidated_state_dict()

    def save_consolidated():
        data = optimizer.consolidated_state_dict()
        if rank == 0:
            atomic_write(ckpt.optim_path(new_dir, 1), lambda f: torch.save(data, f))

    def load_per_rank():
        optimizer.load_state_dict(ckpt._load_tensors(ckpt.rank_optim_path(old_dir, 1, rank), old_dir, 1, "cpu"))

    def load_consolidated():
        optimizer.load_resharded(ckpt._load_optimizer(new_dir, 1))

    steps = {"save per-rank": save_per_rank, "save consolidated": save_consolidated, "gather": gather,
             "load per-rank": load_per_rank, "load consolidated": load_consolidated}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn, world))
    results = {name: statistics.median(values) for name, values in times.items()}
    sizes = {"per-rank": sum(os.path.getsize(ckpt.rank_optim_path(old_dir, 1, r)) for r in range(world)),
             "consolidated": os.path.getsize(ckpt.optim_path(new_dir, 1))}
    print0(f"d{args.depth}, vocab {args.vocab_size}, {world} process(es), "
           f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, median of {args.rounds}:")
    for layout in ("per-rank", "consolidated"):
        print0(f"  {layout:>12}: save {results['save ' + layout]:.2f} s | load {results['load ' + layout]:.2f} s | "
               f"{sizes[layout] / 1024 ** 2:.0f} MiB on disk")
    print0(f"  (of the consolidated save, the gather onto rank 0: {results['gather']:.2f} s)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
