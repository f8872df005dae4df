"""
Pretraining data: parquet shards with one string column `text`, one document per row.

Where shards come from (one dataset is in use at a time, chosen by --dataset or env NANOCHAT_DATASET):
- climbmix     (default) downloaded from the Hugging Face hub, 6542 train shards + pinned val shard 06542
- fineweb-edu  downloaded from the hub, 1822 train shards + pinned val shard 01822
- local        built here from your own .txt/.md/.jsonl/.parquet files (python -m nanochat.dataset --from-dir DIR)
- offline      built from text already on this machine by the offline demo tool (python -m dev.offline_corpus)
Each dataset lives in its own directory under the base dir (see get_data_dir), so sources never mix.
The validation shard is pinned: the hub datasets' last shard, or the one named in manifest.json of a local build.

Env: NANOCHAT_DATASET (which dataset), HF_ENDPOINT (hub address, tests point it at 127.0.0.1),
     NANOCHAT_OFFLINE=1 (never touch the network).

CLI:
    python -m nanochat.dataset -n 8                 # first 8 train shards + the val shard of the default dataset
    python -m nanochat.dataset -n 8 --dataset fineweb-edu
    python -m nanochat.dataset --from-dir ~/my_text # then: export NANOCHAT_DATASET=local
"""

import os
import re
import glob
import json
import random
import shutil
import hashlib
import argparse
import concurrent.futures

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, download_file, iter_jsonl, int_in, DownloadError
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
    return os.path.join(get_base_dir(), DATASETS[get_dataset_name(name)]["dirname"])


OFFLINE_HINT = "offline? build shards from your own text: python -m nanochat.dataset --from-dir DIR"


