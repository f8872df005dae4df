"""
Pretraining data: parquet shards with one string column `text`, one document per row.

Where shards come from (one dataset is in use at a time, chosen by --dataset or env NANOCHAT_DATASET):
- climbmix     (default) downloaded from the Hugging Face hub, 6542 train shards + pinned val shard 06542
- fineweb-edu  downloaded from the hub, 1822 train shards + pinned val shard 01822
- local        built here from your own .txt/.md/.jsonl/.parquet files (python -m nanochat.dataset --from-dir DIR)
- offline      built from text already on this machine by the offline demo tool (python -m scripts.offline_corpus)
Each dataset lives in its own directory under the base dir (see get_data_dir), so sources never mix.
The validation shard is pinned: the hub datasets' last shard, or the one named in manifest.json of a local build.
Local builds (--from-dir and the offline corpus) are written by nanochat/local_data.py.

Env: NANOCHAT_DATASET (which dataset), HF_ENDPOINT (hub address, tests point it at 127.0.0.1),
     NANOCHAT_OFFLINE=1 (never touch the network).

CLI:
    python -m nanochat.dataset -n 8                 # first 8 train shards + the val shard of the default dataset
    python -m nanochat.dataset -n 8 --dataset fineweb-edu
    python -m nanochat.dataset --from-dir ~/my_text # then: export NANOCHAT_DATASET=local
"""

import os
import glob
import json
import argparse
import concurrent.futures

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.cli import run
from nanochat.common import get_base_dir, download_file, int_in, DownloadError
from nanochat.errors import NanochatError
from nanochat.hub import hub_endpoint

# -----------------------------------------------------------------------------
# The datasets and where their shards live

HUB_DATASETS = {
    "climbmix": dict(dirname="base_data_climbmix", repo="karpathy/climbmix-400b-shuffle", max_shard=6542),
    "fineweb-edu": dict(dirname="base_data", repo="karpathy/fineweb-edu-100b-shuffle", max_shard=1822),
}
# built here, not downloaded
DATASETS = {**HUB_DATASETS, "offline": dict(dirname="base_data_offline"), "local": dict(dirname="base_data_local")}
DEFAULT_DATASET = "climbmix"
MANIFEST = "manifest.json"  # written last by local builds: names the val shard


class DataError(NanochatError):
    """Shards that are missing, unreadable or not in our format, or a local build that cannot be made; the message
    names the file and how to get good shards."""


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def get_dataset_name(name=None):
    """The dataset in use: the explicit name, else env NANOCHAT_DATASET, else climbmix."""
    name = name or os.environ.get("NANOCHAT_DATASET") or DEFAULT_DATASET
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (from --dataset or NANOCHAT_DATASET); "
                        f"choose one of: {', '.join(DATASETS)}")
    return name


def get_data_dir(name=None):
    """The one place that decides which directory holds the shards in use."""
    return os.path.join(get_base_dir(), DATASETS[get_dataset_name(name)]["dirname"])


OFFLINE_HINT = "offline? build shards from your own text: python -m nanochat.dataset --from-dir DIR"


def how_to_get(name):
    if name == "offline":
        return "build it with: python -m scripts.offline_corpus"
    if name == "local":
        return "build it with: python -m nanochat.dataset --from-dir DIR"
    flag = "" if name == DEFAULT_DATASET else f" --dataset {name}"
    return f"download shards with: python -m nanochat.dataset -n 8{flag} ({OFFLINE_HINT})"


# -----------------------------------------------------------------------------
# Listing and reading shards

def list_parquet_files(data_dir):
    """All finished shards in the data dir, sorted, as full paths (temp files are never listed)."""
    return sorted(glob.glob(os.path.join(glob.escape(data_dir), "*.parquet")))


