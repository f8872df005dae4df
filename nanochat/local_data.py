"""
Pretraining shards built on this machine, in the same format as the hub shards (see nanochat/dataset.py): the
'local' dataset from your own .txt/.md/.jsonl/.parquet files (python -m nanochat.dataset --from-dir DIR), and the
writer the offline demo corpus (scripts/offline_corpus.py) shares.

A build is deduplicated, shuffled with a fixed seed and written atomically: shards and manifest.json (which names
the val shard) go to a temp dir that then replaces the dataset's directory, so a reader sees a whole build or none.
"""

import os
import re
import json
import random
import shutil
import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import iter_jsonl
from nanochat.dataset import MANIFEST, DataError, get_data_dir, open_parquet, read_row_group_texts, shard_name

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
        raise DataError(f"found {len(docs)} distinct documents in {source}; need at least 2 (one for val)")
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
            raise DataError(f"could not write the shards under {os.path.dirname(out_dir)} "
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
    for line_no, row in iter_jsonl(path, DataError, hint="; fix or remove that line"):
        doc = row if isinstance(row, str) else (row.get("text") if isinstance(row, dict) else None)
        if not isinstance(doc, str):
            raise DataError(f"{path}:{line_no} has no string 'text' field; each line must be "
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
        raise DataError(f"{source_dir} has no .txt, .md, .jsonl or .parquet files")
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
        raise DataError(f"--from-dir {source_dir} is not a directory")
    docs = read_text_dir(source_dir, max_doc_chars)
    return write_shards(docs, get_data_dir("local"), "local", source_dir, shard_chars=shard_chars)
