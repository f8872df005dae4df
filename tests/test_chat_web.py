"""
The web server (scripts/chat_web.py): every endpoint, every validation rule, the official openai client, several
concurrent clients, disconnects freeing workers, readable streaming of tool calls, and the real command line.
Tiny random models on CPU, served by uvicorn on 127.0.0.1 from a thread.
"""

import os
import sys
import json
import time
import logging
import socket
import threading
import functools
import subprocess
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from scripts import chat_web
from nanochat.chat import ReplyDecoder, assemble_prompt, message_chunks
from conftest import RowCounter
from nanochat.errors import NanochatError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256  # tiny models' context: room for a few turns

# -----------------------------------------------------------------------------
# helpers shared with tests/test_browser.py

def build_tiny_chat_model(vocab_size, seed=0, sequence_len=CONTEXT):
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="L")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    return model


def make_worker(gpu_id, model, tokenizer):
    from nanochat.engine import Engine
    return chat_web.Worker(gpu_id, "cpu", Engine(model, tokenizer), tokenizer, model.config.sequence_len)


class FakeModel:
    """Stands in for a GPT under the real Engine: every row's next token is `token`, one forward per `delay` seconds
    (a reply of thousands of tokens streams for minutes), or every forward raises. `started` is set by the first
    forward; `barrier` (if given) is waited on by the first forward."""

    def __init__(self, token, vocab_size, delay=0.02, fail=False, barrier=None, sequence_len=8192):
        from nanochat.gpt import GPTConfig
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.token, self.delay, self.fail, self.barrier = token, delay, fail, barrier
        self.forwards, self.started = 0, threading.Event()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        if self.barrier is not None:
            self.barrier.wait(timeout=20)
            self.barrier = None
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        kv_cache.advance(ids.size(1))
        self.forwards += 1
        self.started.set()
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        logits[..., self.token] = 100.0  # sampled at any temperature
        return logits


def make_args(**overrides):
    args = chat_web.build_parser().parse_args([])
    args.host, args.port = "127.0.0.1", 0
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


class LiveServer:
    """uvicorn in a background thread on a free 127.0.0.1 port, with the HTTP protocol chat_web.main serves."""

    def __init__(self, app, header_timeout=30.0):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        protocol = functools.partial(chat_web.HeaderTimeoutProtocol, header_timeout=header_timeout)
        self.server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def sse_events(response):
    """Parsed `data:` payloads of a server-sent-event stream ([DONE] kept as the string)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events

# -----------------------------------------------------------------------------
# fixtures

LIMITS = dict(max_messages=7, max_message_chars=300, max_conversation_chars=800, max_max_tokens=64, max_top_k=100,
              max_temperature=1.5, max_tokens=12)


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    workers = [make_worker(i, build_tiny_chat_model(tiny_tokenizer.get_vocab_size(), seed=0), tiny_tokenizer) for i in range(2)]
    app = chat_web.create_app(make_args(**LIMITS), workers=workers)
    with LiveServer(app) as live:
        yield live


def chat(server, messages, path="/chat/completions", **fields):
    return requests.post(server.url + path, json={"messages": messages, **fields}, timeout=60, stream=True)


def wait_for_stats(server, condition, timeout=10):
    """Poll /stats until condition(stats) holds; returns those stats."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = requests.get(server.url + "/stats", timeout=5).json()
        if condition(stats):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"/stats never reached the expected state in {timeout}s: {stats}")


def wait_all_idle(server, timeout=10):
    return wait_for_stats(server, lambda s: s["available_workers"] == s["total_workers"] and s["requests_active"] == 0, timeout)


def raw_connection(server, head, end_headers=True):
    """A plain socket to the server that has sent `head` (request line + headers) and nothing else yet."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + (b"\r\n" if end_headers else b""))
    return sock


def closed_by_server(sock, timeout=60):
    """Wait (at most `timeout` s) for the server to close the connection; True if it did without answering."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()

# -----------------------------------------------------------------------------
# plain endpoints

