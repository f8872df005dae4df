"""
Serve a chat model over HTTP: a chat web page, a simple token-streaming endpoint and an OpenAI-compatible API.

    python -m scripts.chat_web                      # latest SFT model, http://127.0.0.1:8000 (this machine only)
    python -m scripts.chat_web -i rl --num-gpus 4    # one model replica per GPU
    python -m scripts.chat_web --host 0.0.0.0 --api-key SECRET   # reachable from other machines, key required

Endpoints:
    GET  /                      the chat page (nanochat/ui.html, self-contained)
    POST /chat/completions      streaming SSE: data: {"token": ..., "gpu": ...} ... data: {"done": true}
    POST /v1/chat/completions   OpenAI Chat Completions (stream and non-stream)
    GET  /v1/models             OpenAI model list
    GET  /health, GET /stats    readiness and worker-pool statistics

Continuous batching: each model replica decodes its requests together in one thread, up to --rows-per-replica of
them sharing every forward pass. A new request joins a free row at the next step (on the replica with the most free
rows; when every row is taken it waits, first come first served), and a reply that ends, fails, or whose client goes
away frees its row at once. The event loop stays responsive, and replicas on
different GPUs really run in parallel. Every request is answered 2xx or 4xx (a failing model gives 500); the request
body is capped while it is read, a connection whose headers are not in after --header-timeout is closed, and with
--api-key the chat and /v1 endpoints need "Authorization: Bearer <key>".
"""

import json
import time
import uuid
import queue
import random
import asyncio
import logging
import secrets
import argparse
import functools
import threading
from collections import Counter, deque
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.chat import Reply, message_chunks, fit_prompt, warm_up
from nanochat.checkpoint_manager import load_model
from nanochat.cli import add_model_flags, run
from nanochat.common import compute_init, autodetect_device_type, int_in, float_in
from nanochat.engine import Engine
from nanochat.errors import NanochatError

logger = logging.getLogger("nanochat.web")
UI_HTML = Path(__file__).resolve().parents[1] / "nanochat" / "ui.html"

# -----------------------------------------------------------------------------
# Flags

def build_parser():
    parser = argparse.ArgumentParser(description="nanochat web server: chat page + OpenAI-compatible API")
    # model
    add_model_flags(parser, default_source="sft")
    parser.add_argument("-n", "--num-gpus", type=int_in("[1, inf)"), default=1, help="model replicas, one per GPU (CUDA only for > 1)")
    parser.add_argument("--rows-per-replica", type=int_in("[1, inf)"), default=16,
                        help="most requests one replica decodes together (each row holds a KV cache of the model's context)")
    # sampling defaults (a request may override them within the limits below)
    parser.add_argument("-t", "--temperature", type=float_in("[0, inf)"), default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int_in("[0, inf)"), default=50, help="default top-k (0 = no top-k filtering)")
    parser.add_argument("-m", "--max-tokens", type=int_in("[1, inf)"), default=512, help="default longest reply in tokens")
    parser.add_argument("--seed", type=int_in("[0, 4294967295]"), default=None, help="sampling seed for requests that give none (default: random per request)")
    # network
    parser.add_argument("-p", "--port", type=int_in("[1, 65535]"), default=8000, help="port to listen on")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to bind (0.0.0.0 = reachable from other machines)")
    parser.add_argument("--api-key", type=str, default=None, help="require 'Authorization: Bearer KEY' on the chat and /v1 endpoints")
    parser.add_argument("--header-timeout", type=float_in("[0.01, 86400]"), default=30.0, help="seconds a client has to send a request's headers before its connection is closed")
    # request limits: anything outside gets HTTP 400 with a JSON error body
    parser.add_argument("--max-messages", type=int_in("[1, inf)"), default=500, help="most messages in one request")
    parser.add_argument("--max-message-chars", type=int_in("[1, inf)"), default=8000, help="longest single message in characters")
    parser.add_argument("--max-conversation-chars", type=int_in("[1, inf)"), default=32000, help="longest conversation in characters")
    parser.add_argument("--max-temperature", type=float_in("[0, inf)"), default=2.0, help="highest temperature a request may ask for")
    parser.add_argument("--max-top-k", type=int_in("[0, inf)"), default=200, help="highest top-k a request may ask for")
    parser.add_argument("--max-max-tokens", type=int_in("[1, inf)"), default=4096, help="highest max_tokens a request may ask for")
    return parser


