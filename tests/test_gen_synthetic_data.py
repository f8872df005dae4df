"""
dev/gen_synthetic_data.py against a fake OpenRouter-compatible server on 127.0.0.1: retries on 5xx and bad output,
schema-valid JSONL, diversity of prompts, --append/--save-metadata, and clear errors without a key, offline, or with
a rejected key.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "dev" / "gen_synthetic_data.py"

spec = importlib.util.spec_from_file_location("gen_synthetic_data", SCRIPT)
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

GOOD = [{"role": "user", "content": "hi, who are you?"},
        {"role": "assistant", "content": "I'm nanochat, a small open-source chat model."},
        {"role": "user", "content": "cool"},
        {"role": "assistant", "content": "Thanks! Ask me anything."}]
BAD_ORDER = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]


class FakeAPI:
    """A chat-completions endpoint that answers each request according to `plan(conversation, attempt)`:
    conversation = the order (0-based) in which its prompt first arrived, attempt = 0 for the first request of
    that prompt, 1 for its first retry, ... (per conversation, so the answers do not depend on thread scheduling)."""

    def __init__(self, plan):
        self.plan = plan
        self.requests = []
        self.prompts = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with api.lock:
                    attempt = sum(r["body"]["messages"][0]["content"] == prompt for r in api.requests)
                    api.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                         "body": body})
                    if attempt == 0:
                        api.prompts.append(prompt)
                    conversation = api.prompts.index(prompt)
                status, payload = api.plan(conversation, attempt)
                if status == 200:
                    payload = {"choices": [{"message": {"role": "assistant",
                                                        "content": json.dumps({"messages": payload})}}]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "test-key")
    monkeypatch.delenv("OPENROUTER_BASE_URL", raising=False)


def flaky_plan(conversation, attempt):
    # the first try of every 3rd conversation is a server error, of every 4th a conversation with the wrong role
    # order; every retry succeeds
    if attempt == 0 and conversation % 3 == 0:
        return 500, {"error": "overloaded"}
    if attempt == 0 and conversation % 4 == 1:
        return 200, BAD_ORDER
    return 200, GOOD


def run_main(*argv):
    return gen.main([str(a) for a in argv])


def test_generates_valid_jsonl_with_retries_and_diverse_prompts(tmp_path, api_key, capsys):
    api = FakeAPI(flaky_plan)
    out = tmp_path / "ids.jsonl"
    try:
        run_main("--num", 8, "--workers", 3, "--output", out, "--base-url", api.url, "--backoff", 0.01)
    finally:
        api.close()
    lines = out.read_text().splitlines()
    assert len(lines) == 8
    for line in lines:
        assert gen.validate_messages(json.loads(line)) == GOOD
    assert len(api.requests) == 8 + 5  # conversations 0, 3, 6 (500) and 1, 5 (bad order) needed one retry
    first = api.requests[0]
    assert first["path"] == "/api/v1/chat/completions" and first["auth"] == "Bearer test-key"
    assert first["body"]["response_format"]["type"] == "json_schema"
    assert first["body"]["model"] == gen.DEFAULT_MODEL
    prompts = {r["body"]["messages"][0]["content"] for r in api.requests}
    assert len(prompts) == 8  # one distinct prompt per conversation
    personas = {p for p in gen.PERSONAS for text in prompts if p in text}
    dynamics = {d for d, _ in gen.DYNAMICS for text in prompts if d in text}
    assert len(personas) >= 3 and len(dynamics) >= 3
    printed = capsys.readouterr().out
    assert "✓ Saved conversation 8/8" in printed and "8 saved" in printed


def test_diversity_sampling_is_reproducible_and_spread():
    specs = [gen.sample_conversation_spec(i, seed=0) for i in range(200)]
    assert specs[5] == gen.sample_conversation_spec(5, seed=0)
    assert specs[5] != gen.sample_conversation_spec(5, seed=1)
    assert len({s["topic_category"] for s in specs}) == len(gen.TOPICS)
    assert len({s["persona"] for s in specs}) == len(gen.PERSONAS)
    assert len({s["dynamic_name"] for s in specs}) == len(gen.DYNAMICS)
    for s in specs[:20]:
        # openers come from 3 distinct styles
        styles = {style for o in s["openers"] for style, items in gen.OPENERS.items() if o in items}
        assert len(s["openers"]) == 3 and len(styles) >= 2


def test_append_and_save_metadata(tmp_path, api_key):
    api = FakeAPI(lambda conversation, attempt: (200, GOOD))
    out = tmp_path / "ids.jsonl"
    try:
        run_main("--num", 2, "--output", out, "--base-url", api.url, "--save-metadata")
        run_main("--num", 3, "--output", out, "--base-url", api.url, "--save-metadata", "--append")
        records = [json.loads(l) for l in out.read_text().splitlines()]
        assert len(records) == 5
        for r in records:
            assert r["messages"] == GOOD
            assert {"topic_category", "topic", "persona", "dynamic_name", "openers", "model"} <= set(r["metadata"])
        # without --append the file is replaced
        run_main("--num", 1, "--output", out, "--base-url", api.url)
        assert [json.loads(l) for l in out.read_text().splitlines()] == [GOOD]
    finally:
        api.close()


def test_persistently_bad_output_fails_clearly_and_writes_nothing(tmp_path, api_key, capsys):
    api = FakeAPI(lambda conversation, attempt: (200, BAD_ORDER))
    out = tmp_path / "ids.jsonl"
    try:
        with pytest.raises(SystemExit, match="no conversation could be generated"):
            run_main("--num", 2, "--output", out, "--base-url", api.url, "--retries", 1, "--backoff", 0.01)
    finally:
        api.close()
    assert len(api.requests) == 4  # 2 conversations x (1 try + 1 retry)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temp file left behind
    assert "✗ Error generating conversation" in capsys.readouterr().out


def test_rejected_key_stops_the_run(tmp_path, api_key):
    api = FakeAPI(lambda conversation, attempt: (401, {"error": "invalid key"}))
    try:
        with pytest.raises(SystemExit, match="rejected the key"):
            run_main("--num", 5, "--output", tmp_path / "x.jsonl", "--base-url", api.url)
    finally:
        api.close()
    assert len(api.requests) <= 4  # fatal: no retries, remaining work cancelled


def test_root_cause_wins_over_stopped_workers(tmp_path, api_key, monkeypatch):
    """Worker 0 gets the 401; worker 1 then sees the run stopped and its future completes FIRST (forced with
    events, not timing). The run must still report the 401, not the other worker's stop."""
    futures = []
    task = threading.local()
    second_done = threading.Event()
    fatal_seen = threading.Event()

    class RecordingPool(gen.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            futures.append(future)
            if len(futures) == 2:
                future.add_done_callback(lambda f: second_done.set())
            return future

    class SlowStopEvent(threading.Event):
        def set(self):
            super().set()
            if getattr(task, "idx", None) == 0 and not fatal_seen.is_set():  # the stop set by worker 0
                fatal_seen.set()
                assert second_done.wait(30), "worker 1 never finished"  # worker 0 finishes only after worker 1

    real_generate_one = gen.generate_one

    def generate_one(idx, *args):
        task.idx = idx
        return real_generate_one(idx, *args)

    def fake_request(session, args, key, prompt):
        if task.idx == 0:
            raise gen.FatalAPIError("the API rejected the key (HTTP 401)")
        assert fatal_seen.wait(30)
        raise gen.RetryableError("HTTP 500")

    monkeypatch.setattr(gen, "ThreadPoolExecutor", RecordingPool)
    monkeypatch.setattr(gen, "generate_one", generate_one)
    monkeypatch.setattr(gen.threading, "Event", SlowStopEvent)
    monkeypatch.setattr(gen, "request_conversation", fake_request)
    with pytest.raises(SystemExit, match="rejected the key"):
        run_main("--num", 2, "--workers", 2, "--output", tmp_path / "x.jsonl", "--base-url", "http://127.0.0.1:9/v1",
                 "--backoff", 0.01)


def test_offline_fails_fast_with_clear_message(tmp_path, api_key, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls = []
    real_request = gen.request_conversation
    monkeypatch.setattr(gen, "request_conversation", lambda *a: calls.append(1) or real_request(*a))
    with pytest.raises(SystemExit, match="cannot reach the chat API"):
        run_main("--num", 3, "--output", tmp_path / "x.jsonl", "--base-url", f"http://127.0.0.1:{port}/v1",
                 "--backoff", 0.05, "--retries", 5)
    assert len(calls) <= 2 * 3, "an unreachable API stops the run after one retry, not after every retry"
    assert not (tmp_path / "x.jsonl").exists()


def test_missing_key_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENROUTER_API_KEY"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--num", "1", "--output", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: OPENROUTER_API_KEY is not set")
    assert not (tmp_path / "x.jsonl").exists()