def get_split_files(split, name=None):
    """Paths of the shards of one split ('train' or 'val'); DataError saying how to get them when they are missing.
    The val shard is named in the manifest of a local build, else it is the hub dataset's last shard."""
    name = get_dataset_name(name)
    data_dir = get_data_dir(name)
    files = list_parquet_files(data_dir)
    if not files:
        others = [other for other in DATASETS if other != name and list_parquet_files(get_data_dir(other))]
        hint = f" (shards of {', '.join(others)} exist: set NANOCHAT_DATASET to use them)" if others else ""
        raise DataError(f"no parquet shards in {data_dir} (dataset {name!r}){hint}; {how_to_get(name)}")
    manifest_path = os.path.join(data_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            val_name = json.load(f)["val"]
    elif name in HUB_DATASETS:
        val_name = shard_name(HUB_DATASETS[name]["max_shard"])
    else:
        raise DataError(f"{data_dir} has no {MANIFEST} (an unfinished build?); {how_to_get(name)}")
    val_path = os.path.join(data_dir, val_name)
    if split == "val":
        if not os.path.exists(val_path):
            raise DataError(f"the pinned validation shard {val_path} is missing; "
                            f"fetch it with: python -m nanochat.dataset -n 0 --dataset {name}")
        return [val_path]
    train = [f for f in files if os.path.basename(f) != val_name]
    if not train:
        raise DataError(f"no training shards in {data_dir} (only the val shard); {how_to_get(name)}")
    return train


def open_parquet(path):
    """Open a shard; a corrupt or foreign file is a DataError naming it."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"cannot read parquet file {path} ({type(e).__name__}: {e}); "
                        f"delete it and rebuild/re-download the shards")
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"parquet file {path} has no 'text' column (columns: {schema.names})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"the 'text' column of parquet file {path} holds {text_type}, not strings")
    return pf


def read_row_group_texts(pf, rg_idx, path="?"):
    """The documents of one row group. Null and empty rows are dropped (the same way on every read, so
    dataloader positions stay valid)."""
    try:
        texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        raise DataError(f"corrupt row group {rg_idx} in {path} ({type(e).__name__}: {e}); "
                        f"delete the file and rebuild/re-download the shards")
    return [t for t in texts if t]


def parquets_iter_batched(split):
    """Yield the documents of every row group of every shard of the split, in order."""
    for path in get_split_files(split):
        pf = open_parquet(path)
        for rg_idx in range(pf.num_row_groups):
            yield read_row_group_texts(pf, rg_idx, path)

# -----------------------------------------------------------------------------
# Downloading hub shards: parallel, resumable (finished shards are skipped), never a partial .parquet

def download_shard(index, data_dir, base_url, retries=5):
    """Fetch one shard; returns True on success. The .parquet name appears only for a complete, readable file."""
    filename = shard_name(index)
    final_path = os.path.join(data_dir, filename)
    if os.path.exists(final_path):
        return True
    staging_path = final_path + ".download"  # not *.parquet: never listed as a shard
    try:
        download_file(f"{base_url}/{filename}", staging_path, retries=retries, desc=filename)
        pq.ParquetFile(staging_path)  # a body that is not a parquet file must not become a shard
    except DownloadError as e:
        print(f"Failed {filename}: {str(e).split('; ')[0]}", flush=True)
        return False
    except Exception as e:
        print(f"Failed {filename}: downloaded file is not valid parquet ({e})", flush=True)
        os.remove(staging_path)
        return False
    os.replace(staging_path, final_path)
    print(f"Downloaded {filename}", flush=True)
    return True


def download_shards(num_files, name=None, num_workers=4, retries=5):
    """The first num_files train shards (-1 = all) plus the pinned val shard. Returns (num_ok, num_requested)."""
    name = get_dataset_name(name)
    info = HUB_DATASETS[name]
    base_url = f"{hub_endpoint()}/datasets/{info['repo']}/resolve/main"
    data_dir = get_data_dir(name)
    os.makedirs(data_dir, exist_ok=True)
    max_shard = info["max_shard"]
    num_train = max_shard if num_files < 0 else min(num_files, max_shard)
    print(f"Dataset {name}: {num_train} train shards + val shard {shard_name(max_shard)} -> {data_dir} "
          f"({num_workers} workers)", flush=True)
    # the val shard first: it doubles as a connectivity check
    if not download_shard(max_shard, data_dir, base_url, retries):
        raise DataError(f"could not download {shard_name(max_shard)} from {base_url} ({OFFLINE_HINT})")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        ok = 1 + sum(pool.map(lambda i: download_shard(i, data_dir, base_url, retries), range(num_train)))
    print(f"Done! Downloaded: {ok}/{num_train + 1} shards to {data_dir}", flush=True)
    return ok, num_train + 1

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Get pretraining shards: download them, or build them from your own text")
    parser.add_argument("-n", "--num-files", type=int_in("[0, inf)", -1), default=-1, help="number of train shards to download (-1 = all); the val shard is always fetched")
    parser.add_argument("-w", "--num-workers", type=int_in("[1, inf)"), default=4, help="parallel downloads")
    parser.add_argument("--dataset", type=str, default=None, help=f"one of {', '.join(HUB_DATASETS)} (default: env NANOCHAT_DATASET or {DEFAULT_DATASET})")
    parser.add_argument("--retries", type=int_in("[1, inf)"), default=5, help="download attempts per shard (exponential backoff between them)")
    parser.add_argument("--from-dir", type=str, default=None, help="build the 'local' dataset from your own .txt/.md/.jsonl/.parquet files")
    parser.add_argument("--max-doc-chars", type=int_in("[1, inf)"), default=10_000, help="--from-dir: split longer texts into documents of at most this size")
    args = parser.parse_args(argv)

    if args.from_dir:
        from nanochat.local_data import build_from_dir  # not at the top: local_data imports this module
        build_from_dir(args.from_dir, max_doc_chars=args.max_doc_chars)
        print("To train on these shards: export NANOCHAT_DATASET=local")
        return
    name = get_dataset_name(args.dataset)
    if name not in HUB_DATASETS:
        raise DataError(f"dataset {name!r} is built locally, not downloaded; {how_to_get(name)}")
    ok, requested = download_shards(args.num_files, name, args.num_workers, args.retries)
    if ok < requested:
        raise DataError(f"{requested - ok} shards failed to download; run the same command again "
                        f"(finished shards are kept)")


if __name__ == "__main__":
    run(main)
