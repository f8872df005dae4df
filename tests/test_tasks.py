"""
The task machinery (tasks/, nanochat/hub.py): slicing, mixtures, the multiple-choice prompt, hub-parquet loading with
its cache and manifest (against a local HTTP server), every task's conversation format and grading on real rows from
../shared/data (skipped when absent) and on hand-made rows and malformed rows.
No network: every test runs in offline mode with a temporary base dir.
"""

import os
import json
import gzip
import time
import threading
import http.server
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import DownloadError
from nanochat.hub import HubDataset, load_hub_dataset, hub_cache_dir, is_hub_cached
from tasks.common import Task, TaskMixture, TaskDataError, render_mc, validate_messages

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated(base_dir, monkeypatch):
    """Temp base dir, offline, no local data unless a test sets it."""
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any slip fails fast
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    return base_dir


@pytest.fixture
def real_data(shared_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    return shared_data


@pytest.fixture
def local_dir(tmp_path, monkeypatch):
    """An empty NANOCHAT_LOCAL_DATA folder for hand-made files."""
    path = tmp_path / "local_data"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(path))
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# Task slicing, mixtures, sequences

class ToyTask(Task):
    def __init__(self, size=10, tag="toy", **kwargs):
        super().__init__(**kwargs)
        self.size, self.tag = size, tag

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"i": index, "tag": self.tag}


def test_task_full_view():
    task = ToyTask(10)
    assert len(task) == 10
    assert task[0] == {"i": 0, "tag": "toy"} and task[9]["i"] == 9
    assert [ex["i"] for ex in task] == list(range(10))


def test_task_slicing():
    task = ToyTask(10, start=5, stop=10)
    assert len(task) == 5 and task[0]["i"] == 5
    task = ToyTask(10, step=3)
    assert len(task) == 4 and [task[i]["i"] for i in range(4)] == [0, 3, 6, 9]
    task = ToyTask(10, start=2, stop=9, step=2)
    assert [ex["i"] for ex in task] == [2, 4, 6, 8]


def test_task_stop_beyond_data_is_clamped():
    assert len(ToyTask(10, stop=5200)) == 10
    assert len(ToyTask(10, start=20)) == 0


def test_task_bad_slices_and_index():
    with pytest.raises(AssertionError):
        ToyTask(10, start=-1)
    with pytest.raises(AssertionError):
        ToyTask(10, start=5, stop=2)
    with pytest.raises(AssertionError):
        ToyTask(10, step=0)
    with pytest.raises(AssertionError):
        ToyTask(10)[1.0]


def test_mixture_is_deterministic_complete_and_interleaved():
    a, b = ToyTask(3, "a"), ToyTask(5, "b")
    mix = TaskMixture([a, b])
    assert len(mix) == 8
    order = [(ex["tag"], ex["i"]) for ex in mix]
    assert sorted(order) == [("a", i) for i in range(3)] + [("b", i) for i in range(5)]
    again = [(ex["tag"], ex["i"]) for ex in TaskMixture([ToyTask(3, "a"), ToyTask(5, "b")])]
    assert order == again
    assert [t for t, _ in order] != ["a"] * 3 + ["b"] * 5  # not plain concatenation
    with pytest.raises(AssertionError):
        mix.get_example(8)


def test_mixture_goes_through_subtask_slicing_and_oversampling():
    sliced = ToyTask(10, "s", start=4, step=2)  # physical 4, 6, 8
    mix = TaskMixture([sliced, sliced])
    assert len(mix) == 6
    assert sorted(ex["i"] for ex in mix) == [4, 4, 6, 6, 8, 8]
    big = TaskMixture([ToyTask(1000, "a"), ToyTask(1000, "b")])
    first_half = [ex["tag"] for ex in big][:1000]
    assert 400 < first_half.count("a") < 600  # tasks spread through the whole mixture