def test_page_is_served_and_self_contained(server):
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<title>NanoChat</title>" in html and 'id="chat-input"' in html and "Ask anything" in html
    # no external assets or CDNs: nothing is loaded from another origin
    lowered = html.lower()
    for needle in ('src="http', "src='http", 'href="http', "href='http", "@import", "<script src", 'rel="stylesheet"'):
        assert needle not in lowered, needle
    assert requests.get(server.url + "/logo.svg", timeout=10).headers["content-type"].startswith("image/svg+xml")


def test_health_and_stats(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health == {"status": "ok", "ready": True, "num_gpus": 2, "available_workers": 2}
    stats = requests.get(server.url + "/stats", timeout=10).json()
    assert stats["total_workers"] == 2 and stats["busy_workers"] == 0 and stats["available_workers"] == 2
    assert [w["gpu_id"] for w in stats["workers"]] == [0, 1] and all(w["device"] == "cpu" for w in stats["workers"])
    assert stats["rows_per_worker"] == 16 and stats["rows_in_use"] == 0 and stats["requests_waiting"] == 0
    assert [w["rows_in_use"] for w in stats["workers"]] == [0, 0]


def test_token_stream(server):
    before = requests.get(server.url + "/stats", timeout=10).json()["requests_served"]
    r = chat(server, [{"role": "user", "content": "Hello, who are you? 🙂"}], temperature=0.0, top_k=5, max_tokens=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert all(set(e) == {"token", "gpu"} and e["gpu"] in (0, 1) for e in tokens)
    text = "".join(e["token"] for e in tokens)
    assert "<|" not in text  # no raw special tokens (UTF-8 safety is tested on the decoder below)
    stats = wait_all_idle(server)
    assert stats["requests_served"] == before + 1


def test_same_seed_same_reply_and_long_history_is_fitted(server, tiny_tokenizer):
    messages = [{"role": "user", "content": "Tell me a story."}]
    replies = [sse_events(chat(server, messages, seed=123, max_tokens=10)) for _ in range(2)]
    assert [e.get("token") for e in replies[0]] == [e.get("token") for e in replies[1]]  # gpu may differ
    # a history far longer than the 256-token context is accepted: the oldest turns are dropped
    long_history = []
    for i in range(3):  # Cyrillic letters cost a token or two each with the tiny tokenizer
        long_history += [{"role": "user", "content": f"question {i} " + "ж" * 90},
                         {"role": "assistant", "content": f"answer {i} " + "ю" * 90}]
    long_history.append({"role": "user", "content": "and now?"})
    assert sum(len(c) for c in message_chunks(tiny_tokenizer, long_history)) > CONTEXT
    r = chat(server, long_history, max_tokens=8)
    assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}


# -----------------------------------------------------------------------------
# validation: every rule gives a 4xx with a JSON error body, on both chat endpoints

USER = {"role": "user", "content": "hi"}
BAD_REQUESTS = {
    "too many messages": {"messages": [USER, {"role": "assistant", "content": "a"}] * 4},
    "message too long": {"messages": [{"role": "user", "content": "x" * 301}]},
    "conversation too long": {"messages": [{"role": "user", "content": "x" * 290}, {"role": "assistant", "content": "y" * 290},
                                           {"role": "user", "content": "z" * 290}]},
    "no messages": {"messages": []},
    "messages not a list": {"messages": "hello"},
    "message not an object": {"messages": ["hello"]},
    "bad role": {"messages": [{"role": "tool", "content": "hi"}]},
    "system not first": {"messages": [USER, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}, USER]},
    "roles not alternating": {"messages": [USER, USER]},
    "last message not user": {"messages": [USER, {"role": "assistant", "content": "a"}]},
    "empty content": {"messages": [{"role": "user", "content": "   "}]},
    "content not a string": {"messages": [{"role": "user", "content": 42}]},
    "temperature too low": {"messages": [USER], "temperature": -0.1},
    "temperature too high": {"messages": [USER], "temperature": 1.6},
    "temperature not a number": {"messages": [USER], "temperature": "hot"},
    "top_k negative": {"messages": [USER], "top_k": -1},
    "top_k too high": {"messages": [USER], "top_k": 101},
    "top_k not an integer": {"messages": [USER], "top_k": 2.5},
    "max_tokens zero": {"messages": [USER], "max_tokens": 0},
    "max_tokens too high": {"messages": [USER], "max_tokens": 65},
    "max_tokens boolean": {"messages": [USER], "max_tokens": True},
}


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_validation_rules(server, path, case):
    r = requests.post(server.url + path, json=BAD_REQUESTS[case], timeout=10)
    assert r.status_code == 400, (case, r.text)
    body = r.json()
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"] == body["detail"]
    assert len(body["detail"]) > 10


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json(server, path, raw):
    r = requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["detail"]


