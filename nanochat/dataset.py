"""
Pretraining data: parquet shards with one string column `text`, one document per row.

Where shards come from (one dataset is in use at a time, chosen by --dataset or env NANOCHAT_DATASET):
- climbmix     (default) downloaded from the Hugging Face hub, 6542 train shards + pinned val shard 06542
- fineweb-edu  downloaded from the hub, 1822 train shards + pinned val shard 01822 (the SEED dataset)
- offline      built here from text every machine with our dependencies already has: the docstrings, long
               comments and bundled docs of the installed Python standard library and packages (python -m nanochat.dataset --offline-corpus)
- local        built here from your own .txt/.md/.jsonl/.parquet files (python -m nanochat.dataset --from-dir DIR)
Each dataset lives in its own directory under the base dir (see get_data_dir), so sources never mix.
The validation shard is pinned: the hub datasets' last shard, or the one named in manifest.json of a local build.

Env: NANOCHAT_DATASET (which dataset), HF_ENDPOINT (hub address, tests point it at 127.0.0.1),
     NANOCHAT_OFFLINE=1 (never touch the network).

CLI:
    python -m nanochat.dataset -n 8                 # first 8 train shards + the val shard of the default dataset
    python -m nanochat.dataset -n 8 --dataset fineweb-edu
    python -m nanochat.dataset --offline-corpus     # then: export NANOCHAT_DATASET=offline
    python -m nanochat.dataset --from-dir ~/my_text # then: export NANOCHAT_DATASET=local
"""

import os
import json
import argparse
import concurrent.futures

import pyarrow.parquet as pq

# nanochat.common (which imports torch) is imported inside functions: the CLI then starts, and fails offline, fast

# -----------------------------------------------------------------------------
# The datasets and where their shards live

HUB_DATASETS = {
    "climbmix": dict(dirname="base_data_climbmix", repo="karpathy/climbmix-400b-shuffle", max_shard=6542),
    "fineweb-edu": dict(dirname="base_data", repo="karpathy/fineweb-edu-100b-shuffle", max_shard=1822),
}
LOCAL_DATASETS = {
    "offline": dict(dirname="base_data_offline"),
    "local": dict(dirname="base_data_local"),
}
DATASETS = {**HUB_DATASETS, **LOCAL_DATASETS}
DEFAULT_DATASET = "climbmix"
MANIFEST = "manifest.json"  # written last by local builds: names the val shard


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def get_dataset_name(name=None):
    """The dataset in use: the explicit name, else env NANOCHAT_DATASET, else climbmix."""
    name = name or os.environ.get("NANOCHAT_DATASET") or DEFAULT_DATASET
    if name not in DATASETS:
        raise SystemExit(f"error: unknown dataset {name!r} (from --dataset or NANOCHAT_DATASET); "
                         f"choose one of: {', '.join(DATASETS)}")
    return name


def get_data_dir(name=None):
    """The one place that decides which directory holds the shards in use."""
    from nanochat.common import get_base_dir
    return os.path.join(get_base_dir(), DATASETS[get_dataset_name(name)]["dirname"])


def how_to_get(name):
    if name == "offline":
        return "build it with: python -m nanochat.dataset --offline-corpus"
    if name == "local":
        return "build it with: python -m nanochat.dataset --from-dir DIR"
    flag = "" if name == DEFAULT_DATASET else f" --dataset {name}"
    return (f"download shards with: python -m nanochat.dataset -n 8{flag} "
            f"(offline? python -m nanochat.dataset --offline-corpus and export NANOCHAT_DATASET=offline)")


def hub_base_url(name):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/datasets/{HUB_DATASETS[name]['repo']}/resolve/main"

# -----------------------------------------------------------------------------
# Listing and reading shards

def list_parquet_files(data_dir=None):
    """All finished shards in the data dir, sorted, as full paths (temp files are never listed)."""
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet"))
    return [os.path.join(data_dir, n) for n in names]


def get_val_filename(data_dir, name=None):
    """The pinned val shard's file name: from the manifest of a local build, else the hub dataset's last shard."""
    manifest_path = os.path.join(data_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)["val"]
    name = get_dataset_name(name)
    if name in HUB_DATASETS:
        return shard_name(HUB_DATASETS[name]["max_shard"])
    return None  # a local build without a manifest is an unfinished build


