"""
Serve a chat model over HTTP: a chat web page, the reference streaming endpoint and an OpenAI-compatible API.

    python -m scripts.chat_web                      # latest SFT model, http://localhost:8000
    python -m scripts.chat_web -i rl --num-gpus 4    # one model replica per GPU

Endpoints:
    GET  /                      the chat page (nanochat/ui.html, self-contained)
    POST /chat/completions      streaming SSE: data: {"token": ..., "gpu": ...} ... data: {"done": true}
    POST /v1/chat/completions   OpenAI Chat Completions (stream and non-stream)
    GET  /v1/models             OpenAI model list
    GET  /health, GET /stats    readiness and worker-pool statistics

Every request borrows one worker (a model replica) from a pool and gives it back when its reply ends, fails, or the
client goes away. Generation runs in a thread per request, so the event loop stays responsive and replicas on
different GPUs really run in parallel.
"""

import json
import math
import time
import uuid
import random
import asyncio
import logging
import argparse
import threading
import importlib.util
from contextlib import asynccontextmanager, aclosing
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nanochat.chat import message_chunks, assemble_prompt, ReplyDecoder, load_chat_model, check_dtype_flag, warm_up

logger = logging.getLogger("nanochat.web")

# -----------------------------------------------------------------------------
# Flags

def build_parser():
    parser = argparse.ArgumentParser(description="nanochat web server: chat page + OpenAI-compatible API")
    # model
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"], help="checkpoint family to load")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only for > 1)")
    parser.add_argument("--device-type", type=str, default="", choices=["cuda", "cpu", "mps", ""], help="device (default: autodetect)")
    parser.add_argument("-d", "--dtype", type=str, default="", choices=["bfloat16", "float16", "float32", ""],
                        help="compute dtype (default: chosen by nanochat.common; same as env NANOCHAT_DTYPE)")
    # sampling defaults (a request may override them within the limits below)
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = no top-k filtering)")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default longest reply in tokens")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed for requests that give none (default: random per request)")
    # network
    parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--host", type=str, default="0.0.0.0", help="address to bind (127.0.0.1 = this machine only)")
    # request limits: anything outside gets HTTP 400 with a JSON error body
    parser.add_argument("--max-messages", type=int, default=500, help="most messages in one request")
    parser.add_argument("--max-message-chars", type=int, default=8000, help="longest single message in characters")
    parser.add_argument("--max-conversation-chars", type=int, default=32000, help="longest conversation in characters")
    parser.add_argument("--max-temperature", type=float, default=2.0, help="highest temperature a request may ask for")
    parser.add_argument("--max-top-k", type=int, default=200, help="highest top-k a request may ask for")
    parser.add_argument("--max-max-tokens", type=int, default=4096, help="highest max_tokens a request may ask for")
    return parser