@pytest.mark.parametrize("field", ["temperature", "top_k", "max_tokens", "seed"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers(server, field, value):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field, value)  # Python's json accepts these
    r = requests.post(server.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_cors_preflight(server):
    r = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.test")


@pytest.mark.parametrize("extra", [{"n": 2}, {"top_p": 0.5}, {"stop": ["\n"]}, {"stream": "yes"}])
def test_openai_only_fields_validated(server, extra):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [USER], **extra}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra))


def test_openai_text_content_parts(server, caplog):
    """/v1 accepts OpenAI content parts when they are all text (joined as they are); any other part, or parts on the
    plain endpoint, is a 400 on that message's content."""
    def post(path, content, **fields):
        return requests.post(server.url + path, json={"messages": [{"role": "user", "content": content}], **fields}, timeout=60)
    caplog.set_level(logging.INFO, logger="nanochat.web")
    parts = [{"type": "text", "text": "sun"}, {"type": "text", "text": "flower"}]
    r = post("/v1/chat/completions", parts, max_tokens=2)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert "[USER]: sunflower" in caplog.text  # the conversation is logged before the reply starts
    image = [{"type": "image_url", "image_url": {"url": "http://example.test/cat.png"}}]
    for path, content in [("/v1/chat/completions", image), ("/v1/chat/completions", parts + image), ("/chat/completions", parts)]:
        r = post(path, content)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", (path, content)


def test_body_too_large_and_limits_are_flags(server):
    r = requests.post(server.url + "/chat/completions", data=b"x" * 200_000, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    # the limits came from flags: 7 messages allowed (the limit), 300-char message allowed
    ok = [USER, {"role": "assistant", "content": "a"}] * 3 + [{"role": "user", "content": "word " * 60}]
    r = chat(server, ok, max_tokens=2)
    assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}


def test_body_cap_holds_every_conversation_within_the_limits(tiny_tokenizer):
    """A conversation at the character limits, sent as JSON with every character escaped as a surrogate pair
    (json.dumps' default for emoji: "\\ud83d\\udc4b", 12 bytes) and pretty-printed, is not refused as too large."""
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size())
    args = make_args()  # the default limits: 500 messages of up to 8000 characters, 32000 in all
    app = chat_web.create_app(args, workers=[make_worker(0, model, tiny_tokenizer)])
    contents = ["\U0001F44B" * args.max_message_chars] * 3 + ["\U0001F44B" * (args.max_message_chars - 2), "hi"]
    assert sum(map(len, contents)) == args.max_conversation_chars
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(contents)]
    with LiveServer(app) as live:
        for indent in (None, 4):
            body = json.dumps({"messages": messages, "max_tokens": 2}, indent=indent)
            assert len(body) > 12 * args.max_conversation_chars
            r = requests.post(live.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"},
                              timeout=60)
            assert r.status_code == 200, r.text[:300]  # the oldest turns are dropped to fit the context


@pytest.mark.parametrize("temperature", [1e-45, 5e-324])
def test_temperature_near_zero_is_served(server, temperature):
    # logits / temperature used to overflow to inf (NaN probabilities) below ~1e-38: a 500
    for path in ("/v1/chat/completions", "/chat/completions"):
        r = chat(server, [USER], path=path, temperature=temperature, max_tokens=3)
        assert r.status_code == 200, r.text
        if path == "/chat/completions":
            events = sse_events(r)
            assert events[-1] == {"done": True} and not any("error" in e for e in events), events


