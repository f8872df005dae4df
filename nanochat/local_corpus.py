"""
Build pretraining shards from local text, in the same parquet format as the downloaded ones:
- the offline corpus: real English every machine with our dependencies already has (docstrings, long comments
  and bundled docs of the installed Python standard library and packages), for `--offline-corpus`;
- your own .txt/.md/.jsonl/.parquet files, for `--from-dir DIR`.
Builds are atomic: shards go to a temp dir, manifest.json (naming the val shard) last, then the dir is swapped in.
Run through `python -m nanochat.dataset --offline-corpus` or `--from-dir DIR`.
"""

import os
import re
import ast
import sys
import json
import time
import random
import shutil
import hashlib
import sysconfig
import concurrent.futures

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.dataset import shard_name, get_data_dir, MANIFEST, open_parquet

# -----------------------------------------------------------------------------
# Building shards locally (offline corpus, --from-dir). Same format as the hub shards.

def split_long_document(text, max_chars):
    """Cut a long text at paragraph (then line, then hard) boundaries into pieces of at most max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        while len(para) > max_chars:  # a single huge paragraph: cut at a line break or hard
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def write_shards(documents, out_dir, dataset_name, source, shard_chars=10_000_000, val_fraction=0.05, seed=42):
    """
    Deduplicate, shuffle (seeded) and write documents as shards into out_dir, atomically:
    everything goes to a temp dir, manifest.json last, then the temp dir replaces out_dir.
    The val shard gets val_fraction of the documents and is the last shard, named in the manifest.
    """
    seen, docs = set(), []
    for doc in documents:
        doc = doc.strip()
        key = hashlib.sha1(" ".join(doc.split()).encode("utf-8", "replace")).digest()
        if doc and key not in seen:
            seen.add(key)
            docs.append(doc)
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
        shards.append(current)  # unlike the hub's repackaging, the tail is kept: local corpora are small
    shards.append(val_docs)

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    names = []
    for i, shard_docs in enumerate(shards):
        names.append(shard_name(i))
        table = pa.Table.from_pydict({"text": shard_docs})
        pq.write_table(table, os.path.join(tmp_dir, names[-1]), row_group_size=row_group_size,
                       use_dictionary=False, compression="zstd", compression_level=3, write_statistics=False)
    manifest = dict(dataset=dataset_name, source=str(source), num_documents=len(docs),
                    num_chars=sum(len(d) for d in docs), row_group_size=row_group_size,
                    train=names[:-1], val=names[-1], seed=seed)
    with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    old_dir = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    print(f"Wrote {len(names) - 1} train shards + val shard {names[-1]} ({len(docs):,} documents, "
          f"{manifest['num_chars'] / 1e6:.1f}M chars, {len(val_docs):,} val docs) to {out_dir}", flush=True)
    return manifest


def read_user_file(path):
    """Documents from one user file: .txt/.md = whole file, .jsonl = one per line, .parquet = its text column."""
    if path.endswith(".parquet"):
        pf = open_parquet(path)
        return [t for t in pf.read(columns=["text"]).column("text").to_pylist() if t]
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if not path.endswith(".jsonl"):
        return [text]
    docs = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{line_no} is not valid JSON ({e}); fix or remove that line")
        doc = row if isinstance(row, str) else (row.get("text") if isinstance(row, dict) else None)
        if not isinstance(doc, str):
            raise SystemExit(f"error: {path}:{line_no} has no string 'text' field; each line must be "
                             f'{{"text": "..."}} or a JSON string')
        docs.append(doc)
    return docs


def build_from_dir(source_dir, max_doc_chars=10_000, shard_chars=10_000_000):
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
    if not os.path.isdir(source_dir):
        raise SystemExit(f"error: --from-dir {source_dir} is not a directory")
    paths = []
    for root, dirs, files in os.walk(source_dir):
        dirs.sort()
        paths += [os.path.join(root, f) for f in sorted(files) if f.endswith((".txt", ".md", ".jsonl", ".parquet"))]
    if not paths:
        raise SystemExit(f"error: --from-dir {source_dir} has no .txt, .md, .jsonl or .parquet files")
    print(f"Reading {len(paths)} files from {source_dir}", flush=True)
    docs = []
    for path in paths:
        for doc in read_user_file(path):
            docs += split_long_document(doc, max_doc_chars)
    return write_shards(docs, get_data_dir("local"), "local", source_dir, shard_chars=shard_chars)

# -----------------------------------------------------------------------------
# The offline default corpus: docstrings and docs of the installed Python standard library and packages

SKIP_DIRS = {"__pycache__", "test", "tests", "testing", "_vendor", "vendored", "node_modules", "site-packages",
             "dist-packages", "lib2to3", "idle_test", "turtledemo", "ensurepip"}


def is_prose(text, min_words=6):
    """Cheap filter for English-like text: enough words, mostly letters, not a wall of symbols."""
    words = text.split()
    if len(words) < min_words:
        return False
    nonspace = sum(len(w) for w in words)
    letters = sum(c.isalpha() for c in text)
    return letters >= 0.6 * nonspace and sum(c.isascii() for c in text) >= 0.9 * len(text)


def clean_block(text):
    """Dedent, drop doctest/code lines and reST/markdown noise, keep the prose."""
    lines = []
    for line in inspect_cleandoc(text).splitlines():
        stripped = line.strip()
        is_code = stripped.startswith((">>>", "... ", "$ ", ".. "))
        is_rule = bool(stripped) and set(stripped) <= set("=-~^*#+_`:")  # reST/markdown underlines
        if not (is_code or is_rule):
            lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def inspect_cleandoc(text):
    import inspect
    return inspect.cleandoc(text)


def extract_python_file(path, min_string_chars=300):
    """Prose blocks of one .py file: docstrings, long string literals (docs attached at runtime, e.g. add_docstr),
    and long comment runs."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        return []
    blocks, comments, docstring_ids = [], [], set()
    # runs of 3+ comment lines are often explanations in plain English: reflow each run into one paragraph
    run = []
    for line in source.decode("utf-8", errors="replace").splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            run.append(stripped.lstrip("#").strip())
            continue
        if len(run) >= 3:
            comments.append(" ".join(w for w in run if w))
        run = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                blocks.append(doc)
                docstring_ids.add(id(node.body[0].value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= min_string_chars \
                and id(node) not in docstring_ids:
            # long literals elsewhere are mostly documentation attached at runtime (add_docstr, add_newdoc,
            # pydoc topic tables, shared argument docs); the prose filter drops the code/data ones
            blocks.append(node.value)
    return [b for b in (clean_block(b) for b in blocks + comments) if is_prose(b)]


def extract_c_header(path, max_bytes=2_000_000):
    """Prose comments of a C/C++ header shipped in a package (/* ... */ blocks and runs of 3+ // lines)."""
    try:
        if os.path.getsize(path) > max_bytes:
            return []
        with open(path, "rb") as f:
            source = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    blocks = []
    for match in re.finditer(r"/\*(.*?)\*/", source, re.S):
        lines = [line.strip().lstrip("*").strip() for line in match.group(1).splitlines()]
        blocks.append(" ".join(line for line in lines if line))
    run = []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("//"):
            run.append(stripped.lstrip("/!").strip())
            continue
        if len(run) >= 3:
            blocks.append(" ".join(w for w in run if w))
        run = []
    blocks = [re.sub(r"[\\@](brief|param|return|returns|note)\b\s*", "", b) for b in blocks]
    return [b for b in blocks if len(b) >= 100 and is_prose(b)]


def extract_doc_file(path, max_bytes=2_000_000):
    """Prose of a bundled documentation file (.rst/.md/.txt, or the long description in a METADATA file)."""
    try:
        if os.path.getsize(path) > max_bytes:
            return []
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    if os.path.basename(path) == "METADATA":
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""  # skip the email-style headers
    paragraphs = [clean_block(p) for p in re.split(r"\n\s*\n", text)]
    return ["\n\n".join(p for p in paragraphs if is_prose(p))]


def extract_file(path):
    if path.endswith(".py"):
        blocks = extract_python_file(path)
    elif path.endswith((".h", ".hpp", ".cuh")):
        blocks = extract_c_header(path)
    else:
        blocks = extract_doc_file(path)
    return "\n\n".join(b for b in blocks if b)


def offline_corpus_roots():
    """The installed Python standard library first, then every site-packages directory, deduplicated."""
    roots = [sysconfig.get_paths()["stdlib"]]
    roots += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    roots += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    seen, unique = set(), []
    for r in roots:
        real = os.path.realpath(r)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            unique.append(real)
    return unique


def offline_corpus_files(roots):
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            # site-packages below the stdlib dir is a root of its own; skip tests and vendored copies
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            for f in sorted(files):
                if f.endswith((".py", ".rst", ".md", ".h", ".hpp", ".cuh")) or f == "METADATA" or \
                        (f.endswith(".txt") and not f.lower().startswith(("license", "copying", "requirements", "entry_points", "top_level"))):
                    yield os.path.join(dirpath, f)


def build_offline_corpus(max_chars=50_000_000, max_doc_chars=10_000, roots=None, num_workers=None, force=False):
    """Build the offline default corpus into get_data_dir('offline'). Deterministic for a given installation."""
    roots = roots or offline_corpus_roots()
    out_dir = get_data_dir("offline")
    settings = dict(max_chars=max_chars, max_doc_chars=max_doc_chars, roots=roots)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not force and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if json.load(f).get("settings") == settings:
                print(f"Offline corpus already built in {out_dir} (use --force to rebuild)", flush=True)
                return
    print(f"Building the offline corpus (up to {max_chars / 1e6:.0f}M chars) from the docstrings and docs of: "
          f"{', '.join(roots)}", flush=True)
    t0 = time.time()
    files = list(offline_corpus_files(roots))
    num_workers = num_workers or min(4, os.cpu_count() or 1)
    docs, seen_blocks, total, num_files = [], set(), 0, 0
    pool = concurrent.futures.ProcessPoolExecutor(num_workers) if num_workers > 1 else None
    # map keeps file order, so the corpus does not depend on the number of workers
    texts = pool.map(extract_file, files, chunksize=32) if pool else map(extract_file, files)
    try:
        for text in texts:
            num_files += 1
            if num_files % 2000 == 0:
                print(f"  {num_files:,}/{len(files):,} files, {total / 1e6:.1f}M chars ({time.time() - t0:.0f}s)", flush=True)
            # exact dedup at paragraph level: inherited/copied docstrings and licenses repeat a lot
            kept = []
            for para in text.split("\n\n"):
                key = hashlib.sha1(" ".join(para.split()).encode()).digest()
                if para.strip() and key not in seen_blocks:
                    seen_blocks.add(key)
                    kept.append(para)
            doc = "\n\n".join(kept)
            if len(doc) >= 200:
                for piece in split_long_document(doc, max_doc_chars):
                    docs.append(piece)
                    total += len(piece)
            if total >= max_chars:
                break  # enough text: the queued files are dropped below
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    print(f"Extracted {total / 1e6:.1f}M chars from {num_files:,} files in {time.time() - t0:.0f}s", flush=True)
    manifest = write_shards(docs, out_dir, "offline", "installed Python docs", shard_chars=max(1, max_chars // 5))
    manifest["settings"] = settings
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)