def check_args(args):
    """The defaults must lie within the limits a request may ask for (each flag's own range is its argparse type)."""
    ranges = [  # (flag, value, lowest, highest)
        ("-t/--temperature", args.temperature, 0, args.max_temperature),
        ("-k/--top-k", args.top_k, 0, args.max_top_k),
        ("-m/--max-tokens", args.max_tokens, 1, args.max_max_tokens),
    ]
    for flag, value, low, high in ranges:
        if not low <= value <= high:
            raise NanochatError(f"{flag} {value} must be in [{low}, {high}]")
    # the key travels in an HTTP header, which loses surrounding spaces and is not UTF-8: such a key could never match
    key = args.api_key
    if key is not None and not (key and key == key.strip() and key.isascii() and key.isprintable()):
        raise NanochatError(f"--api-key {key!r} must be printable ASCII, not empty, with no leading or trailing spaces")

# -----------------------------------------------------------------------------
# Worker pool: one model replica per device, each decoding up to rows_per_replica requests together

@dataclass
class Worker:
    gpu_id: int
    device: str
    engine: object
    tokenizer: object
    sequence_len: int
    requests_served: int = 0
    tokens_generated: int = 0
    rows_in_use: int = 0  # requests sent to this replica and not finished (changed on the event loop only)
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # new Generations for its decode loop


class WorkerPool:
    def __init__(self, workers, rows_per_worker):
        self.workers, self.rows_per_worker = list(workers), rows_per_worker
        self.tokenizer = self.workers[0].tokenizer  # every replica serves the same checkpoint
        self.waiting = deque()     # Generations waiting for a free row, first come first served
        self.finished = Counter()  # requests by how they ended: "stop"/"length" (served), "cancelled", "error"

    def submit(self, generation):
        """Send a new generation to the replica with the most free rows, or queue it when every row is taken."""
        worker = min(self.workers, key=lambda w: w.rows_in_use)
        if worker.rows_in_use < self.rows_per_worker:
            self._start(worker, generation)
        else:
            self.waiting.append(generation)

    def release(self, worker):
        """A generation on this worker ended: its row goes to the first waiting one."""
        worker.rows_in_use -= 1
        if self.waiting:
            self._start(worker, self.waiting.popleft())

    def _start(self, worker, generation):
        worker.rows_in_use += 1
        generation.worker = worker
        worker.inbox.put(generation)

    def start(self):
        for worker in self.workers:
            threading.Thread(target=decode_loop, args=(worker, self.rows_per_worker), name=f"decode-gpu{worker.gpu_id}",
                             daemon=True).start()

    def stop(self):
        for worker in self.workers:
            worker.inbox.put(None)  # the decode loop returns at its next step


def load_workers(args):
    """One model replica per device: cuda:0..n-1, or the one cpu/mps device."""
    device_type = args.device_type or autodetect_device_type()
    usable = torch.cuda.device_count() if device_type == "cuda" else 1
    if args.num_gpus > usable:
        raise NanochatError(f"-n/--num-gpus {args.num_gpus} but only {usable} {device_type} device(s) can hold a replica "
                            "(more than one needs CUDA)")
    compute_init(device_type)
    workers = []
    for gpu_id in range(args.num_gpus):
        device = torch.device("cuda", gpu_id) if device_type == "cuda" else torch.device(device_type)
        print(f"Loading model on {device}...")
        model, tokenizer, _ = load_model(args.source, device, "eval", args.model_tag, args.step)
        engine = Engine(model, tokenizer)
        warm_up(engine, tokenizer)  # the first request should not pay for one-time set-up
        try:  # the KV cache of every row must fit: fail now rather than at the first request
            cache = engine.new_batch(args.rows_per_replica).cache
        except (torch.OutOfMemoryError, RuntimeError) as e:  # a CPU allocation fails with a RuntimeError
            raise NanochatError(f"the KV cache of {args.rows_per_replica} rows does not fit on {device} "
                                f"({str(e).splitlines()[0][:120]}); lower --rows-per-replica")
        print(f"KV cache: {args.rows_per_replica} rows x {cache.seq_len} tokens = "
              f"{(cache.k_cache.nbytes + cache.v_cache.nbytes) / 2**20:.1f} MiB")
        del cache
        workers.append(Worker(gpu_id, str(device), engine, tokenizer, model.config.sequence_len))
    print(f"All {len(workers)} workers initialized!")
    return workers

