"""
The offline demo corpus: real English every machine with our dependencies already has (docstrings, long comments
and bundled docs of the installed Python standard library and packages), written as the pretraining dataset
'offline' so the whole pipeline (runs/runcpu.sh) can run with no network. A demo tool, not part of the library.

    python -m scripts.offline_corpus          # then: export NANOCHAT_DATASET=offline
"""

import os
import re
import ast
import sys
import json
import time
import hashlib
import inspect
import argparse
import sysconfig
import concurrent.futures

from nanochat.cli import run
from nanochat.common import int_in
from nanochat.dataset import get_data_dir, MANIFEST
from nanochat.local_data import split_long_document, write_shards

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
    for line in inspect.cleandoc(text).splitlines():
        stripped = line.strip()
        is_code = stripped.startswith((">>>", "... ", "$ ", ".. "))
        is_rule = bool(stripped) and set(stripped) <= set("=-~^*#+_`:")  # reST/markdown underlines
        if not (is_code or is_rule):
            lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def extract_python_file(path, min_string_chars=300):
    """Prose blocks of one .py file: docstrings, long string literals (docs attached at runtime, e.g. add_docstr),
    and long comment runs."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        return []
    blocks, docstring_ids = [], set()
    comments = comment_runs(source.decode("utf-8", errors="replace"), r"(?!#!)#+")  # not a #! line
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


def comment_runs(source, marker):
    """Runs of 3+ comment lines (lines that start with the regex marker), each reflowed into one paragraph: such
    runs are often explanations in plain English."""
    runs, run = [], []
    for line in source.splitlines() + [""]:
        match = re.match(marker, line.strip())
        if match:
            run.append(line.strip()[match.end():].strip())
            continue
        if len(run) >= 3:
            runs.append(" ".join(w for w in run if w))
        run = []
    return runs


def read_small_text(path, max_bytes=2_000_000):
    """The file as text (undecodable bytes replaced), or "" when it is unreadable or larger than max_bytes."""
    try:
        if os.path.getsize(path) > max_bytes:
            return ""
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def extract_c_header(path):
    """Prose comments of a C/C++ header shipped in a package (/* ... */ blocks and runs of 3+ // lines)."""
    source = read_small_text(path)
    blocks = []
    for match in re.finditer(r"/\*(.*?)\*/", source, re.S):
        lines = [line.strip().lstrip("*").strip() for line in match.group(1).splitlines()]
        blocks.append(" ".join(line for line in lines if line))
    blocks += comment_runs(source, r"//[/!]*")
    blocks = [re.sub(r"[\\@](brief|param|return|returns|note)\b\s*", "", b) for b in blocks]
    return [b for b in blocks if len(b) >= 100 and is_prose(b)]


def extract_doc_file(path):
    """Prose of a bundled documentation file (.rst/.md/.txt, or the long description in a METADATA file)."""
    text = read_small_text(path)
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
    return [real for real in dict.fromkeys(map(os.path.realpath, roots)) if os.path.isdir(real)]


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
    write_shards(docs, out_dir, "offline", "installed Python docs", shard_chars=max(1, max_chars // 5),
                 manifest_extra=dict(settings=settings))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the offline pretraining corpus (dataset 'offline') from installed Python docs")
    parser.add_argument("--max-chars", type=int_in("[1, inf)"), default=50_000_000, help="stop after this many characters")
    parser.add_argument("--max-doc-chars", type=int_in("[1, inf)"), default=10_000, help="split longer texts into documents of at most this size")
    parser.add_argument("-w", "--num-workers", type=int_in("[1, inf)"), default=4, help="extraction processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built with the same settings")
    args = parser.parse_args(argv)
    build_offline_corpus(max_chars=args.max_chars, max_doc_chars=args.max_doc_chars,
                         num_workers=min(args.num_workers, os.cpu_count() or 1), force=args.force)
    if os.environ.get("NANOCHAT_DATASET") != "offline":
        print("To train on these shards: export NANOCHAT_DATASET=offline")


if __name__ == "__main__":
    run(main)
