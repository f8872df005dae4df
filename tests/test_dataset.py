"""
Pretraining shards: the downloader against a flaky local HTTP server (500s, truncated bodies, garbage),
offline failure, pinned val shard, --from-dir (nanochat/local_data.py), the offline demo corpus
(scripts/offline_corpus.py), and bad input.
No network.
"""

import io
import os
import re
import sys
import json
import errno
import random
import threading
import subprocess
import http.server

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import dataset, local_data
from nanochat.dataset import DataError
from scripts import offline_corpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parquet_bytes(texts, row_group_size=2):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict({"text": texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


class FlakyServer:
    """Serves /datasets/<repo>/resolve/main/shard_XXXXX.parquet; per file: first a 500, then a truncated body, then OK."""

    def __init__(self, failures=("500", "truncate"), always_fail=(), garbage=()):
        self.requests = {}
        self.failures, self.always_fail, self.garbage = list(failures), set(always_fail), set(garbage)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                n = server.requests.get(name, 0)
                server.requests[name] = n + 1
                body = parquet_bytes([f"{name} document {i}" for i in range(4)])
                mode = "500" if name in server.always_fail else server.failures[n] if n < len(server.failures) else "ok"
                if name in server.garbage:
                    body, mode = b"<html>not a parquet file</html>", "ok"
                if mode == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[:len(body) // 2])  # truncated: close early
                self.wfile.flush()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # a short poll interval: shutdown() waits for the serving loop to look at its flag (0.5 s by default)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused, like being offline
    return f"http://127.0.0.1:{port}"


def run_module(module, *args, env=None, timeout=120):
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_download_retries_and_never_partial(base_dir, monkeypatch):
    import nanochat.common
    sleeps = []
    monkeypatch.setattr(nanochat.common.time, "sleep", sleeps.append)  # keep the backoff, skip the waiting
    with FlakyServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        ok, requested = dataset.download_shards(2, "fineweb-edu", num_workers=2, retries=4)
    assert (ok, requested) == (3, 3)
    data_dir = base_dir / "base_data"
    assert sorted(os.listdir(data_dir)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    for name in os.listdir(data_dir):
        assert server.requests[name] == 3, "each shard needed a retry after a 500 and after a truncated body"
        assert pq.read_table(data_dir / name).column("text").to_pylist()[0] == f"{name} document 0"
    assert len(sleeps) == 6 and max(sleeps) > min(sleeps), "exponential backoff between attempts"
    # pinned val shard, train = the rest
    assert [os.path.basename(p) for p in dataset.get_split_files("val", name="fineweb-edu")] == ["shard_01822.parquet"]
    monkeypatch.setenv("NANOCHAT_DATASET", "fineweb-edu")
    assert len(dataset.get_split_files("train")) == 2
    assert list(dataset.parquets_iter_batched("val")) == [["shard_01822.parquet document 0", "shard_01822.parquet document 1"],
                                                          ["shard_01822.parquet document 2", "shard_01822.parquet document 3"]]
    # resumable: a second run downloads nothing
    with FlakyServer() as server2:
        monkeypatch.setenv("HF_ENDPOINT", server2.endpoint)
        assert dataset.download_shards(2, "fineweb-edu", num_workers=2) == (3, 3)
    assert server2.requests == {}


def test_download_failures_leave_no_files(base_dir, monkeypatch):
    import nanochat.common
    monkeypatch.setattr(nanochat.common.time, "sleep", lambda seconds: None)  # keep the retries, skip the waiting
    with FlakyServer(failures=(), always_fail={"shard_00001.parquet"}, garbage={"shard_00002.parquet"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        ok, requested = dataset.download_shards(3, "climbmix", num_workers=3, retries=2)
    assert (ok, requested) == (2, 4)
    names = sorted(os.listdir(base_dir / "base_data_climbmix"))
    assert names == ["shard_00000.parquet", "shard_06542.parquet"], names  # no partial, temp or garbage files


def test_offline_fails_fast(base_dir, monkeypatch):
    # fast = few attempts and short waits, counted (not timed: this machine's load makes wall clocks useless)
    import nanochat.common
    sleeps, attempts = [], []
    monkeypatch.setattr(nanochat.common.time, "sleep", sleeps.append)
    real_urlopen = nanochat.common.urllib.request.urlopen
    monkeypatch.setattr(nanochat.common.urllib.request, "urlopen", lambda *a, **k: attempts.append(1) or real_urlopen(*a, **k))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(DataError) as exc:
        dataset.main(["-n", "2"])
    assert len(attempts) <= 2 and sum(sleeps) <= 2, "an unreachable host is given up after two quick tries"
    message = str(exc.value)
    assert message.startswith("could not download") and "--from-dir" in message and "\n" not in message
    assert not [n for n in os.listdir(base_dir / "base_data_climbmix") if n.endswith(".parquet")]


def test_cli_offline_exit_code(base_dir):
    env = {"NANOCHAT_BASE_DIR": str(base_dir), "HF_ENDPOINT": closed_port_url()}
    result = run_module("nanochat.dataset", "-n", "2", env=env, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: could not download") and "--from-dir" in last
    assert "Traceback" not in result.stderr


def test_failed_shard_exit(base_dir, monkeypatch):
    import nanochat.common
    monkeypatch.setattr(nanochat.common.time, "sleep", lambda seconds: None)  # keep the retries, skip the waiting
    with FlakyServer(failures=(), always_fail={"shard_00000.parquet"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        with pytest.raises(DataError, match="1 shards failed to download; run the same command again"):
            dataset.main(["-n", "2", "--dataset", "fineweb-edu", "--retries", "2"])
    assert sorted(os.listdir(base_dir / "base_data")) == ["shard_00001.parquet", "shard_01822.parquet"]


def test_unknown_dataset_and_empty_dir(base_dir, monkeypatch):
    result = run_module("nanochat.dataset", "--dataset", "nope", env={"NANOCHAT_BASE_DIR": str(base_dir)})
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: unknown dataset 'nope' (from --dataset or NANOCHAT_DATASET); choose one of: "
        "climbmix, fineweb-edu, offline, local")
    monkeypatch.setenv("NANOCHAT_DATASET", "nope")
    with pytest.raises(DataError, match="unknown dataset"):
        dataset.get_data_dir()
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmix")
    with pytest.raises(DataError, match="no parquet shards in .*nanochat.dataset -n 8"):
        dataset.get_split_files("train")
    monkeypatch.setenv("NANOCHAT_DATASET", "offline")
    with pytest.raises(DataError, match="python -m scripts.offline_corpus"):
        dataset.get_split_files("val")


def test_corrupt_parquet_is_one_clear_line(base_dir, monkeypatch):
    data_dir = base_dir / "base_data_climbmix"
    data_dir.mkdir()
    (data_dir / "shard_00000.parquet").write_bytes(b"PAR1 this is not really parquet")
    (data_dir / "shard_06542.parquet").write_bytes(parquet_bytes(["val doc"]))
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmix")
    with pytest.raises(DataError, match="cannot read parquet file .*shard_00000.parquet"):
        list(dataset.parquets_iter_batched("train"))
    assert list(dataset.parquets_iter_batched("val")) == [["val doc"]]


def test_from_dir(base_dir, tmp_path, capsys):
    src = tmp_path / "mytext"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Alpha paragraph one.\n\nAlpha paragraph two.")
    (src / "b.md").write_text("# Beta\n\nSome markdown text.")
    (src / "sub" / "c.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}"}) for i in range(30)) + "\n\n")
    (src / "sub" / "d.parquet").write_bytes(parquet_bytes([f"parquet doc {i}" for i in range(30)] + ["json doc 3"]))
    (src / "long.txt").write_text("\n\n".join(f"Paragraph {i} " + "word " * 50 for i in range(100)))
    (src / "ignored.csv").write_text("not,text")
    dataset.main(["--from-dir", str(src), "--max-doc-chars", "2000"])
    assert "export NANOCHAT_DATASET=local" in capsys.readouterr().out
    data_dir = base_dir / "base_data_local"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    docs = []
    for name in manifest["train"] + [manifest["val"]]:
        docs += pq.read_table(data_dir / name).column("text").to_pylist()
    assert len(docs) == len(set(docs)) == manifest["num_documents"]  # "json doc 3" appears once
    assert "Alpha paragraph one.\n\nAlpha paragraph two." in docs and "# Beta\n\nSome markdown text." in docs
    assert {f"json doc {i}" for i in range(30)} | {f"parquet doc {i}" for i in range(30)} <= set(docs)
    long_pieces = [d for d in docs if d.startswith("Paragraph")]
    assert all(len(d) <= 2000 for d in docs) and len(long_pieces) >= 10
    assert "".join(sorted(long_pieces)).count("Paragraph") == 100, "splitting loses no paragraph"


def test_from_dir_bad_input(base_dir, tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        dataset.main(["--from-dir", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt, .md, .jsonl or .parquet files"):
        dataset.main(["--from-dir", str(empty)])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match="x.jsonl:2: not valid JSON .*; fix or remove that line"):
        dataset.main(["--from-dir", str(bad)])
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="x.jsonl:2 has no string 'text' field"):
        dataset.main(["--from-dir", str(bad)])
    assert not (base_dir / "base_data_local").exists(), "nothing written half-way"


def test_from_dir_skips_binary_files_with_a_count(base_dir, tmp_path, capsys):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "real.txt").write_text("A real document about rivers and stones.")
    (src / "other.md").write_text("Another real document, about clouds.")
    (src / "random.txt").write_bytes(bytes(range(256)) * 40)  # not UTF-8
    (src / "nul.txt").write_bytes(b"ELF\x00\x00\x01 binary with NUL bytes but valid UTF-8")
    manifest = local_data.build_from_dir(str(src))
    assert manifest["num_documents"] == 2
    assert "Skipped 2 files that are not UTF-8 text" in capsys.readouterr().out


def test_from_dir_skips_what_is_not_a_regular_file_and_caps_file_size(base_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "odd"
    src.mkdir()
    (src / "real.txt").write_text("A real document about rivers and stones.")
    (src / "other.md").write_text("Another real document, about clouds.")
    (src / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    os.mkfifo(src / "pipe.txt")  # opening it would wait for a writer forever
    (src / "zeros.txt").symlink_to("/dev/zero")  # reading it never ends
    (src / "link.md").symlink_to(src / "other.md")  # a link to a regular file is read
    (src / "huge.txt").write_text("x" * 2000)
    (src / "huge.parquet").write_bytes(parquet_bytes(["y" * 2000]))
    monkeypatch.setattr(local_data, "MAX_FILE_BYTES", 1000)
    manifest = local_data.build_from_dir(str(src))
    assert manifest["num_documents"] == 2  # real.txt, other.md (link.md is the same text)
    out = capsys.readouterr().out
    assert "Skipped 3 files that are not regular files (broken links, pipes, devices): dangling.txt, pipe.txt, zeros.txt" in out
    assert re.search(r"Skipped 2 files larger than .*: huge.parquet, huge.txt\n", out), out


def test_from_dir_reads_at_most_the_cap_of_a_growing_file(tmp_path, monkeypatch):
    path = tmp_path / "growing.txt"
    path.write_text("x" * 100)
    monkeypatch.setattr(local_data, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(local_data.os.path, "getsize", lambda p: 10)  # it was small when its size was checked
    path.write_text("x" * 5000)
    with pytest.raises(local_data.SkippedFile, match="larger than"):
        local_data.read_user_file(str(path))


def test_full_disk_during_from_dir_is_one_line_and_leaves_nothing(base_dir, tmp_path, monkeypatch):
    src = tmp_path / "text"
    src.mkdir()
    for i in range(40):
        (src / f"{i}.txt").write_text(f"Document number {i} about the weather. " * 5)
    local_data.build_from_dir(str(src), shard_chars=1000)  # the previous build, which must survive
    data_dir = base_dir / "base_data_local"
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    write_table, written = pq.write_table, []

    def write_until_full(table, where, **kwargs):  # the second shard finds the disk full, as pyarrow reports it
        if written:
            open(where, "wb").write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        written.append(where)
        write_table(table, where, **kwargs)
    monkeypatch.setattr(local_data.pq, "write_table", write_until_full)
    (src / "new.txt").write_text("A new document.")
    with pytest.raises(DataError) as excinfo:
        local_data.build_from_dir(str(src), shard_chars=1000)
    message = str(excinfo.value)
    assert message.startswith("could not write the shards under") and "\n" not in message and "No space left on device" in message, message
    assert sorted(os.listdir(base_dir)) == ["base_data_local"]  # no base_data_local.tmp-<pid> left behind
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before


def split_reference(text, max_chars):
    """split_long_document as it was first written (it re-sliced the rest of a long paragraph for every piece)."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            pieces += [current, para[:cut]]
            current, para = "", para[cut:].lstrip("\n")
        if len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def test_split_long_document_matches_the_reference():
    rng = random.Random(0)
    parts = ["a", "bc", "word ", " ", "\n", "\n\n", "\n \n", "\n\n\n\n", "x" * 30, "\t"]
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randrange(0, 120)))
        max_chars = rng.randrange(1, 40)
        assert local_data.split_long_document(text, max_chars) == split_reference(text, max_chars), (text, max_chars)


class CountingStr(str):
    """A str that counts the characters that slicing and stripping it copy (the pieces count too)."""
    copied = 0

    def __getitem__(self, key):
        return CountingStr.count(str.__getitem__(self, key))

    def lstrip(self, chars=None):
        return CountingStr.count(str.lstrip(self, chars))

    @staticmethod
    def count(piece):
        CountingStr.copied += len(piece)
        return CountingStr(piece)


def test_split_long_document_copies_each_character_a_bounded_number_of_times(monkeypatch):
    """A single 200k-char line cut into 2000 pieces: linear work copies ~200k chars; re-slicing the rest of the
    line for every piece (the old way) copied ~200M."""
    split = re.split
    monkeypatch.setattr(local_data, "re", type("re", (), {"split": staticmethod(
        lambda pattern, text: [CountingStr(p) for p in split(pattern, text)])}))
    text = "0123456789" * 20_000
    CountingStr.copied = 0
    pieces = local_data.split_long_document(text, 100)
    assert "".join(pieces) == text and len(pieces) == 2000
    assert CountingStr.copied <= 3 * len(text), CountingStr.copied


def test_null_texts_in_a_shard_are_skipped(base_dir, monkeypatch, tmp_path):
    data_dir = base_dir / "base_data_climbmix"
    data_dir.mkdir()
    pq.write_table(pa.Table.from_pydict({"text": ["first", None, "third", None]}), data_dir / "shard_00000.parquet",
                   row_group_size=2)
    pq.write_table(pa.Table.from_pydict({"text": [None, "val doc"]}), data_dir / "shard_06542.parquet")
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmix")
    assert list(dataset.parquets_iter_batched("train")) == [["first"], ["third"]]
    assert list(dataset.parquets_iter_batched("val")) == [["val doc"]]
    src = tmp_path / "user"
    src.mkdir()
    pq.write_table(pa.Table.from_pydict({"text": ["user doc one", None, "user doc two"]}), src / "u.parquet")
    assert local_data.build_from_dir(str(src))["num_documents"] == 2
    pq.write_table(pa.Table.from_pydict({"text": [1, 2]}), data_dir / "shard_00000.parquet")
    with pytest.raises(DataError, match="'text' column of parquet file .* holds int64, not strings"):
        list(dataset.parquets_iter_batched("train"))


def test_offline_corpus_from_fake_install(base_dir, tmp_path):
    root = tmp_path / "site"
    pkg = root / "pkg"
    (pkg / "tests").mkdir(parents=True)
    for i in range(30):
        (pkg / f"mod{i}.py").write_text(
            f'"""Module {i} explains how the widget factory builds widgets from plans and why it matters.\n\n'
            f'Plan {i} is special: it needs {i} extra workers, {i + 1} spare parts and a long afternoon of testing."""\n'
            f"def f{i}(x):\n"
            f'    """Return the number of widgets that the factory can build from the plan {i} given.\n\n'
            f"    The result depends on the supply of parts and on the schedule of the workers.\n"
            f'    >>> f{i}(1)\n    1\n    """\n    return x\n'
            'def g():\n    """Shared docstring that appears in many modules and must be kept only once."""\n')
    (pkg / "tests" / "test_x.py").write_text('"""Tests are skipped because they are mostly code, not prose."""\n')
    (pkg / "README.md").write_text("# Widgets\n\nThis package builds widgets from plans, one part at a time.\n\n"
                                   "Each widget starts as a plan drawn by an engineer, then the workers collect the "
                                   "parts, assemble them on the line and test the result before it ships.\n")
    (pkg / "broken.py").write_text("def (:\n")
    (pkg / "include").mkdir()
    (pkg / "include" / "widget.h").write_text(
        "/* The widget header declares the structures that describe a plan, the parts it needs and the\n"
        " * order in which the workers assemble them; keep it in sync with the factory module.\n"
        " * Every field is documented where it is declared, so read the declarations before changing them. */\nint x;\n")
    (pkg / "commented.py").write_text(
        "# Comment runs are kept when they read like prose: this one explains why the factory waits\n"
        "# for every part to arrive before it starts, because a half-built widget blocks the line\n"
        "# and the workers would have nothing useful to do in the meantime.\nx = 1\n")
    offline_corpus.build_offline_corpus(max_chars=10**9, roots=[str(root)], num_workers=1)
    data_dir = base_dir / "base_data_offline"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    first = {n: (data_dir / n).read_bytes() for n in manifest["train"] + [manifest["val"]]}
    docs = [d for n in first for d in pq.read_table(data_dir / n).column("text").to_pylist()]
    text = "\n".join(docs)
    assert "widget factory builds widgets" in text and "one part at a time" in text
    assert "keep it in sync with the factory module" in text and "a half-built widget blocks the line" in text
    assert text.count("must be kept only once") == 1
    assert ">>>" not in text and "Tests are skipped" not in text
    # deterministic, and a second build with the same settings is a no-op; --force rebuilds identically
    offline_corpus.build_offline_corpus(max_chars=10**9, roots=[str(root)], num_workers=2, force=True)
    assert {n: (data_dir / n).read_bytes() for n in first} == first
    assert dataset.get_split_files("val", name="offline") == [str(data_dir / manifest["val"])]


def test_offline_corpus_real_install_sample(base_dir):
    """A small slice of the real offline corpus: real English prose from the installed stdlib."""
    offline_corpus.build_offline_corpus(max_chars=200_000, roots=[offline_corpus.offline_corpus_roots()[0]], num_workers=1)
    docs = [d for batch in _iter_all("offline") for d in batch]
    text = " ".join(docs)
    assert len(text) > 150_000 and text.count(" the ") > 500


def _iter_all(name):
    for split in ("train", "val"):
        for path in dataset.get_split_files(split, name=name):
            yield pq.read_table(path).column("text").to_pylist()