# -----------------------------------------------------------------------------
# Request validation: everything a client can get wrong becomes a 4xx with a JSON error body

class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        """OpenAI-style {"error": {...}} (what the openai client reads)."""
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list
    temperature: float
    top_k: int
    max_tokens: int
    seed: int
    stream: bool
    include_usage: bool
    prompt: list = None  # token ids, filled in by fit_prompt


def _number(payload, name, default, kind, low, high):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)[:40]}", param=name)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ApiError(400, f"{name} must be an integer, got {value}", param=name)
    # Python compares ints and floats exactly (no overflow for huge ints); NaN fails every comparison
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in [{low}, {high}], got {str(value)[:40]}", param=name)
    return kind(value)


def parse_chat_request(raw_body, args, openai_style):
    """Validate a chat request body against the limits in the server flags (args); returns a ChatRequest or raises
    ApiError. Sampling fields a request leaves out take the server's defaults."""
    try:
        payload = json.loads(raw_body)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too many digits, too deeply nested
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json")
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > args.max_messages:
        raise ApiError(400, f"too many messages: {len(messages)} > {args.max_messages}", param="messages", code="too_many_messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        text = message.get("content")
        if openai_style and isinstance(text, list) and all(  # OpenAI content parts: [{"type": "text", "text": "..."}, ...]
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in text):
            text = "".join(part["text"] for part in text)
        if not isinstance(text, str):
            raise ApiError(400, f"messages[{i}].content must be a string" + (" or a list of text parts" if openai_style else ""),
                           param=f"messages[{i}].content")
        if not text.strip():
            raise ApiError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content")
        if len(text) > args.max_message_chars:
            raise ApiError(400, f"messages[{i}].content is too long: {len(text)} characters > {args.max_message_chars}",
                           param=f"messages[{i}].content", code="message_too_long")
        clean.append({"role": message.get("role"), "content": text})
    total_chars = sum(len(m["content"]) for m in clean)
    if total_chars > args.max_conversation_chars:
        raise ApiError(400, f"conversation is too long: {total_chars} characters > {args.max_conversation_chars}",
                       param="messages", code="conversation_too_long")
    # the roles: one optional leading "system", then user, assistant, user, ... ending with the user (any other role
    # or order fails here)
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m["role"] for m in turns] != expected or not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "messages must alternate roles user, assistant, user, ... and end with a user message "
                            "(after one optional leading system message)", param="messages", code="invalid_role")

    temperature = _number(payload, "temperature", args.temperature, float, 0.0, args.max_temperature)
    top_k = _number(payload, "top_k", args.top_k, int, 0, args.max_top_k)
    max_tokens = _number(payload, "max_tokens", args.max_tokens, int, 1, args.max_max_tokens)
    if openai_style:
        max_tokens = _number(payload, "max_completion_tokens", max_tokens, int, 1, args.max_max_tokens)
    seed = _number(payload, "seed", args.seed, int, -2**63, 2**63 - 1)
    seed = random.randint(0, 2**31 - 1) if seed is None else seed % 2**31  # random per request unless asked
    stream = payload.get("stream", False) if openai_style else True  # the plain endpoint always streams
    options = payload.get("stream_options")
    include_usage = openai_style and isinstance(options, dict) and bool(options.get("include_usage"))
    if openai_style:
        for name, ok, message in [("stream", isinstance(stream, bool), "stream must be true or false"),
                                  ("n", payload.get("n") in (None, 1), "only n=1 is supported"),
                                  ("top_p", payload.get("top_p") in (None, 1), "top_p is not supported (use top_k); leave it unset or 1"),
                                  ("stop", not payload.get("stop"), "stop sequences are not supported")]:
            if not ok:
                raise ApiError(400, message, param=name)
    return ChatRequest(clean, temperature, top_k, max_tokens, seed, stream, include_usage)

