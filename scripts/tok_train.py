"""
Train the BPE tokenizer on the pretraining shards and save it (with token_bytes.pt) to <base>/tokenizer/.

    python -m scripts.tok_train                                   # 2B chars, vocab 32768
    python -m scripts.tok_train --max-chars=50000000 --vocab-size=8192
"""

import time
import argparse

import torch

from nanochat.cli import run
from nanochat.common import print0, int_in
from nanochat.report import get_report
from nanochat.dataset import get_dataset_name, get_data_dir, get_split_files, parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS, get_tokenizer_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer on the pretraining shards")
    parser.add_argument("--max-chars", type=int_in("[1, inf)"), default=2_000_000_000, help="train on at most this many characters (default 2B)")
    parser.add_argument("--doc-cap", type=int_in("[1, inf)"), default=10_000, help="use at most this many characters of each document")
    parser.add_argument("--vocab-size", type=int_in(f"[{256 + len(SPECIAL_TOKENS)}, inf)"), default=32768,
                        help="vocabulary size: the 256 bytes, the merges and the special tokens (default 2^15)")
    args = parser.parse_args(argv)

    dataset = get_dataset_name()
    train_files = get_split_files("train")  # a DataError saying how to get shards if there are none
    print0(f"dataset: {dataset} ({len(train_files)} train shards in {get_data_dir()}), max_chars: {args.max_chars:,}, "
           f"doc_cap: {args.doc_cap:,}, vocab_size: {args.vocab_size:,}")

    # the text: documents in shard order, each capped at doc_cap chars, until max_chars is crossed
    num_chars_seen = 0
    def text_iterator():
        nonlocal num_chars_seen
        for texts in parquets_iter_batched(split="train"):
            for doc in texts:
                doc = doc[:args.doc_cap]
                num_chars_seen += len(doc)
                yield doc
                if num_chars_seen > args.max_chars:
                    return

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), args.vocab_size)
    train_time = time.time() - t0
    print0(f"Trained on {num_chars_seen:,} chars in {train_time:.2f}s ({num_chars_seen / max(train_time, 1e-9) / 1e6:.2f}M chars/s)")
    if tokenizer.get_vocab_size() != args.vocab_size:
        print0(f"Note: the text ran out of merges: vocab size is {tokenizer.get_vocab_size()}, not {args.vocab_size} "
               f"(train on more text for the full vocabulary)")

    # also writes token_bytes.pt: raw byte length of every token (0 for specials), for vocab-independent bits per byte
    token_bytes = tokenizer.save(get_tokenizer_dir())

    regular = token_bytes[token_bytes > 0].to(torch.float32)
    stats = dict(train_time=train_time, num_special_tokens=len(tokenizer.get_special_tokens()),
                 token_bytes_min=int(regular.min()), token_bytes_max=int(regular.max()),
                 token_bytes_mean=regular.mean().item(), token_bytes_std=regular.std().item())
    print0(", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items()))

    get_report().log(section="Tokenizer training", data=[vars(args), {"dataset": dataset, "chars_trained": num_chars_seen}, stats])


if __name__ == "__main__":
    run(main)