def check_args(args):
    """Bad flags fail here, before any model is loaded."""
    if args.num_gpus < 1:
        raise SystemExit(f"error: -n/--num-gpus {args.num_gpus} must be >= 1")
    if not 0 <= args.temperature <= args.max_temperature:
        raise SystemExit(f"error: -t/--temperature {args.temperature} must be in [0, --max-temperature={args.max_temperature}]")
    if not 0 <= args.top_k <= args.max_top_k:
        raise SystemExit(f"error: -k/--top-k {args.top_k} must be in [0, --max-top-k={args.max_top_k}]")
    if not 1 <= args.max_tokens <= args.max_max_tokens:
        raise SystemExit(f"error: -m/--max-tokens {args.max_tokens} must be in [1, --max-max-tokens={args.max_max_tokens}]")
    for name in ("max_messages", "max_message_chars", "max_conversation_chars"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if not 1 <= args.port <= 65535:
        raise SystemExit(f"error: -p/--port {args.port} is not a valid port")

# -----------------------------------------------------------------------------
# Worker pool: one model replica per device, borrowed by one request at a time

@dataclass
class Worker:
    gpu_id: int
    device: str
    engine: object
    tokenizer: object
    sequence_len: int
    requests_served: int = 0
    tokens_generated: int = 0
    busy: bool = False


class WorkerPool:
    def __init__(self, workers):
        self.workers = list(workers)
        self.idle = asyncio.Queue()
        for worker in self.workers:
            self.idle.put_nowait(worker)
        self.requests_active = 0
        self.requests_served = 0
        self.requests_cancelled = 0
        self.requests_failed = 0

    async def acquire(self):
        worker = await self.idle.get()  # FIFO: waiting requests are served in arrival order
        worker.busy = True
        return worker

    def release(self, worker):
        worker.busy = False
        self.idle.put_nowait(worker)

    def available(self):
        return self.idle.qsize()


def load_workers(args):
    """One Engine per device: cuda:0..n-1, or a single one on cpu/mps."""
    import torch
    from nanochat.common import compute_init, autodetect_device_type
    from nanochat.engine import Engine
    device_type = args.device_type or autodetect_device_type()
    if args.num_gpus > 1 and device_type != "cuda":
        raise SystemExit(f"error: -n/--num-gpus {args.num_gpus} needs CUDA (device type here: {device_type}); use -n 1")
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise SystemExit(f"error: -n/--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
    compute_init(device_type)
    print(f"Initializing worker pool with {args.num_gpus} GPUs..." if device_type == "cuda" else "Initializing worker pool with 1 worker...")
    workers = []
    for gpu_id in range(args.num_gpus):
        if device_type == "cuda":
            device = torch.device("cuda", gpu_id)
            print(f"Loading model on GPU {gpu_id}...")
        else:
            device = torch.device(device_type)
            print(f"Loading model on {device_type}...")
        model, tokenizer, _ = load_chat_model(args.source, device, args.model_tag, args.step)
        engine = Engine(model, tokenizer)
        warm_up(engine, tokenizer)  # the first request should not pay for one-time set-up
        workers.append(Worker(gpu_id, str(device), engine, tokenizer, model.config.sequence_len))
    print(f"All {len(workers)} workers initialized!")
    return workers

# -----------------------------------------------------------------------------
# Request validation: everything a client can get wrong becomes a 4xx with a JSON error body

class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status, message, param=None, code=None, error_type=None):
    # OpenAI-style {"error": {...}} (what the openai client reads) plus FastAPI-style "detail" for simple clients
    error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}, "detail": message}
    return JSONResponse(body, status_code=status)


@dataclass
class ChatRequest:
    messages: list
    temperature: float
    top_k: int
    max_tokens: int
    seed: int
    stream: bool = True
    include_usage: bool = False
    model: str = ""
    prompt: list = field(default_factory=list)  # token ids, filled in by prepare_prompt


def _number(payload, name, default, kind, low, high):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)[:40]}", param=name)
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value}", param=name)
    if kind is int:
        if value != int(value):
            raise ApiError(400, f"{name} must be an integer, got {value}", param=name)
        value = int(value)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)
    return kind(value)


def _content_text(content, index, openai_style):
    if isinstance(content, str):
        return content
    if openai_style and isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", param=f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{index}].content must be a string", param=f"messages[{index}].content")


