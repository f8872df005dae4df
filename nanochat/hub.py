"""
Hugging Face hub datasets over plain HTTP: the hub serves every public dataset as parquet shards, so we fetch those
with our own downloader and read them with pyarrow (no `datasets` dependency).

Cache layout: <base>/task_data/<repo_id with / -> -->/<subset>/<split>/00000.parquet, ...; manifest.json (the list of
shard files) is written last, so a directory with a manifest is complete and one without is redone.
An inter-process file lock makes only one rank download; the others wait and then read the cache.

Env: HF_ENDPOINT (default https://huggingface.co; tests point it at a local server),
     NANOCHAT_OFFLINE=1 or HF_HUB_OFFLINE=1 (never touch the network; only the cache is used).
"""

import os
import json
import fcntl

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, download_file, DownloadError, print0, is_offline


def hub_endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache_dir(repo_id, subset="default", split="train"):
    return os.path.join(get_base_dir(), "task_data", repo_id.replace("/", "--"), subset, split)


def is_hub_cached(repo_id, subset="default", split="train"):
    return os.path.exists(os.path.join(hub_cache_dir(repo_id, subset, split), "manifest.json"))


class HubDataset:
    """Rows of a pyarrow table, optionally viewed through a permutation. ds[i] -> {column: python value}."""

    def __init__(self, table, permutation=None):
        self.table = table
        self.permutation = permutation

    @classmethod
    def from_rows(cls, rows):
        """Build from a list of dicts (local files), so local and hub data behave identically."""
        return cls(pa.Table.from_pylist(rows))

    def __len__(self):
        return self.table.num_rows

    def shuffle(self, seed):
        # default_rng(seed).permutation(n) is the row order datasets.Dataset.shuffle(seed) produces
        permutation = np.random.default_rng(seed).permutation(self.table.num_rows)
        return HubDataset(self.table, permutation)

    def __getitem__(self, index):
        n = self.table.num_rows
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for a dataset of {n} rows")
        index = index % n
        row = int(self.permutation[index]) if self.permutation is not None else index
        return self.table.slice(row, 1).to_pylist()[0]


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _download_shards(repo_id, subset, split, cache_dir):
    list_url = f"{hub_endpoint()}/api/datasets/{repo_id}/parquet/{subset}/{split}"
    list_path = os.path.join(cache_dir, "shard_urls.json")
    download_file(list_url, list_path, retries=3, desc=f"{repo_id} {subset}/{split} shard list")
    with open(list_path) as f:
        urls = json.load(f)
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise DownloadError(f"unexpected shard list from {list_url}: expected a non-empty JSON list of URLs")
    filenames = []
    for i, url in enumerate(urls):
        filename = f"{i:05d}.parquet"
        print0(f"Downloading {url} ...")
        download_file(url, os.path.join(cache_dir, filename), desc=f"{repo_id} {subset}/{split} shard {i}")
        filenames.append(filename)
    _write_json_atomic(os.path.join(cache_dir, "manifest.json"), filenames)  # last: marks the cache complete


def load_hub_dataset(repo_id, subset="default", split="train"):
    """Download (once) and read a hub dataset split. Raises DownloadError (with what to do) when it cannot."""
    cache_dir = hub_cache_dir(repo_id, subset, split)
    manifest_path = os.path.join(cache_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        if is_offline():
            raise DownloadError(f"{repo_id} ({subset}/{split}) is not in the cache {cache_dir} and offline mode is on "
                                "(NANOCHAT_OFFLINE/HF_HUB_OFFLINE)")
        os.makedirs(cache_dir, exist_ok=True)
        with open(manifest_path + ".lock", "w") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if not os.path.exists(manifest_path):  # another rank may have finished while we waited
                    _download_shards(repo_id, subset, split, cache_dir)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    with open(manifest_path) as f:
        filenames = json.load(f)
    tables = [pq.read_table(os.path.join(cache_dir, name)) for name in filenames]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return HubDataset(table)