def test_slow_headers_are_cut_off(tiny_tokenizer):
    """A connection whose request headers are not all in within --header-timeout is closed: one that sends nothing,
    one that stops halfway through its headers, and a kept-alive one that does so for its second request. One whose
    headers came in time may take longer for its body."""
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(), workers=[make_worker(0, model, tiny_tokenizer)])
    body = json.dumps({"messages": [USER], "max_tokens": 2}).encode()
    with LiveServer(app, header_timeout=0.5) as live:
        # first, so its deadline (were it still armed) would come before any of the others'
        slow_body = raw_connection(live, f"POST /v1/chat/completions HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                                         f"Content-Length: {len(body)}\n")
        slow_body.sendall(body[:10])
        silent = raw_connection(live, "", end_headers=False)
        half = raw_connection(live, "POST /v1/chat/completions HTTP/1.1\nHost: test\nContent-Le", end_headers=False)
        kept = raw_connection(live, "GET /health HTTP/1.1\nHost: test\n")
        response = b""
        while not response.endswith(b"}"):  # the JSON body of /health
            response += kept.recv(65536)
        assert response.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nHo")
        for name, sock in [("silent", silent), ("half", half), ("kept", kept)]:
            assert closed_by_server(sock), f"the {name} connection was not closed"
        slow_body.sendall(body[10:])
        response = b""
        while b"\r\n\r\n" not in response:
            response += slow_body.recv(65536)
        slow_body.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]


def test_system_message_first_is_accepted(server):
    r = chat(server, [{"role": "system", "content": "Be brief."}, USER], path="/v1/chat/completions", max_tokens=3)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_unknown_route_and_wrong_method(server):
    assert requests.get(server.url + "/nope", timeout=10).status_code == 404
    assert requests.get(server.url + "/chat/completions", timeout=10).status_code == 405


def test_prompt_fitting_rejects_a_message_longer_than_the_context(tiny_tokenizer):
    chunks = message_chunks(tiny_tokenizer, [{"role": "user", "content": "word " * 100}])
    assert assemble_prompt(tiny_tokenizer, chunks, 20) == (None, 1)
    chunks = message_chunks(tiny_tokenizer, [{"role": "user", "content": "a b c " * 20}, {"role": "assistant", "content": "ok"},
                                              {"role": "user", "content": "d"}])
    prompt, dropped = assemble_prompt(tiny_tokenizer, chunks, 12)
    assert dropped == 2 and prompt[0] == tiny_tokenizer.get_bos_token_id() and len(prompt) <= 12
    assert prompt[1] == tiny_tokenizer.encode_special("<|user_start|>")
    assert prompt[-1] == tiny_tokenizer.encode_special("<|assistant_start|>")


def test_context_length_exceeded_is_a_400(tiny_tokenizer):
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size(), sequence_len=32)
    app = chat_web.create_app(make_args(), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 80}]}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

# -----------------------------------------------------------------------------
# hardening: hostile bodies are a 4xx, the body cap holds while reading, clients that leave are cheap

HUGE = "9" * 400  # a valid JSON integer far beyond any float

@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_huge_numbers_and_deep_nesting_are_400(tiny_tokenizer, path):
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(), workers=[make_worker(0, model, tiny_tokenizer)])  # default body cap (578 KB)
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    bodies = {f"400-digit {field}": "{%s, \"%s\": %s}" % (messages, field, HUGE) for field in ("temperature", "top_k", "max_tokens", "seed")}
    bodies["400-digit negative seed"] = "{%s, \"seed\": -%s}" % (messages, HUGE)
    bodies["5000-digit integer"] = "{%s, \"seed\": %s}" % (messages, "7" * 5000)
    bodies["100k-deep nesting"] = "{%s, \"seed\": %s%s}" % (messages, "[" * 100_000, "]" * 100_000)
    with LiveServer(app) as live:
        for case, raw in bodies.items():
            r = requests.post(live.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=10)
            assert r.status_code == 400, (case, r.status_code, r.text[:200])
            assert r.json()["error"]["type"] == "invalid_request_error" and len(r.json()["detail"]) < 300, case


