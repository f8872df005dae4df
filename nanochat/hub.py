"""
Hugging Face hub datasets over plain HTTP: the hub serves every public dataset as parquet shards, so we fetch those
with our own downloader and read them with pyarrow (no `datasets` dependency).

Cache layout: <base>/task_data/<repo_id with / -> -->/<subset>/<split>/shard_urls.json (the hub's list of shards) and
00000.parquet, ...: each file is downloaded once under a lock (only one rank fetches it) and appears only when
complete, so an interrupted download resumes with the files still missing.

Env: HF_ENDPOINT (default https://huggingface.co; tests point it at a local server),
     NANOCHAT_OFFLINE=1 or HF_HUB_OFFLINE=1 (never touch the network; only the cache is used).
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import DownloadError, download_file_with_lock, get_base_dir, is_offline


def hub_endpoint():
    """The hub's address; HF_ENDPOINT selects a mirror (or a local test server)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache_dir(repo_id, subset="default", split="train"):
    return os.path.join(get_base_dir(), "task_data", repo_id.replace("/", "--"), subset, split)


def _shard_urls(cache_dir):
    """The shard URLs of the cached shard list, or None when there is no shard list yet."""
    list_path = os.path.join(cache_dir, "shard_urls.json")
    if not os.path.exists(list_path):
        return None
    with open(list_path) as f:
        urls = json.load(f)
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        os.remove(list_path)  # a bad answer (e.g. an error page) is fetched again next time
        raise DownloadError(f"unexpected shard list in {list_path}: expected a non-empty JSON list of URLs")
    return urls


def is_hub_cached(repo_id, subset="default", split="train"):
    cache_dir = hub_cache_dir(repo_id, subset, split)
    urls = _shard_urls(cache_dir)
    shards = [os.path.join(cache_dir, f"{i:05d}.parquet") for i in range(len(urls or []))]
    return urls is not None and all(os.path.exists(path) for path in shards)


class HubDataset:
    """Rows of a pyarrow table, optionally viewed through a permutation. ds[i] -> {column: python value}."""

    def __init__(self, table, permutation=None):
        self.table, self.permutation = table, permutation

    @classmethod
    def from_rows(cls, rows):
        """Build from a list of dicts (local files), so local and hub data behave identically."""
        return cls(pa.Table.from_pylist(rows))

    def __len__(self):
        return self.table.num_rows

    def shuffle(self, seed):
        # default_rng(seed).permutation(n) is the row order datasets.Dataset.shuffle(seed) produces
        return HubDataset(self.table, np.random.default_rng(seed).permutation(self.table.num_rows))

    def __getitem__(self, index):
        n = self.table.num_rows
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for a dataset of {n} rows")
        index = index % n
        row = int(self.permutation[index]) if self.permutation is not None else index
        return self.table.slice(row, 1).to_pylist()[0]


def load_hub_dataset(repo_id, subset="default", split="train"):
    """Download (once) and read a hub dataset split. Raises DownloadError (with what to do) when it cannot."""
    cache_dir = hub_cache_dir(repo_id, subset, split)
    if is_offline() and not is_hub_cached(repo_id, subset, split):
        raise DownloadError(f"{repo_id} ({subset}/{split}) is not in the cache {cache_dir} and offline mode is on "
                            "(NANOCHAT_OFFLINE/HF_HUB_OFFLINE)")
    relative_dir = os.path.relpath(cache_dir, get_base_dir())
    os.makedirs(cache_dir, exist_ok=True)
    if _shard_urls(cache_dir) is None:
        download_file_with_lock(f"{hub_endpoint()}/api/datasets/{repo_id}/parquet/{subset}/{split}",
                                os.path.join(relative_dir, "shard_urls.json"))
    filenames = []
    for i, url in enumerate(_shard_urls(cache_dir)):
        filenames.append(f"{i:05d}.parquet")
        download_file_with_lock(url, os.path.join(relative_dir, filenames[-1]))
    tables = [pq.read_table(os.path.join(cache_dir, name)) for name in filenames]
    return HubDataset(pa.concat_tables(tables, promote_options="default"))
