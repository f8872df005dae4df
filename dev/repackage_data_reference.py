"""
How the hosted pretraining shards were produced, runnable on local text so the recipe can be checked.

The hub shards (karpathy/fineweb-edu-100b-shuffle, karpathy/climbmix-400b-shuffle) were made like this:
  1. Load the upstream dataset (FineWeb-Edu sample-100BT, or Nemotron-ClimbMix) and shuffle it with seed 42.
  2. Stream the documents in shuffled order (ClimbMix stores GPT-2 token ids: decode them to text with tiktoken).
  3. Fill a shard until it holds >= 250M characters AND its document count is a multiple of 1024.
  4. Write it as parquet: one string column `text`, row groups of 1024 documents (a power of two, so DDP ranks
     striding over row groups get equal shares), no dictionary encoding, zstd level 3, no column statistics,
     named shard_00000.parquet, shard_00001.parquet, ...
  5. Documents left over after the last full shard are dropped.
  6. Upload the folder to the hub (HF_TOKEN, huggingface_hub's upload_large_folder).
The last shard is the validation shard (nanochat/dataset.py pins it).

Here the input is a local folder of .txt/.md/.jsonl/.parquet files (read as in `python -m nanochat.dataset --from-dir`)
or, with --hf-dataset and the `datasets` package installed, the upstream dataset itself.
For our own shards day to day use `python -m nanochat.dataset --from-dir DIR` (keeps the tail, writes a manifest).

    python dev/repackage_data_reference.py --input-dir ~/my_text --output-dir /tmp/shards --shard-chars 2000000
"""

import os
import sys
import time
import random
import argparse

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable as a plain script

parser = argparse.ArgumentParser(description="Repackage text into nanochat pretraining shards (the hub shards' recipe)")
parser.add_argument("--input-dir", type=str, default=None, help="folder of .txt/.md/.jsonl/.parquet files")
parser.add_argument("--hf-dataset", type=str, default=None, help="upstream dataset, e.g. HuggingFaceFW/fineweb-edu (needs `datasets`)")
parser.add_argument("--hf-config", type=str, default=None, help="dataset config, e.g. sample-100BT")
parser.add_argument("--decode-gpt2-tokens", action="store_true", help="documents are GPT-2 token ids (ClimbMix): decode with tiktoken")
parser.add_argument("--output-dir", type=str, required=True, help="where shard_XXXXX.parquet files go")
parser.add_argument("--shard-chars", type=int, default=250_000_000, help="characters per shard")
parser.add_argument("--row-group-size", type=int, default=1024, help="documents per row group")
parser.add_argument("--max-doc-chars", type=int, default=10_000, help="local text: split longer files into documents of at most this size")
parser.add_argument("--seed", type=int, default=42, help="shuffle seed")
parser.add_argument("--upload-repo", type=str, default=None, help="upload the folder to this hub dataset repo (needs HF_TOKEN)")
args = parser.parse_args()
if (args.input_dir is None) == (args.hf_dataset is None):
    raise SystemExit("error: give exactly one of --input-dir or --hf-dataset")

# 1-2. documents in shuffled order
if args.input_dir:
    from nanochat.local_data import read_text_dir
    docs = read_text_dir(args.input_dir, args.max_doc_chars)
    random.Random(args.seed).shuffle(docs)
    documents = iter(docs)
else:
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("error: --hf-dataset needs the `datasets` package (pip install datasets)")
    ds = load_dataset(args.hf_dataset, name=args.hf_config, split="train").shuffle(seed=args.seed)
    column = "tokens" if args.decode_gpt2_tokens else "text"
    if args.decode_gpt2_tokens:
        import tiktoken
        gpt2 = tiktoken.get_encoding("gpt2")
        documents = (gpt2.decode(row[column]) for row in ds)
    else:
        documents = (row[column] for row in ds)

# 3-5. fill shards; a shard is flushed at >= shard_chars chars and a multiple of row_group_size docs; tail dropped
os.makedirs(args.output_dir, exist_ok=True)
shard, shard_chars, shard_index, t0 = [], 0, 0, time.time()
for doc in documents:
    shard.append(doc)
    shard_chars += len(doc)
    if shard_chars >= args.shard_chars and len(shard) % args.row_group_size == 0:
        path = os.path.join(args.output_dir, f"shard_{shard_index:05d}.parquet")
        tmp = path + ".tmp"
        pq.write_table(pa.Table.from_pydict({"text": shard}), tmp, row_group_size=args.row_group_size,
                       use_dictionary=False, compression="zstd", compression_level=3, write_statistics=False)
        os.replace(tmp, path)
        print(f"Wrote {path}: {len(shard):,} documents, {shard_chars / 1e6:.1f}M chars ({time.time() - t0:.1f}s)")
        shard, shard_chars, shard_index = [], 0, shard_index + 1
print(f"Dropped the tail: {len(shard):,} documents ({shard_chars / 1e6:.1f}M chars) that did not fill a shard")
if shard_index == 0:
    print("Note: no shard was written; lower --shard-chars for small inputs")

# 6. upload
if args.upload_repo:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise SystemExit("error: --upload-repo needs the HF_TOKEN environment variable")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise SystemExit("error: --upload-repo needs the `huggingface_hub` package")
    HfApi(token=token).upload_large_folder(folder_path=args.output_dir, repo_id=args.upload_repo, repo_type="dataset")