# -----------------------------------------------------------------------------
# Generation: each replica's decode loop steps all its requests together and hands text to the event loop

class Generation:
    """One reply. Events arrive on .events: ("text", str), ("done", finish_reason), ("error", message). Setting .stop
    ends it at its replica's next step; its row is freed whatever happened."""

    def __init__(self, pool, request, loop):
        self.pool, self.request, self.loop = pool, request, loop
        self.events = asyncio.Queue()
        self.stop = threading.Event()
        self.worker, self.finish, self.text = None, None, ""
        self.reply = Reply(pool.tokenizer, self._emit_text)
        self.outbox = []  # events made by the decode loop, handed to the event loop once per step (post)

    @property
    def completion_tokens(self):
        return len(self.reply.tokens)

    def _emit_text(self, text):
        self.text += text
        self.outbox.append(("text", text))

    def end(self, finish):
        """From the decode loop: the reply ended ("stop", "length" or "cancelled")."""
        self.reply.close()
        self.finish = finish  # before "done": the client reads it then
        self.outbox.append(("done", finish))

    def fail(self, message):
        """From the decode loop: generation failed."""
        self.outbox.append(("error", message))

    def deliver(self, events):
        # runs on the event loop thread, so the counters and the pool need no locks
        for event in events:
            self.events.put_nowait(event)
        kind, value = events[-1]
        if kind in ("done", "error"):
            finish = value if kind == "done" else "error"
            self.pool.finished[finish] += 1
            self.worker.requests_served += 1
            self.worker.tokens_generated += self.completion_tokens
            self.pool.release(self.worker)
            logger.info(f"[ASSISTANT] (GPU {self.worker.gpu_id}, {finish}, {self.completion_tokens} tokens): {self.text}")


def post(generations):
    """Hand the events the decode loop made for these generations to the event loop, in one call (a wake-up of the
    event loop per token and request would cost more than the token)."""
    ready = [(generation, generation.outbox) for generation in generations if generation.outbox]
    if not ready:
        return
    for generation, _ in ready:
        generation.outbox = []

    def deliver():
        for generation, events in ready:
            generation.deliver(events)

    with suppress(RuntimeError):  # the event loop is gone (server shutting down)
        ready[0][0].loop.call_soon_threadsafe(deliver)


def decode_loop(worker, max_rows):
    """A replica's thread: one Batch, one forward per step for all its generations. New generations join at the
    next step; a finished, failed or abandoned one leaves at once. Returns when the inbox gives None."""
    if worker.device.startswith("cuda"):
        torch.cuda.set_device(worker.device)  # the current CUDA device is per thread
    batch, running = worker.engine.new_batch(max_rows, worker.sequence_len), {}  # engine Request -> Generation
    while True:
        arrivals = [] if running else [worker.inbox.get()]  # idle: sleep until a request comes
        while not worker.inbox.empty():
            arrivals.append(worker.inbox.get_nowait())
        if None in arrivals:
            return
        for generation in arrivals:
            r = generation.request
            running[batch.add(r.prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_k=r.top_k or None,
                              seed=r.seed)] = generation
        ended = []
        for request, generation in list(running.items()):
            if generation.stop.is_set():  # the client went away
                batch.cancel(request)
                del running[request]
                generation.end("cancelled")
                ended.append(generation)
        try:
            outputs = batch.step() if running else []
        except Exception as e:  # a broken model must not take the server down; its clients see the error
            logger.exception(f"generation failed on GPU {worker.gpu_id}")
            for generation in running.values():
                generation.fail(f"generation failed: {type(e).__name__}: {e}")
            ended += running.values()
            batch.clear()
            running, outputs = {}, []
        for request, column, _ in outputs:
            generation = running[request]
            stopped = generation.reply.feed(column[0])
            if request.done:
                del running[request]
                generation.end("stop" if stopped else "length")
                ended.append(generation)
        post([*ended, *running.values()])