def get_split_files(split, data_dir=None, name=None):
    """Paths of the shards of one split. Exits with a clear message when shards are missing."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    name = get_dataset_name(name)
    data_dir = data_dir or get_data_dir(name)
    files = list_parquet_files(data_dir)
    if not files:
        others = [other for other in DATASETS if other != name and list_parquet_files(get_data_dir(other))]
        hint = f" (shards of {', '.join(others)} exist: set NANOCHAT_DATASET to use them)" if others else ""
        raise SystemExit(f"error: no parquet shards in {data_dir} (dataset {name!r}){hint}; {how_to_get(name)}")
    val_name = get_val_filename(data_dir, name)
    if val_name is None:
        raise SystemExit(f"error: {data_dir} has no {MANIFEST} (an unfinished build?); {how_to_get(name)}")
    val_path = os.path.join(data_dir, val_name)
    if split == "val":
        if not os.path.exists(val_path):
            raise SystemExit(f"error: the pinned validation shard {val_path} is missing; "
                             f"fetch it with: python -m nanochat.dataset -n 0 --dataset {name}")
        return [val_path]
    train = [f for f in files if os.path.basename(f) != val_name]
    if not train:
        raise SystemExit(f"error: no training shards in {data_dir} (only the val shard); {how_to_get(name)}")
    return train


def open_parquet(path):
    """Open a shard, turning a corrupt or foreign file into one clear line."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SystemExit(f"error: cannot read parquet file {path} ({type(e).__name__}: {e}); "
                         f"delete it and rebuild/re-download the shards")
    if "text" not in pf.schema_arrow.names:
        raise SystemExit(f"error: parquet file {path} has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


def read_row_group_texts(pf, rg_idx, path="?"):
    try:
        return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        raise SystemExit(f"error: corrupt row group {rg_idx} in {path} ({type(e).__name__}: {e}); "
                         f"delete the file and rebuild/re-download the shards")


def parquets_iter_batched(split, start=0, step=1):
    """Yield the `text` column of every row group (start, start+step, ...) of every shard of the split."""
    for path in get_split_files(split):
        pf = open_parquet(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield read_row_group_texts(pf, rg_idx, path)

# -----------------------------------------------------------------------------
# Downloading hub shards: parallel, resumable (finished shards are skipped), never a partial .parquet

def download_shard(index, data_dir, base_url, retries=5):
    """Fetch one shard; returns True on success. The .parquet name appears only for a complete, readable file."""
    filename = shard_name(index)
    final_path = os.path.join(data_dir, filename)
    if os.path.exists(final_path):
        return True
    from nanochat.common import download_file, DownloadError
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


def download_shards(num_files, name=None, num_workers=4, base_url=None, retries=5):
    """The first num_files train shards (-1 = all) plus the pinned val shard. Returns (num_ok, num_requested)."""
    name = get_dataset_name(name)
    info = HUB_DATASETS[name]
    base_url = base_url or hub_base_url(name)
    data_dir = get_data_dir(name)
    os.makedirs(data_dir, exist_ok=True)
    max_shard = info["max_shard"]
    num_train = max_shard if num_files < 0 else min(num_files, max_shard)
    indices = [max_shard] + list(range(num_train))  # the val shard first: it doubles as a connectivity check
    from nanochat.common import is_offline
    if is_offline():
        missing = [i for i in indices if not os.path.exists(os.path.join(data_dir, shard_name(i)))]
        if missing:
            raise SystemExit(f"error: NANOCHAT_OFFLINE is set and {len(missing)} shards are missing in {data_dir}; "
                             f"unset it to download, or use: python -m nanochat.dataset --offline-corpus")
    print(f"Dataset {name}: {num_train} train shards + val shard {shard_name(max_shard)} -> {data_dir} "
          f"({num_workers} workers)", flush=True)
    if not download_shard(max_shard, data_dir, base_url, retries):
        raise SystemExit(f"error: could not download {shard_name(max_shard)} from {base_url}. Offline? Build the "
                         f"offline corpus instead: python -m nanochat.dataset --offline-corpus && "
                         f"export NANOCHAT_DATASET=offline (or use --from-dir DIR with your own text)")
    ok = 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for success in pool.map(lambda i: download_shard(i, data_dir, base_url, retries), indices[1:]):
            ok += int(success)
    print(f"Done! Downloaded: {ok}/{len(indices)} shards to {data_dir}", flush=True)
    return ok, len(indices)

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Get pretraining shards: download them, or build them locally")
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="number of train shards to download (-1 = all); the val shard is always fetched")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads / extraction processes")
    parser.add_argument("--dataset", type=str, default=None, help=f"one of {', '.join(DATASETS)} (default: env NANOCHAT_DATASET or {DEFAULT_DATASET})")
    parser.add_argument("--base-url", type=str, default=None, help="download from this URL instead of the hub (a mirror)")
    parser.add_argument("--retries", type=int, default=5, help="download attempts per shard (exponential backoff between them)")
    # local builds
    parser.add_argument("--offline-corpus", action="store_true", help="build the offline corpus from installed Python docs (dataset 'offline')")
    parser.add_argument("--from-dir", type=str, default=None, help="build shards from your own .txt/.md/.jsonl/.parquet files (dataset 'local')")
    parser.add_argument("--max-chars", type=int, default=50_000_000, help="offline corpus: stop after this many characters")
    parser.add_argument("--max-doc-chars", type=int, default=10_000, help="local builds: split longer texts into documents of at most this size")
    parser.add_argument("--force", action="store_true", help="offline corpus: rebuild even if already built")
    args = parser.parse_args(argv)

    from nanochat.local_corpus import build_from_dir, build_offline_corpus  # the local builders live there
    if args.offline_corpus and args.from_dir:
        raise SystemExit("error: use either --offline-corpus or --from-dir, not both")
    name = get_dataset_name("offline" if args.offline_corpus else "local" if args.from_dir else args.dataset)
    if args.from_dir:
        build_from_dir(args.from_dir, max_doc_chars=args.max_doc_chars)
    elif name == "offline":
        build_offline_corpus(max_chars=args.max_chars, max_doc_chars=args.max_doc_chars,
                             num_workers=min(args.num_workers, os.cpu_count() or 1), force=args.force)
    elif name == "local":
        raise SystemExit("error: dataset 'local' is built from your files: python -m nanochat.dataset --from-dir DIR")
    else:
        ok, requested = download_shards(args.num_files, name, args.num_workers, args.base_url, args.retries)
        if ok < requested:
            raise SystemExit(f"error: {requested - ok} shards failed to download; run the same command again "
                             f"(finished shards are kept)")
        return
    if os.environ.get("NANOCHAT_DATASET") != name:
        print(f"To train on these shards: export NANOCHAT_DATASET={name}")


if __name__ == "__main__":
    main()