def test_render_mc_exact_format():
    text = render_mc("What is 2+2?", ("A", "B"), ["3", "4"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\n"
                    "Respond only with the letter of the correct answer.")
    assert "=A\n" in text and "=B\n" in text and "= A" not in text


# -----------------------------------------------------------------------------
# HubDataset and hub loading

def test_hub_dataset_rows_and_shuffle():
    table = pa.table({"x": list(range(20)), "s": [{"text": [str(i)], "label": ["A"]} for i in range(20)]})
    ds = HubDataset(table)
    assert len(ds) == 20
    assert ds[3] == {"x": 3, "s": {"text": ["3"], "label": ["A"]}}
    shuffled = ds.shuffle(42)
    expected = np.random.default_rng(42).permutation(20)
    assert [shuffled[i]["x"] for i in range(20)] == expected.tolist()
    assert [ds[i]["x"] for i in range(20)] == list(range(20))  # the original view is untouched
    with pytest.raises(IndexError):
        ds[20]


class FakeHub:
    """A tiny HF-hub stand-in on 127.0.0.1: the parquet shard list API plus the shard files."""

    def __init__(self, shards, dataset="org/toy/parquet/default/train"):
        self.shards = shards  # name -> parquet bytes
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                port = self.server.server_address[1]
                if self.path == f"/api/datasets/{dataset}":
                    body = json.dumps([f"http://127.0.0.1:{port}/files/{n}" for n in hub.shards]).encode()
                elif self.path.startswith("/files/") and self.path[7:] in hub.shards:
                    body = hub.shards[self.path[7:]]
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # a short poll interval: shutdown() waits for the serving loop to look at its flag (0.5 s by default)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def parquet_bytes(rows, tmp_path, name):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


def test_hub_download_cache_and_manifest(tmp_path, monkeypatch):
    shards = {"a.parquet": parquet_bytes([{"q": "one"}, {"q": "two"}], tmp_path, "a.parquet"),
              "b.parquet": parquet_bytes([{"q": "three"}], tmp_path, "b.parquet")}
    hub = FakeHub(shards)
    try:
        monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ds = load_hub_dataset("org/toy", "default", "train")
        assert [ds[i]["q"] for i in range(len(ds))] == ["one", "two", "three"]
        cache = Path(hub_cache_dir("org/toy", "default", "train"))
        assert cache == Path(os.environ["NANOCHAT_BASE_DIR"]) / "task_data" / "org--toy" / "default" / "train"
        assert json.loads((cache / "shard_urls.json").read_text()) == [f"{hub.url}/files/a.parquet",
                                                                       f"{hub.url}/files/b.parquet"]
        assert sorted(p.name for p in cache.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
        assert is_hub_cached("org/toy", "default", "train")
        n_requests = len(hub.requests)
    finally:
        hub.close()
    # the server is gone and we are offline: the cache alone serves the data
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    ds = load_hub_dataset("org/toy", "default", "train")
    assert len(ds) == 3 and n_requests == 3


def test_hub_interrupted_download_fetches_only_what_is_missing(tmp_path, monkeypatch):
    shards = {"a.parquet": parquet_bytes([{"q": "one"}], tmp_path, "a.parquet"),
              "b.parquet": parquet_bytes([{"q": "two"}], tmp_path, "b.parquet")}
    hub = FakeHub(shards)
    cache = Path(hub_cache_dir("org/toy", "default", "train"))
    cache.mkdir(parents=True)
    # an earlier run got the shard list and the first shard, then stopped
    (cache / "shard_urls.json").write_text(json.dumps([f"{hub.url}/files/a.parquet", f"{hub.url}/files/b.parquet"]))
    (cache / "00000.parquet").write_bytes(shards["a.parquet"])
    assert not is_hub_cached("org/toy", "default", "train")
    try:
        monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ds = load_hub_dataset("org/toy", "default", "train")
    finally:
        hub.close()
    assert [ds[i]["q"] for i in range(2)] == ["one", "two"] and hub.requests == ["/files/b.parquet"]
    assert is_hub_cached("org/toy", "default", "train")


def test_hub_bad_shard_list_is_fetched_again(tmp_path, monkeypatch):
    cache = Path(hub_cache_dir("org/toy", "default", "train"))
    cache.mkdir(parents=True)
    (cache / "shard_urls.json").write_text('{"error": "rate limited"}')  # what a failing hub may answer
    with pytest.raises(DownloadError, match="shard list"):
        load_hub_dataset("org/toy", "default", "train")
    hub = FakeHub({"a.parquet": parquet_bytes([{"q": "fresh"}], tmp_path, "a.parquet")})
    try:
        monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert load_hub_dataset("org/toy", "default", "train")[0] == {"q": "fresh"}
    finally:
        hub.close()


def test_task_loads_from_the_hub_then_from_its_cache(tmp_path, monkeypatch):
    rows = [{"question": f"q{i}", "answer": f"x <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(7)]
    hub = FakeHub({"s.parquet": parquet_bytes(rows, tmp_path, "s.parquet")}, "openai/gsm8k/parquet/main/test")
    from tasks.gsm8k import GSM8K
    try:
        monkeypatch.setenv("NANOCHAT_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        order = [GSM8K("main", "test")[i]["messages"][0]["content"] for i in range(7)]
    finally:
        hub.close()
    assert order == [f"q{i}" for i in np.random.default_rng(42).permutation(7)]  # the hub's seed-42 shuffle
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    task = GSM8K("main", "test", start=1, step=2)
    assert len(task) == 3 and task[0]["messages"][0]["content"] == order[1]


def test_offline_without_cache_fails_fast_with_advice(monkeypatch):
    start = time.time()
    with pytest.raises(DownloadError, match="offline"):
        load_hub_dataset("org/missing", "default", "train")
    from tasks.gsm8k import GSM8K
    with pytest.raises(TaskDataError) as info:
        GSM8K("main", "train")
    message = str(info.value)
    assert "NANOCHAT_LOCAL_DATA" in message and "gsm8k/train.jsonl" in message
    assert time.time() - start < 5


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setenv("NANOCHAT_OFFLINE", "0")  # HF_ENDPOINT points at a closed local port
    start = time.time()
    from tasks.smoltalk import SmolTalk
    with pytest.raises(TaskDataError, match="NANOCHAT_LOCAL_DATA"):
        SmolTalk("train")
    assert time.time() - start < 30
    assert not is_hub_cached("HuggingFaceTB/smol-smoltalk", "default", "train")


def test_local_data_dir_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(tmp_path / "nope"))
    from tasks.gsm8k import GSM8K
    with pytest.raises(TaskDataError, match="not a directory"):
        GSM8K("main", "test")


# -----------------------------------------------------------------------------
# validate_messages

@pytest.mark.parametrize("messages, match", [
    ("not a list", "JSON list"),
    ([{"role": "user", "content": "hi"}], "at least"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "string"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "'role' and 'content'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "expected 'user'"),
])
def test_validate_messages_rejects(messages, match):
    with pytest.raises(TaskDataError, match=match) as info:
        validate_messages(messages, "where.jsonl:7")
    assert "where.jsonl:7" in str(info.value)


def test_validate_messages_accepts_system_when_allowed():
    validate_messages([{"role": "system", "content": ""}, {"role": "user", "content": "a"},
                       {"role": "assistant", "content": "b"}], "x", allow_system=True)


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_parts_and_grading_hand_made(local_dir):
    answer = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nSo 0.2 x 50 = $<<0.2*50=10>>10.\n#### 1,000"
    write_jsonl(local_dir / "gsm8k" / "test.jsonl", [{"question": "How much?", "answer": answer}])
    from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer
    task = GSM8K("main", "test")
    assert task.eval_type == "generative" and len(task) == 1
    conv = task[0]
    assert conv["messages"][0] == {"role": "user", "content": "How much?"}
    parts = conv["messages"][1]["content"]
    assert parts[:4] == [{"type": "text", "text": "Weng earns 12/60 = $"}, {"type": "python", "text": "12/60"},
                         {"type": "python_output", "text": "0.2"}, {"type": "text", "text": "0.2 per minute.\nSo 0.2 x 50 = $"}]
    assert parts[-1]["type"] == "text" and parts[-1]["text"].endswith("#### 1,000")
    assert answer_to_parts("a <<5>> b")[1:3] == [{"type": "python", "text": "5"}, {"type": "python_output", "text": ""}]
    assert answer_to_parts("<<a=b=c>>")[1:3] == [{"type": "python", "text": "a=b"}, {"type": "python_output", "text": "c"}]
    assert extract_answer("so #### -1,234.5 done") == "-1234.5" and extract_answer("no answer") is None
    assert task.evaluate(conv, "The answer is\n#### 1000") == 1
    assert task.evaluate(conv, "#### 1,000") == 1
    assert task.evaluate(conv, "#### 1000.0") == 0  # exact string match, as the reference
    assert task.evaluate(conv, "1000") == 0
    assert task.reward(conv, "#### 1000") == 1.0 and task.reward(conv, "#### 7") == 0.0


def test_gsm8k_broken_line_is_reported(local_dir):
    path = local_dir / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2", "answer": \n')
    from tasks.gsm8k import GSM8K
    with pytest.raises(TaskDataError, match=r"train\.jsonl:3"):
        GSM8K("main", "train")


def test_gsm8k_real_rows(real_data):
    from tasks.gsm8k import GSM8K, answer_to_parts
    train, test = GSM8K("main", "train"), GSM8K("main", "test")
    assert len(train) == 7473 and len(test) == 1319
    raw = [json.loads(line) for line in (real_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    by_question = {r["question"]: r["answer"] for r in raw}
    for i in range(25):
        conv = test[i]
        user, assistant = conv["messages"]
        original = by_question[user["content"]]
        # the parts put back together give the original answer (annotations restored)
        rebuilt, parts = "", assistant["content"]
        for j, part in enumerate(parts):
            if part["type"] == "python":
                assert parts[j + 1]["type"] == "python_output"
                rebuilt += f"<<{part['text']}={parts[j + 1]['text']}>>"
            elif part["type"] == "text":
                rebuilt += part["text"]
        assert rebuilt == original
        ref = original.split("#### ")[-1].replace(",", "").strip()
        assert test.evaluate(conv, f"Let me think.\n#### {ref}") == 1
        assert test.evaluate(conv, f"#### {ref}9") == 0
    assert all("#### " in answer_to_parts(r["answer"])[-1]["text"] for r in raw)
    # same shuffle as the hub: index i is row permutation[i] of the file
    assert test[0]["messages"][0]["content"] == raw[int(np.random.default_rng(42).permutation(1319)[0])]["question"]


# -----------------------------------------------------------------------------
# MMLU

def test_mmlu_hand_made_both_csv_layouts(local_dir):
    (local_dir / "mmlu" / "dev").mkdir(parents=True)
    (local_dir / "mmlu" / "dev" / "astronomy_dev.csv").write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"Which, of these?",a,b,c,d,2\n')
    (local_dir / "mmlu" / "dev" / "virology_dev.csv").write_text('What is it?,w,x,y,z,B\n')
    from tasks.mmlu import MMLU
    task = MMLU("all", "dev")
    assert task.eval_type == "categorical" and len(task) == 2
    convs = {c["subject"]: c for c in task}
    astro = convs["astronomy"]
    assert astro["messages"][0]["content"] == render_mc("Which, of these?", ("A", "B", "C", "D"), ["a", "b", "c", "d"])
    assert astro["messages"][1]["content"] == "C" and astro["letters"] == ("A", "B", "C", "D")
    assert convs["virology"]["messages"][1]["content"] == "B"
    assert task.evaluate(astro, "C") and not task.evaluate(astro, "A")
    with pytest.raises(AssertionError):
        task.evaluate(astro, "E")


def test_mmlu_bad_row_is_reported(local_dir):
    (local_dir / "mmlu" / "test").mkdir(parents=True)
    (local_dir / "mmlu" / "test" / "law_test.csv").write_text("q,a,b,c,d,0\nq2,a,b,c,d,7\n")
    from tasks.mmlu import MMLU
    with pytest.raises(TaskDataError, match=r"law_test\.csv:2"):
        MMLU("all", "test")


def test_mmlu_real_rows(real_data):
    from tasks.mmlu import MMLU
    test = MMLU("all", "test")
    assert len(test) == 14042 and len(MMLU("all", "dev")) == 285
    assert len(MMLU("all", "test", stop=5200)) == 5200
    subjects = set()
    for i in range(50):
        conv = test[i]
        subjects.add(conv["subject"])
        answer = conv["messages"][1]["content"]
        assert answer in "ABCD" and conv["messages"][0]["content"].startswith("Multiple Choice question: ")
        assert conv["messages"][0]["content"].count("\n- ") == 4
        assert test.evaluate(conv, answer) and not test.evaluate(conv, next(l for l in "ABCD" if l != answer))
    assert len(subjects) > 10 and all("_test" not in s for s in subjects)
    with pytest.raises(TaskDataError, match="auxiliary_train"):
        MMLU("all", "auxiliary_train")  # not in the local copy, and offline


# -----------------------------------------------------------------------------
# ARC

def test_arc_hand_made_rows_with_numeric_labels(local_dir):
    rows = [{"id": "x1", "question": "Pick two", "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]},
             "answerKey": "2"}]
    write_jsonl(local_dir / "arc" / "ARC-Challenge" / "train.jsonl", rows)
    from tasks.arc import ARC
    task = ARC("ARC-Challenge", "train")
    conv = task[0]
    assert conv["letters"] == ["1", "2", "3"]
    assert conv["messages"][0]["content"] == render_mc("Pick two", ["1", "2", "3"], ["one", "two", "three"])
    assert task.evaluate(conv, "2") and not task.evaluate(conv, "1")
    with pytest.raises(AssertionError):
        task.evaluate(conv, "A")


def test_arc_real_rows_from_the_eval_bundle(real_data):
    from tasks.arc import ARC
    easy, challenge = ARC("ARC-Easy", "test"), ARC("ARC-Challenge", "test")
    assert len(easy) == 2376 and len(challenge) == 1172
    for task in (easy, challenge):
        for i in range(20):
            conv = task[i]
            assert not conv["messages"][0]["content"].startswith("Multiple Choice question: Question:")
            assert task.evaluate(conv, conv["messages"][1]["content"])
    with pytest.raises(TaskDataError):
        ARC("ARC-Easy", "train")  # the bundle only has the test sets


def test_arc_falls_back_to_nanochat_eval_bundle(monkeypatch):
    if not (SHARED_DATA / "eval_bundle").is_dir():
        pytest.skip("real data not found")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(SHARED_DATA / "eval_bundle"))
    from tasks.arc import ARC
    assert len(ARC("ARC-Easy", "test")) == 2376


# -----------------------------------------------------------------------------
# HumanEval

def test_humaneval_helpers():
    from tasks.humaneval import extract_imports, extract_program
    prompt = "\nimport math\n# comment\nfrom typing import List\n\ndef f(x):\n    import os\n"
    assert extract_imports(prompt) == "import math\nfrom typing import List"
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nthanks") == "def f():\n    return 1"
    assert extract_program("```\nx = 1\n```") == "x = 1"
    assert extract_program("  def f(): pass  ") == "def f(): pass"


@pytest.mark.usefixtures("sandbox_uid")  # runs programs in the sandbox (conftest.py)
def test_humaneval_hand_made(local_dir):
    row = {"task_id": "T/0", "prompt": "import math\n\ndef root(x):\n    \"\"\"sqrt\"\"\"\n",
           "canonical_solution": "    return math.sqrt(x)\n", "entry_point": "root",
           "test": "def check(candidate):\n    assert candidate(9) == 3\n"}
    path = local_dir / "humaneval" / "HumanEval.jsonl.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(row) + "\n")
    from tasks.humaneval import HumanEval
    task = HumanEval()
    conv = task[0]
    assert task.eval_type == "generative" and conv["entry_point"] == "root"
    assert conv["messages"][1]["content"] == row["prompt"] + "\n" + row["canonical_solution"]
    assert task.evaluate(conv, conv["messages"][1]["content"])
    assert task.evaluate(conv, "```python\ndef root(x):\n    return math.sqrt(x)\n```")  # imports added back
    assert not task.evaluate(conv, "def root(x):\n    return x")


@pytest.mark.usefixtures("sandbox_uid")  # runs programs in the sandbox (conftest.py)
def test_humaneval_real_rows(real_data):
    from tasks.humaneval import HumanEval
    task = HumanEval()
    assert len(task) == 164
    for i in range(3):
        conv = task[i]
        assert task.evaluate(conv, conv["messages"][1]["content"]), conv["entry_point"]
        assert not task.evaluate(conv, conv["messages"][0]["content"] + "    return None\n")


# -----------------------------------------------------------------------------
# SmolTalk

def test_smoltalk_local_rows_and_bad_row(local_dir):
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]}
    write_jsonl(local_dir / "smoltalk" / "train.jsonl", [good] * 5 + [bad])
    from tasks.smoltalk import SmolTalk
    task = SmolTalk("train")
    assert len(task) == 6
    results = []
    for i in range(6):
        try:
            results.append(task[i]["messages"] == good["messages"])
        except TaskDataError as e:
            assert "SmolTalk train row" in str(e) and "expected 'assistant'" in str(e)
            results.append("bad")
    assert results.count(True) == 5 and results.count("bad") == 1


# -----------------------------------------------------------------------------
# SpellingBee and SimpleSpelling

@pytest.fixture
def word_list(local_dir):
    path = local_dir / "english_words" / "words_alpha.txt"
    path.parent.mkdir()
    path.write_bytes(b"strawberry\r\nbanana\r\nmississippi\r\nzz\r\n")  # CRLF, like the real file
    return path


def test_spellingbee_format_and_grading(word_list):
    from tasks.spellingbee import SpellingBee, USER_MSG_TEMPLATES
    task = SpellingBee(size=40, split="train")
    assert task.eval_type == "generative" and len(task) == 40
    assert set(task.words) == {"strawberry", "banana", "mississippi", "zz"}
    assert task[3] == SpellingBee(size=40, split="train")[3]  # deterministic
    assert [task[i] for i in range(5)] != [SpellingBee(size=40, split="test")[i] for i in range(5)]
    for i in range(40):
        conv = task[i]
        user, assistant = conv["messages"]
        parts = assistant["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = eval(parts[2]["text"].replace(".count(", ",("))  # "'w'.count('l')" -> ('w', ('l'))
        count = word.count(letter)
        assert word in user["content"]
        assert parts[3]["text"] == str(count)
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert parts[0]["text"].endswith(f"This gives us {count}.")
        assert parts[0]["text"].count("hit! count=") == count
        assert parts[4]["text"].endswith(f"#### {count}")
        assert task.evaluate(conv, f"blah\n#### {count}") == 1 and task.reward(conv, f"#### {count}") == 1.0
        assert task.evaluate(conv, f"#### {count + 1}") == 0 and task.reward(conv, "no idea") == 0.0
    assert len(USER_MSG_TEMPLATES) >= 45
    assert all("{letter}" in t and "{word}" in t for t in USER_MSG_TEMPLATES)


def test_simple_spelling(word_list):
    from tasks.spellingbee import SimpleSpelling
    task = SimpleSpelling(size=10, split="test")
    for conv in task:
        user, assistant = conv["messages"]
        word = user["content"].removeprefix("Spell the word: ")
        assert word in ("strawberry", "banana", "mississippi", "zz")
        assert assistant["content"] == f"{word}:{','.join(word)}"


def test_spelling_falls_back_to_bundled_words_offline():
    from tasks.spellingbee import SpellingBee, load_words
    words, source = load_words()
    assert source.startswith("bundled") and "nanochat" in words and len(words) > 300
    assert all(w.isalpha() and w.islower() for w in words)
    conv = SpellingBee(size=5)[0]
    assert conv["messages"][1]["content"][-1]["text"].startswith("\n\nPython gives us")


def test_spelling_uses_word_list_in_base_dir(isolated):
    (isolated / "words_alpha.txt").write_text("alpha\nbeta\n")
    from tasks.spellingbee import load_words
    words, source = load_words()
    assert set(words) == {"alpha", "beta"} and source.endswith("words_alpha.txt")


def test_spellingbee_real_word_list(real_data):
    from tasks.spellingbee import SpellingBee
    task = SpellingBee(size=256, split="test")
    assert len(task.words) == 370099 and all("\r" not in w for w in task.words[:1000])
    convs = [task[i] for i in range(50)]
    assert len({c["messages"][0]["content"] for c in convs}) == 50


# -----------------------------------------------------------------------------
# CustomJSON

def test_customjson_good_file(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}) + "\n")
    from tasks.customjson import CustomJSON
    task = CustomJSON(path)
    assert len(task) == 2
    assert task[0] == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert len(task[1]["messages"]) == 4


@pytest.mark.parametrize("bad_line, match", [
    ('[{"role": "user", "content": "x"}, {"role": "assistant"', "not valid JSON"),
    ('[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]', "expected 'user'"),
    ('[{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]', "empty"),
    ('[{"role": "user", "content": "x"}]', "at least"),
    ('{"role": "user", "content": "x"}', "JSON list"),
    ('[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]',
     "expected 'user'"),
])
def test_customjson_bad_line_is_reported_with_file_and_line(tmp_path, bad_line, match):
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    path = tmp_path / "convs.jsonl"
    path.write_text("\n".join([good, good, bad_line, good]) + "\n")
    from tasks.customjson import CustomJSON
    with pytest.raises(TaskDataError, match=match) as info:
        CustomJSON(path)
    assert f"{path}:3" in str(info.value)


def test_customjson_missing_file_says_what_to_do(tmp_path):
    from tasks.customjson import CustomJSON
    with pytest.raises(TaskDataError, match="does not exist") as info:
        CustomJSON(tmp_path / "nope.jsonl")
    assert "curl" in str(info.value) and "identity_conversations_path" in str(info.value)


def test_bundled_identity_conversations_are_valid():
    from tasks.common import BUNDLED_DATA_DIR
    from tasks.customjson import CustomJSON, identity_conversations_path
    path, source = identity_conversations_path()
    assert source == "bundled" and path == str(BUNDLED_DATA_DIR / "identity_conversations.jsonl")
    task = CustomJSON(path)
    assert 30 <= len(task) <= 60
    mentions = [any("nanochat" in m["content"] for m in conv["messages"]) for conv in task]
    assert sum(mentions) >= 20  # it is about who the model is


def test_identity_path_prefers_user_files(isolated, real_data):
    from tasks.customjson import CustomJSON, identity_conversations_path
    path, source = identity_conversations_path()
    assert source == "NANOCHAT_LOCAL_DATA"
    task = CustomJSON(path)
    assert len(task) == 1000
    roles = [m["role"] for m in task[0]["messages"]]
    assert roles[0] == "user" and len(roles) >= 10


def test_identity_path_base_dir(isolated):
    (isolated / "identity_conversations.jsonl").write_text(
        json.dumps([{"role": "user", "content": "who?"}, {"role": "assistant", "content": "me"}]) + "\n")
    from tasks.customjson import identity_conversations_path
    assert identity_conversations_path() == (str(isolated / "identity_conversations.jsonl"), "base dir")


# -----------------------------------------------------------------------------
# Every task's conversations render with the chat tokenizer

def test_conversations_render(tiny_tokenizer, word_list, tmp_path):
    from tasks.spellingbee import SpellingBee, SimpleSpelling
    from tasks.customjson import CustomJSON
    from tasks.common import BUNDLED_DATA_DIR
    tok = tiny_tokenizer
    output_start = tok.encode_special("<|output_start|>")
    python_start = tok.encode_special("<|python_start|>")
    assistant_end = tok.encode_special("<|assistant_end|>")
    convs = [SpellingBee(size=3)[0], SimpleSpelling(size=3)[0],
             CustomJSON(BUNDLED_DATA_DIR / "identity_conversations.jsonl")[0],
             {"messages": [{"role": "user", "content": render_mc("q?", ["A", "B"], ["x", "y"])},
                           {"role": "assistant", "content": "B"}]}]
    for conv in convs:
        ids, mask = tok.render_conversation(conv)
        assert len(ids) == len(mask) and ids[0] == tok.get_bos_token_id()
        supervised = [i for i, m in zip(ids, mask) if m == 1]
        assert supervised and supervised[-1] == assistant_end
    ids, mask = tok.render_conversation(convs[0])
    assert python_start in [i for i, m in zip(ids, mask) if m == 1]   # the tool call is learned
    assert output_start in [i for i, m in zip(ids, mask) if m == 0]   # the tool output is not