async def run_generation(pool, request):
    """Async iterator of (event, generation) for one request. Submits it to the pool, and on exit (done, error, or
    cancellation because the client went away) tells its replica to stop it."""
    generation = Generation(pool, request, asyncio.get_running_loop())
    pool.submit(generation)
    try:
        while True:
            event = await generation.events.get()
            yield event, generation
            if event[0] in ("done", "error"):
                return
    finally:
        generation.stop.set()
        if generation in pool.waiting:  # the client went away before a row was free
            pool.waiting.remove(generation)
            pool.finished["cancelled"] += 1


async def collect_reply(pool, request, http_request):
    """The finished generation, or None if the client went away first (which cancels it, as for a streaming
    request)."""
    async def collect():
        async with aclosing(run_generation(pool, request)) as events:
            async for (kind, value), generation in events:
                if kind == "error":
                    raise ApiError(500, value, code="generation_failed")
        return generation

    async def client_gone():
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    reply, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone())
    await asyncio.wait([reply, watcher], return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not reply.done():
        reply.cancel()
        return None
    return reply.result()

# -----------------------------------------------------------------------------
# HTTP: uvicorn's h11 protocol with a deadline for each request's headers, which uvicorn lacks (a client that sent
# part of its headers, or nothing, and waits would hold its connection forever)

class HeaderTimeoutProtocol(H11Protocol):
    """The deadline runs from the connection, or from the previous response, until the request's headers are in;
    then the connection is closed. A body that arrives slowly is the app's business."""

    def __init__(self, *args, header_timeout, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.header_deadline = header_timeout, None

    def set_header_deadline(self, start):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.transport.close) if start else None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.set_header_deadline(True)

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived and its cycle began
            self.set_header_deadline(False)

    def on_response_complete(self):
        self.set_header_deadline(True)  # first: the call below may already begin a pipelined request
        super().on_response_complete()

    def connection_lost(self, exc):
        self.set_header_deadline(False)
        super().connection_lost(exc)

# -----------------------------------------------------------------------------
# The app

LOGO_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64"><rect width="64" height="64" rx="14" fill="#111"/>
<path d="M16 46V18h6l20 18V18h6v28h-6L22 28v18z" fill="#fff"/></svg>"""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(args, workers):
    """The FastAPI app serving the given workers (from load_workers, or models built in-process by tests)."""
    pool = WorkerPool(workers, args.rows_per_replica)
    tokenizer, context = workers[0].tokenizer, min(w.sequence_len for w in workers)
    # the biggest body within the limits: every character JSON-escaped as a surrogate pair ("\ud83d\udc4b", 12 bytes,
    # json.dumps' default), plus pretty-printed keys and roles per message, plus room for the other fields
    max_chars = min(args.max_conversation_chars, args.max_messages * args.max_message_chars)
    max_body_bytes = 12 * max_chars + 256 * args.max_messages + 65536
    model_id = f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "")
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        pool.start()  # the replicas' decode loops live as long as the server
        yield
        pool.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan)
    # any web page may call the API: there are no cookies to protect, and --api-key is a header a page must send itself
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error_handler(request, exc):
        # plus FastAPI-style "detail" for simple clients
        return JSONResponse({**exc.body(), "detail": exc.message}, status_code=exc.status)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect_handler(request, exc):
        logger.info(f"client disconnected while sending its request to {request.url.path}")
        return Response(status_code=499)  # nobody reads it

    def check_api_key(http_request):
        given = http_request.headers.get("authorization", "").encode()
        if args.api_key is not None and not secrets.compare_digest(given, f"Bearer {args.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read_chat_request(http_request, openai_style):
        check_api_key(http_request)
        body = bytearray()
        async for chunk in http_request.stream():  # capped while reading: a huge (or chunked) body is never held whole
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body too large: more than {max_body_bytes} bytes", code="body_too_large")
        request = parse_chat_request(bytes(body), args, openai_style)
        # fit the conversation into the model context, oldest turns dropped first
        chunks = message_chunks(tokenizer, request.messages)
        request.prompt, dropped, request.max_tokens = fit_prompt(tokenizer, chunks, context, request.max_tokens)
        if request.prompt is None:
            raise ApiError(400, f"the last message is too long for the model's {context}-token context", param="messages",
                           code="context_length_exceeded")
        if dropped:
            logger.info(f"conversation longer than the context: dropped the oldest {dropped} messages")
        for message in request.messages:
            logger.info(f"[{message['role'].upper()}]: {message['content']}")
        return request

    @app.get("/")
    async def root():
        return HTMLResponse(UI_HTML.read_text(encoding="utf-8"))

    @app.get("/logo.svg")
    async def logo():
        return Response(LOGO_SVG, media_type="image/svg+xml")

    def available_workers():  # replicas with a free row
        return sum(w.rows_in_use < pool.rows_per_worker for w in pool.workers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "num_gpus": len(pool.workers), "available_workers": available_workers()}

    @app.get("/stats")
    async def stats():
        rows, finished = sum(w.rows_in_use for w in pool.workers), pool.finished
        return {
            "total_workers": len(pool.workers), "available_workers": available_workers(),
            "busy_workers": sum(w.rows_in_use > 0 for w in pool.workers), "rows_per_worker": pool.rows_per_worker,
            "rows_in_use": rows, "requests_active": rows, "requests_waiting": len(pool.waiting),
            "requests_served": finished["stop"] + finished["length"],
            "requests_cancelled": finished["cancelled"], "requests_failed": finished["error"],
            "workers": [{"gpu_id": w.gpu_id, "device": w.device, "busy": w.rows_in_use > 0, "rows_in_use": w.rows_in_use,
                         "requests_served": w.requests_served, "tokens_generated": w.tokens_generated} for w in pool.workers],
        }

    @app.post("/chat/completions")
    async def chat_completions(http_request: Request):
        request = await read_chat_request(http_request, openai_style=False)

        async def stream():
            async with aclosing(run_generation(pool, request)) as events:
                async for (kind, value), generation in events:
                    if kind == "text":
                        yield sse({"token": value, "gpu": generation.worker.gpu_id})
                    elif kind == "error":
                        yield sse({"error": value})
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/v1/models")
    async def list_models(http_request: Request):
        check_api_key(http_request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(http_request: Request):
        request = await read_chat_request(http_request, openai_style=True)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage(generation):
            n = generation.completion_tokens
            return {"prompt_tokens": len(request.prompt), "completion_tokens": n, "total_tokens": len(request.prompt) + n}

        def completion(choices, kind="chat.completion.chunk", **extra):
            return {"id": completion_id, "object": kind, "created": created, "model": model_id, "choices": choices, **extra}

        def choice(finish=None, **content):
            # a reply the client sees ends with "stop" (the model finished) or "length" (max_tokens or context
            # reached); "cancelled" only happens once the client is gone
            return {"index": 0, **content, "logprobs": None, "finish_reason": finish}

        if not request.stream:
            generation = await collect_reply(pool, request, http_request)
            if generation is None:
                return Response(status_code=499)  # the client went away; nobody reads this
            message = {"role": "assistant", "content": generation.text}
            return completion([choice(generation.finish, message=message)], "chat.completion", usage=usage(generation))

        async def stream():
            generation = None
            yield sse(completion([choice(delta={"role": "assistant", "content": ""})]))
            async with aclosing(run_generation(pool, request)) as events:
                async for (kind, value), generation in events:
                    if kind == "text":
                        yield sse(completion([choice(delta={"content": value})]))
                    elif kind == "done":
                        yield sse(completion([choice(value, delta={})]))
                    else:
                        yield sse(ApiError(500, value, code="generation_failed").body())
            if request.include_usage:
                yield sse(completion([], usage=usage(generation)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)
    print("Starting NanoChat Web Server")
    print(f"Temperature: {args.temperature}, Top-k: {args.top_k}, Max tokens: {args.max_tokens}")
    # models load before the port opens, so a missing checkpoint fails with one clear line
    workers = load_workers(args)
    print(f"Server ready at http://{args.host}:{args.port}" + (" (API key required)" if args.api_key else ""))
    uvicorn.run(create_app(args, workers), host=args.host, port=args.port,
                http=functools.partial(HeaderTimeoutProtocol, header_timeout=args.header_timeout))


if __name__ == "__main__":
    run(main)