def test_chunked_body_is_capped_while_reading(server):
    # a chunked body that never ends: the server must answer 413 once the cap (77 KB here) is passed, not wait for it all
    sock = raw_connection(server, "POST /chat/completions HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                                  "Transfer-Encoding: chunked\n")
    piece = b"x" * 32768
    for _ in range(4):
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    sock.settimeout(20)
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(65536)
    sock.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:200]


class Records(logging.Handler):
    """Collects log records and signals each one."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.records, self.arrived = [], threading.Event()

    def emit(self, record):
        self.records.append(record)
        self.arrived.set()


def test_client_leaving_while_sending_its_body_is_one_log_line(server):
    records = Records()
    loggers = [logging.getLogger(name) for name in ("nanochat.web", "uvicorn.error")]  # ours, and uvicorn's tracebacks
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(records)
    try:
        sock = raw_connection(server, "POST /chat/completions HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                                      "Content-Length: 1000\n")
        sock.sendall(b'{"messages": ')  # 13 of the promised 1000 bytes, then gone
        sock.close()
        assert records.arrived.wait(10), "nothing was logged about the client that left"
        wait_all_idle(server)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(records)
            logger.setLevel(level)
    assert not any(r.exc_info for r in records.records), [r.getMessage() for r in records.records]
    assert [r.getMessage() for r in records.records] == ["client disconnected while sending its request to /chat/completions"]


def test_non_streaming_request_is_cancelled_when_the_client_leaves(tiny_tokenizer):
    model = FakeModel(tiny_tokenizer.encode("hello")[0], tiny_tokenizer.get_vocab_size())  # would stream for minutes
    app = chat_web.create_app(make_args(max_tokens=4096), workers=[make_worker(0, model, tiny_tokenizer)])
    body = json.dumps({"messages": [USER], "stream": False})
    with LiveServer(app) as live:
        sock = raw_connection(live, f"POST /v1/chat/completions HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                                    f"Content-Length: {len(body)}\n")
        sock.sendall(body.encode())
        assert model.started.wait(10)
        sock.close()
        stats = wait_for_stats(live, lambda s: s["requests_cancelled"] == 1)  # its row is freed, generation over
        assert stats["rows_in_use"] == 0 and model.forwards < 1000


def test_default_host_is_this_machine_only():
    assert chat_web.build_parser().parse_args([]).host == "127.0.0.1"


def test_api_key_is_required_when_set(tiny_tokenizer):
    openai = pytest.importorskip("openai")
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(api_key="s3cret"), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        def client(key):
            return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)
        reply = client("s3cret").chat.completions.create(model="nanochat", messages=[USER], max_tokens=3)
        assert reply.object == "chat.completion"
        assert client("s3cret").models.list().data[0].id == "nanochat-sft"
        for key in ("wrong", "s3cret2"):
            with pytest.raises(openai.AuthenticationError):
                client(key).chat.completions.create(model="nanochat", messages=[USER], max_tokens=3)
            with pytest.raises(openai.AuthenticationError):
                client(key).models.list()
        # the plain endpoints: no header, or a wrong one, is a 401 with the usual JSON error body
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cret\u00e9"}):
            for path in ("/chat/completions", "/v1/chat/completions"):
                r = requests.post(live.url + path, json={"messages": [USER]}, headers=headers, timeout=10)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        r = chat(live, [USER], max_tokens=3, stream=True)
        assert r.status_code == 401
        r = requests.post(live.url + "/chat/completions", json={"messages": [USER], "max_tokens": 3}, stream=True,
                          headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert r.status_code == 200 and sse_events(r)[-1] == {"done": True}
        # the page and the health checks stay open (the page asks for the key itself)
        assert requests.get(live.url + "/", timeout=10).status_code == 200
        assert requests.get(live.url + "/health", timeout=10).json()["ready"]

# -----------------------------------------------------------------------------
# the official openai client

def test_openai_client_non_streaming_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    models = client.models.list()
    model_id = models.data[0].id
    assert model_id.startswith("nanochat")

    completion = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello!"}],
                                                max_tokens=8, temperature=0.5, seed=7)
    assert completion.object == "chat.completion" and completion.model == model_id
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0 and 0 <= completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=8, temperature=0.5, seed=7, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    # same seed, same settings: streaming gives the same text as non-streaming
    assert "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason and usage.completion_tokens == completion.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=3.0)
    assert "temperature" in str(excinfo.value)

# -----------------------------------------------------------------------------
# several users at once

def test_concurrent_clients_all_served(server):
    wait_all_idle(server)
    before = requests.get(server.url + "/stats", timeout=10).json()["requests_served"]
    num_clients = 6

    def one_client(i):
        r = chat(server, [{"role": "user", "content": f"client {i} says hello"}], max_tokens=6, seed=i)
        assert r.status_code == 200
        events = sse_events(r)
        assert events[-1] == {"done": True}
        return {e["gpu"] for e in events[:-1]}

    with ThreadPoolExecutor(num_clients) as pool:
        results = list(pool.map(one_client, range(num_clients)))
    assert len(results) == num_clients
    stats = wait_all_idle(server)
    assert stats["requests_served"] == before + num_clients  # none lost
    assert sum(w["requests_served"] for w in stats["workers"]) >= num_clients


def test_replicas_generate_in_parallel(tiny_tokenizer):
    barrier = threading.Barrier(2)  # each replica's first forward waits until both replicas are in one
    token = tiny_tokenizer.encode("hello")[0]
    models = [FakeModel(token, tiny_tokenizer.get_vocab_size(), barrier=barrier) for _ in range(2)]
    workers = [make_worker(i, model, tiny_tokenizer) for i, model in enumerate(models)]
    with LiveServer(chat_web.create_app(make_args(), workers=workers)) as live:
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda i: sse_events(chat(live, [USER], max_tokens=1)), range(2)))
        assert all(events[-1] == {"done": True} and "error" not in events[0] for events in replies)
        assert sorted(events[0]["gpu"] for events in replies) == [0, 1]  # each replica served one, at the same time
        assert [w["requests_served"] for w in wait_all_idle(live)["workers"]] == [1, 1]


def decisive_chat_model(vocab_size, sequence_len=CONTEXT):
    """A tiny random model whose greedy choices are not near-ties (a batch's float rounding cannot flip them)."""
    model = build_tiny_chat_model(vocab_size, sequence_len=sequence_len)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(30)
    return model


class PausingModel(RowCounter):
    """A model that, in its `pause_at`-th forward, sets `paused` and waits for `resume`; records each forward's rows."""

    def __init__(self, model, pause_at):
        super().__init__(model)
        self.pause_at, self.paused, self.resume = pause_at, threading.Event(), threading.Event()

    def forward(self, ids, kv_cache=None):
        if len(self.rows) + 1 == self.pause_at:
            self.paused.set()
            assert self.resume.wait(20)
        return super().forward(ids, kv_cache=kv_cache)


def test_request_joining_mid_generation_gets_its_reply_alone(tiny_tokenizer):
    """Continuous batching: a request arriving while another is being generated joins it at the next step, shares
    its forwards, and both get exactly the greedy replies they get alone."""
    model = PausingModel(decisive_chat_model(tiny_tokenizer.get_vocab_size()), pause_at=4)
    first = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 40, "temperature": 0.0}
    second = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0.0}

    def reply(live, body):
        r = requests.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]

    with LiveServer(chat_web.create_app(make_args(), workers=[make_worker(0, model, tiny_tokenizer)])) as live:
        with ThreadPoolExecutor(2) as pool:
            first_reply = pool.submit(reply, live, first)
            assert model.paused.wait(20)  # the first reply is 3 tokens in
            second_reply = pool.submit(reply, live, second)
            wait_for_stats(live, lambda s: s["rows_in_use"] == 2)  # the second one is on the replica
            model.resume.set()
            together = [first_reply.result(), second_reply.result()]
        assert max(model.rows) == 2 and model.rows[-1] == 1  # they shared forwards; the longer one finished alone
        assert together[0][1] > together[1][1] > 0
        alone = [reply(live, first), reply(live, second)]
    assert together == alone