def how_to_get(name):
    if name == "offline":
        return "build it with: python -m dev.offline_corpus"
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
    """Paths of the shards of one split ('train' or 'val'). Exits with a clear message when shards are missing.
    The val shard is named in the manifest of a local build, else it is the hub dataset's last shard."""
    name = get_dataset_name(name)
    data_dir = get_data_dir(name)
    files = list_parquet_files(data_dir)
    if not files:
        others = [other for other in DATASETS if other != name and list_parquet_files(get_data_dir(other))]
        hint = f" (shards of {', '.join(others)} exist: set NANOCHAT_DATASET to use them)" if others else ""
        raise SystemExit(f"error: no parquet shards in {data_dir} (dataset {name!r}){hint}; {how_to_get(name)}")
    manifest_path = os.path.join(data_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            val_name = json.load(f)["val"]
    elif name in HUB_DATASETS:
        val_name = shard_name(HUB_DATASETS[name]["max_shard"])
    else:
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
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise SystemExit(f"error: parquet file {path} has no 'text' column (columns: {schema.names})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise SystemExit(f"error: the 'text' column of parquet file {path} holds {text_type}, not strings")
    return pf


def read_row_group_texts(pf, rg_idx, path="?"):
    """The documents of one row group. Null and empty rows are dropped (the same way on every read, so
    dataloader positions stay valid)."""
    try:
        texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        raise SystemExit(f"error: corrupt row group {rg_idx} in {path} ({type(e).__name__}: {e}); "
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
        raise SystemExit(f"error: could not download {shard_name(max_shard)} from {base_url} ({OFFLINE_HINT})")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        ok = 1 + sum(pool.map(lambda i: download_shard(i, data_dir, base_url, retries), range(num_train)))
    print(f"Done! Downloaded: {ok}/{num_train + 1} shards to {data_dir}", flush=True)
    return ok, num_train + 1

# -----------------------------------------------------------------------------
# Building shards from local text (--from-dir), in the same format as the hub shards

LEADING_NEWLINES = re.compile(r"\n*")
MAX_FILE_BYTES = 1 << 30  # what one --from-dir file may bring in (the whole build is held in memory)


def split_long_document(text, max_chars):
    """Cut a long text at paragraph (then line, then hard) boundaries into pieces of at most max_chars.
    Linear in the text's length: a huge paragraph is cut by moving an index, never by re-slicing its rest."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""  # empty pieces are dropped at the end
    for para in re.split(r"\n\s*\n", text):
        start = 0
        while len(para) - start > max_chars:  # a single huge paragraph: cut at a line break or hard
            cut = para.rfind("\n", start, start + max_chars) - start
            cut = cut if cut > max_chars // 2 else max_chars
            pieces += [current, para[start:start + cut]]
            current, start = "", LEADING_NEWLINES.match(para, start + cut).end()
        para = para[start:]
        if len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def write_shards(documents, out_dir, dataset_name, source, shard_chars=10_000_000, val_fraction=0.05, seed=42,
                 manifest_extra=None):
    """
    Deduplicate, shuffle (seeded) and write documents as shards into out_dir, atomically:
    everything goes to a temp dir, manifest.json last, then the temp dir replaces out_dir.
    The val shard gets val_fraction of the documents and is the last shard, named in the manifest.
    """
    unique = {}  # hash of the whitespace-normalized text -> the first document with it (dicts keep order)
    for doc in map(str.strip, documents):
        if doc:
            unique.setdefault(hashlib.sha1(" ".join(doc.split()).encode("utf-8", "replace")).digest(), doc)
    docs = list(unique.values())
    if len(docs) < 2:
        raise SystemExit(f"error: found {len(docs)} distinct documents in {source}; need at least 2 (one for val)")
    random.Random(seed).shuffle(docs)
    num_val = max(1, int(len(docs) * val_fraction))
    val_docs, train_docs = docs[:num_val], docs[num_val:]
    # row groups small enough that the val shard has several, so DDP ranks each get some val data
    row_group_size = max(1, min(1024, num_val // 8))

    shards, current, current_chars = [], [], 0
    for doc in train_docs:
        current.append(doc)
        current_chars += len(doc)
        if current_chars >= shard_chars and len(current) % row_group_size == 0:
            shards.append(current)
            current, current_chars = [], 0
    if current:
        shards.append(current)  # the tail is kept: local corpora are small
    shards.append(val_docs)

    names = [shard_name(i) for i in range(len(shards))]
    manifest = dict(dataset=dataset_name, source=str(source), num_documents=len(docs),
                    num_chars=sum(len(d) for d in docs), row_group_size=row_group_size,
                    train=names[:-1], val=names[-1], seed=seed, **(manifest_extra or {}))
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        os.makedirs(tmp_dir)
        for name, shard_docs in zip(names, shards):
            pq.write_table(pa.Table.from_pydict({"text": shard_docs}), os.path.join(tmp_dir, name),
                           row_group_size=row_group_size, use_dictionary=False, compression="zstd",
                           compression_level=3, write_statistics=False)
        with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    except BaseException as e:  # a full disk, Ctrl-C: no half-written build is left behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, OSError):
            raise SystemExit(f"error: could not write the shards under {os.path.dirname(out_dir)} "
                             f"({os.strerror(e.errno) if e.errno else e}); {out_dir} is unchanged") from None
        raise
    # swap the finished dir in: a reader sees the old build or the new one, never a mix
    old_dir = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    print(f"Wrote {len(names) - 1} train shards + val shard {names[-1]} ({len(docs):,} documents, "
          f"{manifest['num_chars'] / 1e6:.1f}M chars, {len(val_docs):,} val docs) to {out_dir}", flush=True)
    return manifest


class SkippedFile(Exception):
    """A --from-dir file that is not used; the message says why (the build reports the skipped files by reason)."""


def read_user_file(path):
    """Documents from one user file: .txt/.md = whole file, .jsonl = one per line, .parquet = its text column.
    Raises SkippedFile for what is not a regular file, is over MAX_FILE_BYTES, or is not UTF-8 text."""
    if not os.path.isfile(path):  # a dangling link; a pipe would block, a device (/dev/zero) never ends
        raise SkippedFile("that are not regular files (broken links, pipes, devices)")
    too_large = SkippedFile(f"larger than {MAX_FILE_BYTES >> 20} MiB (split them into smaller files)")
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise too_large
    if path.endswith(".parquet"):
        pf = open_parquet(path)
        return [t for rg in range(pf.num_row_groups) for t in read_row_group_texts(pf, rg, path)]
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # a file may grow after its size was checked
    if len(data) > MAX_FILE_BYTES:
        raise too_large
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # valid UTF-8 can still be binary; text never holds NUL bytes
        raise SkippedFile("that are not UTF-8 text (binary?)")
    if not path.endswith(".jsonl"):
        return [text]
    docs = []
    not_json = lambda message: SystemExit(f"error: {message}")
    for line_no, row in iter_jsonl(path, not_json, hint="; fix or remove that line"):
        doc = row if isinstance(row, str) else (row.get("text") if isinstance(row, dict) else None)
        if not isinstance(doc, str):
            raise SystemExit(f"error: {path}:{line_no} has no string 'text' field; each line must be "
                             f'{{"text": "..."}} or a JSON string')
        docs.append(doc)
    return docs


def read_text_dir(source_dir, max_doc_chars):
    """The documents of the .txt/.md/.jsonl/.parquet files under source_dir, split to at most max_doc_chars;
    prints how many files were skipped, and why."""
    paths = []
    for root, dirs, files in os.walk(source_dir):
        dirs.sort()
        paths += [os.path.join(root, f) for f in sorted(files) if f.endswith((".txt", ".md", ".jsonl", ".parquet"))]
    if not paths:
        raise SystemExit(f"error: {source_dir} has no .txt, .md, .jsonl or .parquet files")
    print(f"Reading {len(paths)} files from {source_dir}", flush=True)
    docs, skipped = [], {}  # reason -> the files skipped for it
    for path in paths:
        try:
            file_docs = read_user_file(path)
        except SkippedFile as e:
            skipped.setdefault(str(e), []).append(os.path.relpath(path, source_dir))
            continue
        for doc in file_docs:
            docs += split_long_document(doc, max_doc_chars)
    for reason, names in skipped.items():
        print(f"Skipped {len(names)} files {reason}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}",
              flush=True)
    return docs


def build_from_dir(source_dir, max_doc_chars=10_000, shard_chars=10_000_000):
    """Shards of the 'local' dataset from the text files under source_dir."""
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
    if not os.path.isdir(source_dir):
        raise SystemExit(f"error: --from-dir {source_dir} is not a directory")
    docs = read_text_dir(source_dir, max_doc_chars)
    return write_shards(docs, get_data_dir("local"), "local", source_dir, shard_chars=shard_chars)

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
        build_from_dir(args.from_dir, max_doc_chars=args.max_doc_chars)
        print("To train on these shards: export NANOCHAT_DATASET=local")
        return
    name = get_dataset_name(args.dataset)
    if name not in HUB_DATASETS:
        raise SystemExit(f"error: dataset {name!r} is built locally, not downloaded; {how_to_get(name)}")
    ok, requested = download_shards(args.num_files, name, args.num_workers, args.retries)
    if ok < requested:
        raise SystemExit(f"error: {requested - ok} shards failed to download; run the same command again "
                         f"(finished shards are kept)")


if __name__ == "__main__":
    main()
