"""
Dataloader throughput: how many tokens/s the BOS best-fit loader packs from the shards in use
(dataset chosen as everywhere else: --dataset or NANOCHAT_DATASET), with the trained tokenizer.

    python -m dev.bench_dataloader --batch-size=32 --seq-len=2048 --steps=50
    NANOCHAT_DATASET=offline python dev/bench_dataloader.py
"""

import os
import sys
import time
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also runnable as a plain script

from nanochat.tokenizer import get_tokenizer
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit

parser = argparse.ArgumentParser(description="Benchmark the pretraining dataloader (tokens/s)")
parser.add_argument("--dataset", type=str, default=None, help="dataset to read (default: env NANOCHAT_DATASET or climbmix)")
parser.add_argument("--split", type=str, default="train", choices=["train", "val"], help="split to read")
parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (B)")
parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (T)")
parser.add_argument("--steps", type=int, default=50, help="timed batches")
parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (fills the document buffer)")
parser.add_argument("--tokenizer-threads", type=int, default=4, help="threads for batch tokenization")
parser.add_argument("--buffer-size", type=int, default=1000, help="documents kept for best-fit packing")
parser.add_argument("--device", type=str, default="cpu", help="cpu | cuda (pinned memory + async copies) | mps")
args = parser.parse_args()
if args.dataset:
    os.environ["NANOCHAT_DATASET"] = args.dataset

tokenizer = get_tokenizer()
t0 = time.time()
loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
    tokenizer, args.batch_size, args.seq_len, args.split, tokenizer_threads=args.tokenizer_threads,
    device=args.device, buffer_size=args.buffer_size)
for _ in range(args.warmup):
    next(loader)
print(f"warmup: {args.warmup} batches in {time.time() - t0:.2f}s")

t0 = time.time()
bos = tokenizer.get_bos_token_id()
num_docs = 0
for _ in range(args.steps):
    inputs, targets, state = next(loader)
    num_docs += int((inputs == bos).sum())
if args.device == "cuda":
    import torch
    torch.cuda.synchronize()
dt = time.time() - t0
tokens = args.steps * args.batch_size * args.seq_len
print(f"B={args.batch_size} T={args.seq_len}: {args.steps} batches in {dt:.2f}s = {tokens / dt:,.0f} tokens/s "
      f"({dt / args.steps * 1000:.1f} ms/batch, {num_docs / (args.steps * args.batch_size):.1f} documents/row)")

# resuming costs a re-read and re-tokenization of the documents left in the buffer
t0 = time.time()
resumed = tokenizing_distributed_data_loader_with_state_bos_bestfit(
    tokenizer, args.batch_size, args.seq_len, args.split, tokenizer_threads=args.tokenizer_threads,
    device=args.device, buffer_size=args.buffer_size, resume_states=[state])
next(resumed)
print(f"exact resume (restore {sum(sum(r[3::2]) for r in state['buffer'])} buffered documents + 1 batch): {time.time() - t0:.2f}s")