# -----------------------------------------------------------------------------
# workers are freed: client disconnects and generation errors

def test_disconnect_mid_stream_frees_the_worker(tiny_tokenizer):
    model = FakeModel(tiny_tokenizer.encode("hello")[0], tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(max_tokens=4096), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        r = requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30)
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # a couple of events arrived: it is streaming
        assert any(line.startswith(b"data: ") for line in got)
        stats = requests.get(live.url + "/stats", timeout=5).json()
        assert stats["busy_workers"] == 1 and stats["rows_in_use"] == 1 and stats["workers"][0]["rows_in_use"] == 1
        r.close()  # the client goes away mid-stream
        stats = wait_for_stats(live, lambda s: s["requests_cancelled"] == 1)
        assert stats["rows_in_use"] == 0 and stats["available_workers"] == 1 and model.forwards < 1000
        # the freed worker serves the next request
        r = requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30)
        assert next(r.iter_lines()).startswith(b"data: ")
        r.close()
        assert wait_for_stats(live, lambda s: s["requests_cancelled"] == 2)["rows_in_use"] == 0


def test_disconnect_frees_the_row_for_a_waiting_request(tiny_tokenizer):
    """With every row taken a request waits; when a client leaves, its row goes to the waiting request at once,
    without waiting for the (endless) reply it was generating."""
    model = FakeModel(tiny_tokenizer.encode("hello")[0], tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(max_tokens=4096, rows_per_replica=2), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        streams = [requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30)
                   for _ in range(2)]
        lines = [r.iter_lines() for r in streams]  # kept: a dropped iterator closes the connection
        assert all(next(line).startswith(b"data: ") for line in lines)  # both rows are streaming
        waiting = requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30)
        stats = wait_for_stats(live, lambda s: s["requests_waiting"] == 1)
        assert stats["rows_in_use"] == 2 and stats["available_workers"] == 0
        streams[0].close()
        assert next(waiting.iter_lines()).startswith(b"data: ")  # admitted: its reply streams
        stats = wait_for_stats(live, lambda s: s["requests_cancelled"] == 1)
        assert stats["rows_in_use"] == 2 and stats["requests_waiting"] == 0
        waiting.close()
        streams[1].close()
        assert wait_all_idle(live)["requests_cancelled"] == 3