def parse_chat_request(raw_body, config, openai_style):
    """Validate a chat request body against the limits; returns a ChatRequest or raises ApiError."""
    try:
        payload = json.loads(raw_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    limits = config["limits"]
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages must be a list of {role, content} objects", param="messages")
    if len(messages) == 0:
        raise ApiError(400, "at least one message is required", param="messages")
    if len(messages) > limits["max_messages"]:
        raise ApiError(400, f"too many messages: {len(messages)} > {limits['max_messages']}", param="messages", code="too_many_messages")
    clean, total_chars = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ("user", "assistant", "system") or (role == "system" and i != 0):
            raise ApiError(400, f"messages[{i}].role {json.dumps(role)[:40]} is not allowed: roles are 'user' and 'assistant' "
                                "(plus one optional leading 'system' message)", param=f"messages[{i}].role", code="invalid_role")
        text = _content_text(message.get("content"), i, openai_style)
        if not text.strip():
            raise ApiError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content")
        if len(text) > limits["max_message_chars"]:
            raise ApiError(400, f"messages[{i}].content is too long: {len(text)} characters > {limits['max_message_chars']}",
                           param=f"messages[{i}].content", code="message_too_long")
        total_chars += len(text)
        clean.append({"role": role, "content": text})
    if total_chars > limits["max_conversation_chars"]:
        raise ApiError(400, f"conversation is too long: {total_chars} characters > {limits['max_conversation_chars']}",
                       param="messages", code="conversation_too_long")
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ApiError(400, f"messages must alternate user, assistant, user, ... (message {i + len(clean) - len(turns)} is "
                                f"{message['role']!r}, expected {expected!r})", param="messages", code="invalid_role")
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages", code="invalid_role")

    defaults = config["defaults"]
    temperature = _number(payload, "temperature", defaults["temperature"], float, 0.0, limits["max_temperature"])
    top_k = _number(payload, "top_k", defaults["top_k"], int, 0, limits["max_top_k"])
    max_tokens = _number(payload, "max_tokens", defaults["max_tokens"], int, 1, limits["max_max_tokens"])
    if openai_style and payload.get("max_completion_tokens") is not None:
        max_tokens = _number(payload, "max_completion_tokens", defaults["max_tokens"], int, 1, limits["max_max_tokens"])
    seed = _number(payload, "seed", defaults["seed"], int, -2**63, 2**63 - 1)
    seed = random.randint(0, 2**31 - 1) if seed is None else seed % 2**31  # random per request unless asked
    stream, include_usage = True, False
    if openai_style:
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        options = payload.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        if payload.get("n") not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        top_p = payload.get("top_p")
        if top_p is not None and top_p != 1:
            raise ApiError(400, "top_p is not supported (use top_k); leave it unset or 1", param="top_p")
        if payload.get("stop"):
            raise ApiError(400, "stop sequences are not supported", param="stop")
    return ChatRequest(clean, temperature, top_k, max_tokens, seed, stream, include_usage, str(payload.get("model") or ""))

# -----------------------------------------------------------------------------
# Generation: a thread drives the Engine and hands text to the event loop

class Generation:
    """One reply being generated on one worker. Events arrive on .events: ("text", str), ("done", finish_reason),
    ("error", message). Setting .stop ends generation at the next token; the worker goes back to the pool when the
    thread ends, whatever happened."""

    def __init__(self, pool, worker, prompt, request, loop):
        self.pool, self.worker, self.prompt, self.request, self.loop = pool, worker, prompt, request, loop
        self.events = asyncio.Queue()
        self.stop = threading.Event()
        self.completion_tokens = 0
        self.text = ""
        self.thread = threading.Thread(target=self._run, name=f"generate-gpu{worker.gpu_id}", daemon=True)

    def start(self):
        self.pool.requests_active += 1
        self.thread.start()

    def _emit(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone (server shutting down)

    def _run(self):
        worker, request = self.worker, self.request
        decoder = ReplyDecoder(worker.tokenizer)
        finish = "length"
        generator = None
        try:
            if worker.device.startswith("cuda"):
                import torch
                torch.cuda.set_device(torch.device(worker.device))  # per thread: kernels go to this replica's GPU
            max_tokens = min(request.max_tokens, worker.sequence_len - len(self.prompt))
            generator = worker.engine.generate(self.prompt, num_samples=1, max_tokens=max_tokens,
                                               temperature=request.temperature,
                                               top_k=request.top_k if request.top_k > 0 else None, seed=request.seed)
            for token_column, _ in generator:
                if self.stop.is_set():
                    finish = "cancelled"
                    break
                token = token_column[0]
                if token in decoder.stop_tokens:
                    finish = "stop"
                    break
                self.completion_tokens += 1
                text = decoder.feed(token)
                if text:
                    self.text += text
                    self._emit(("text", text))
            tail = decoder.flush()
            if tail:
                self.text += tail
                self._emit(("text", tail))
            self._emit(("done", finish))
        except Exception as e:  # a broken model must not take the server down; the client sees the error
            finish = "error"
            logger.exception(f"generation failed on GPU {worker.gpu_id}")
            self._emit(("error", f"generation failed: {type(e).__name__}: {e}"))
        finally:
            if generator is not None:
                generator.close()
            worker.requests_served += 1
            worker.tokens_generated += self.completion_tokens
            try:
                self.loop.call_soon_threadsafe(self._finish, finish)
            except RuntimeError:
                pass  # the event loop is gone (server shutting down)

    def _finish(self, finish):
        # runs on the event loop thread, so the counters and the queue need no locks
        pool = self.pool
        pool.requests_active -= 1
        if finish == "cancelled":
            pool.requests_cancelled += 1
        elif finish == "error":
            pool.requests_failed += 1
        else:
            pool.requests_served += 1
        pool.release(self.worker)
        logger.info(f"[ASSISTANT] (GPU {self.worker.gpu_id}, {finish}, {self.completion_tokens} tokens): {self.text}")


def log_conversation(messages):
    logger.info("=" * 20)
    for message in messages:
        logger.info(f"[{message['role'].upper()}]: {message['content']}")
    logger.info("-" * 20)


async def run_generation(app, request, http_request):
    """Async iterator of events for one request. Borrows a worker, starts the thread, and on exit (done, error,
    client disconnect = cancellation, or an abandoned iterator) tells the thread to stop."""
    state = app.state
    pool = state.pool
    try:
        worker = await pool.acquire()
    except asyncio.CancelledError:  # the client went away while waiting for a worker
        pool.requests_cancelled += 1
        raise
    if await http_request.is_disconnected():  # gave up while waiting in the queue
        pool.release(worker)
        pool.requests_cancelled += 1
        return
    generation = Generation(pool, worker, request.prompt, request, asyncio.get_running_loop())
    generation.start()
    try:
        while True:
            event = await generation.events.get()
            yield event, generation
            if event[0] in ("done", "error"):
                return
    finally:
        generation.stop.set()


def prepare_prompt(app, request):
    """Tokenize the conversation and fit it into the model context (oldest turns dropped first)."""
    tokenizer, context = app.state.tokenizer, app.state.sequence_len
    chunks = message_chunks(tokenizer, request.messages)
    reserve = min(request.max_tokens, max(1, context // 4))  # the reply is guaranteed at least this much room
    prompt, dropped = assemble_prompt(tokenizer, chunks, context - reserve)
    if prompt is None:
        raise ApiError(400, f"the last message is too long for the model's {context}-token context", param="messages",
                       code="context_length_exceeded")
    if dropped:
        logger.info(f"conversation longer than the context: dropped the oldest {dropped} messages")
    request.prompt = prompt

# -----------------------------------------------------------------------------
# The app

LOGO_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64"><rect width="64" height="64" rx="14" fill="#111"/>
<path d="M16 46V18h6l20 18V18h6v28h-6L22 28v18z" fill="#fff"/></svg>"""


def ui_html_path():
    spec = importlib.util.find_spec("nanochat")
    return Path(list(spec.submodule_search_locations)[0]) / "ui.html"


def create_app(args, workers):
    """The FastAPI app serving the given workers (from load_workers, or models built in-process by tests)."""
    if not workers:
        raise ValueError("create_app needs at least one worker")
    config = {
        "defaults": {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens, "seed": args.seed},
        "limits": {"max_messages": args.max_messages, "max_message_chars": args.max_message_chars,
                   "max_conversation_chars": args.max_conversation_chars, "max_temperature": args.max_temperature,
                   "max_top_k": args.max_top_k, "max_max_tokens": args.max_max_tokens},
    }
    model_id = f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "")
    max_body_bytes = 4 * args.max_conversation_chars + 64 * args.max_messages + 65536  # JSON escaping headroom

    @asynccontextmanager
    async def lifespan(app):
        # the pool's asyncio.Queue must be created on the loop that serves requests
        app.state.pool = WorkerPool(workers)
        app.state.tokenizer = workers[0].tokenizer
        app.state.sequence_len = min(w.sequence_len for w in workers)
        app.state.started = int(time.time())
        print(f"Server ready at http://localhost:{args.port}")
        yield

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.pool = None
    # any web page may call the API (a local demo server; there are no cookies or credentials to protect)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error_handler(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    async def read_chat_request(http_request, openai_style):
        pool = app.state.pool
        if pool is None or not pool.workers:
            raise ApiError(503, "the model is not loaded yet; try again in a moment", code="not_ready")
        length = http_request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"request body too large: {length} bytes > {max_body_bytes}", code="body_too_large")
        body = await http_request.body()
        if len(body) > max_body_bytes:
            raise ApiError(413, f"request body too large: {len(body)} bytes > {max_body_bytes}", code="body_too_large")
        request = parse_chat_request(body, config, openai_style)
        prepare_prompt(app, request)
        log_conversation(request.messages)
        return request

    @app.get("/")
    async def root():
        return HTMLResponse(ui_html_path().read_text(encoding="utf-8"))

    @app.get("/logo.svg")
    async def logo():
        return Response(LOGO_SVG, media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        pool = app.state.pool
        return {"status": "ok", "ready": pool is not None and len(pool.workers) > 0,
                "num_gpus": len(pool.workers) if pool else 0, "available_workers": pool.available() if pool else 0}

    @app.get("/stats")
    async def stats():
        pool = app.state.pool
        if pool is None:
            return {"total_workers": 0, "available_workers": 0, "busy_workers": 0, "workers": []}
        return {
            "total_workers": len(pool.workers), "available_workers": pool.available(),
            "busy_workers": len(pool.workers) - pool.available(),
            "requests_active": pool.requests_active, "requests_served": pool.requests_served,
            "requests_cancelled": pool.requests_cancelled, "requests_failed": pool.requests_failed,
            "workers": [{"gpu_id": w.gpu_id, "device": w.device, "busy": w.busy,
                         "requests_served": w.requests_served, "tokens_generated": w.tokens_generated} for w in pool.workers],
        }

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    def sse(data):
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    @app.post("/chat/completions")
    async def chat_completions(http_request: Request):
        request = await read_chat_request(http_request, openai_style=False)

        async def stream():
            async with aclosing(run_generation(app, request, http_request)) as events:
                async for (kind, value), generation in events:
                    if kind == "text":
                        yield sse({"token": value, "gpu": generation.worker.gpu_id})
                    elif kind == "error":
                        yield sse({"error": value})
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream", headers=sse_headers)

    @app.get("/v1/models")
    async def list_models():
        started = getattr(app.state, "started", int(time.time()))
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(http_request: Request):
        request = await read_chat_request(http_request, openai_style=True)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = len(request.prompt)

        def usage(generation):
            n = generation.completion_tokens if generation else 0
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        if not request.stream:
            text, finish, generation = "", "length", None
            async with aclosing(run_generation(app, request, http_request)) as events:
                async for (kind, value), generation in events:
                    if kind == "text":
                        text += value
                    elif kind == "done":
                        finish = value
                    elif kind == "error":
                        raise ApiError(500, value, code="generation_failed")
            if generation is None:
                return Response(status_code=499)  # the client left while waiting for a worker
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": "stop" if finish == "stop" else "length"}],
                    "usage": usage(generation)}

        def chunk(delta, finish_reason=None):
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        async def stream():
            generation = None
            yield chunk({"role": "assistant", "content": ""})
            async with aclosing(run_generation(app, request, http_request)) as events:
                async for (kind, value), generation in events:
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "done":
                        yield chunk({}, "stop" if value == "stop" else "length")
                    elif kind == "error":
                        yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": "generation_failed"}})
            if request.include_usage:
                yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                           "choices": [], "usage": usage(generation)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers=sse_headers)

    return app


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    check_dtype_flag(args.dtype)
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)
    print("Starting NanoChat Web Server")
    print(f"Temperature: {args.temperature}, Top-k: {args.top_k}, Max tokens: {args.max_tokens}")
    # models load before the port opens, so a missing checkpoint fails with one clear line
    print("Loading nanochat models across GPUs...")
    workers = load_workers(args)
    uvicorn.run(create_app(args, workers), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