def test_disconnect_while_waiting_for_a_worker(tiny_tokenizer):
    model = FakeModel(tiny_tokenizer.encode("hello")[0], tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(max_tokens=4096, rows_per_replica=1), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        first = requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30)
        first_lines = first.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(first_lines).startswith(b"data: ")  # the only row is busy now
        waiting = requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30)
        wait_for_stats(live, lambda stats: stats["requests_waiting"] == 1)
        waiting.close()  # gives up while queued (the server has already sent the SSE headers)
        wait_for_stats(live, lambda stats: stats["requests_cancelled"] == 1 and stats["requests_waiting"] == 0)
        first.close()
        stats = wait_all_idle(live)
        assert stats["requests_cancelled"] == 2 and stats["workers"][0]["requests_served"] == 1  # nobody got the worker after leaving


def test_generation_error_is_reported_and_frees_the_worker(tiny_tokenizer):
    model = FakeModel(0, tiny_tokenizer.get_vocab_size(), fail=True)
    app = chat_web.create_app(make_args(), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        events = sse_events(requests.post(live.url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30))
        assert "boom" in events[0]["error"] and events[-1] == {"done": True}
        r = requests.post(live.url + "/v1/chat/completions", json={"messages": [USER]}, timeout=30)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        stats = wait_all_idle(live)
        assert stats["requests_failed"] == 2 and stats["available_workers"] == 1

# -----------------------------------------------------------------------------
# readable, UTF-8-safe streaming

def test_reply_decoder_utf8_and_tool_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    special = tok.encode_special
    text = "héllo 🙂 wörld"
    decoder = ReplyDecoder(tok)
    pieces = [decoder.feed(t) for t in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    decoder = ReplyDecoder(tok)
    ids = tok.encode("It is ") + [special("<|python_start|>")] + tok.encode("12/60") + [special("<|python_end|>"),
          special("<|output_start|>")] + tok.encode("0.2") + [special("<|output_end|>")] + tok.encode(" per minute")
    ids += [special("<|python_start|>")] + tok.encode("1+") + [special("<|python_end|>")] + tok.encode(" ok")
    shown = "".join(decoder.feed(t) for t in ids) + decoder.flush()
    assert shown == "It is [calculator: 12/60 = 0.2] per minute[calculator: 1+] ok"
    assert decoder.feed(special("<|assistant_end|>")) == ""

# -----------------------------------------------------------------------------
# the real command line: flags checked before loading, then a checkpoint served end to end

def save_tiny_checkpoint(base_dir, tokenizer, source_dir="chatsft_checkpoints", tag="d2", step=5):
    from nanochat.checkpoint_manager import save_checkpoint
    tokenizer.save(str(base_dir / "tokenizer"))
    model = build_tiny_chat_model(tokenizer.get_vocab_size())
    meta = {"model_config": dataclasses.asdict(model.config), "step": step}
    save_checkpoint(str(base_dir / source_dir / tag), step, model.state_dict(), None, meta)
    return model


def test_bad_flags_fail_fast(capsys):
    # outside the flag's own range: argparse's error line, exit code 2
    for argv, needle in [(["--max-tokens", "0"], "--max-tokens"), (["--num-gpus", "0"], "--num-gpus"),
                         (["--port", "70000"], "--port"), (["--header-timeout", "0"], "--header-timeout"),
                         (["--header-timeout", "nan"], "--header-timeout"), (["--rows-per-replica", "0"], "--rows-per-replica")]:
        with pytest.raises(SystemExit) as excinfo:
            chat_web.build_parser().parse_args(argv)
        assert excinfo.value.code == 2 and needle in capsys.readouterr().err
    # a default beyond what a request may ask for, or a key that no request can send (empty, surrounding spaces are
    # dropped from headers, not ASCII): a typed error, the one error line of the command line
    for argv, message in [(["-t", "5"], "-t/--temperature 5.0 must be in [0, 2.0]"),
                          (["-k", "500"], "-k/--top-k 500 must be in [0, 200]"),
                          (["--api-key", ""], "--api-key '' must be printable ASCII"),
                          (["--api-key", "key "], "--api-key 'key ' must be printable ASCII"),
                          (["--api-key", "cl\u00e9"], "--api-key 'cl\u00e9' must be printable ASCII"),
                          (["--api-key", "a\tb"], "--api-key 'a\\tb' must be printable ASCII")]:
        with pytest.raises(NanochatError) as excinfo:
            chat_web.check_args(chat_web.build_parser().parse_args(argv))
        assert str(excinfo.value).startswith(message), excinfo.value


def test_rows_whose_kv_cache_cannot_fit_fail_at_start(base_dir, tiny_tokenizer, capsys):
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    args = chat_web.build_parser().parse_args(["-i", "sft", "--device-type", "cpu", "--rows-per-replica", "2"])
    chat_web.load_workers(args)
    assert "KV cache: 2 rows x 256 tokens = 0.5 MiB" in capsys.readouterr().out
    args.rows_per_replica = 10**9  # 262 TB
    with pytest.raises(NanochatError, match="^the KV cache of 1000000000 rows does not fit on cpu .*; lower --rows-per-replica$"):
        chat_web.load_workers(args)


@pytest.mark.slow
def test_command_line_serves_a_checkpoint(base_dir, tiny_tokenizer):
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "--port", str(port),
                             "--device-type", "cpu", "-i", "sft", "-m", "8", "--header-timeout", "5"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(url + "/health", timeout=2).json()["ready"]:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.3)
        events = sse_events(requests.post(url + "/chat/completions", json={"messages": [USER]}, stream=True, timeout=30))
        assert events[-1] == {"done": True}
        assert requests.get(url + "/v1/models", timeout=5).json()["data"][0]["id"] == "nanochat-sft"
        assert closed_by_server(socket.create_connection(("127.0.0.1", port), timeout=30)), "--header-timeout not applied"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert "Starting NanoChat Web Server" in output and f"Server ready at http://127.0.0.1:{port}" in output
    assert "[USER]: hi" in output and "Loading model on cpu..." in output
