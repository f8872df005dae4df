"""
Serving benchmark for scripts/chat_web.py: requests/s, time-to-first-token and token throughput under N concurrent
clients, each sending requests back to back over the OpenAI-compatible streaming endpoint.

    python -m scripts.chat_web --port 8000 &          # a running server
    python -m dev.bench_serving --url http://127.0.0.1:8000 --clients 1,4,16 --requests 8 --max-tokens 128

    python -m dev.bench_serving --launch -- -i sft --num-gpus 8   # or: start a server, measure, stop it

    python -m dev.bench_serving --before-dir /tmp/before --runs 3 --clients 1,8,32 -- -i sft --device-type cpu

Prints one table row per concurrency level and, as the very last line, one JSON document with everything. With
--before-dir, servers of that checkout and of this one are launched in turn (before, after, before, ...: a noisy
shared machine hurts both alike) and the medians over --runs are compared.
"""

import os
import sys
import json
import time
import socket
import argparse
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor

import requests

from nanochat.common import positive_ints

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is the capital of France, and what is it famous for?",
    "Explain how a bicycle stays upright.",
    "Give me three tips for learning a new language.",
    "What is 12 times 7?",
    "Tell me a fun fact about octopuses.",
    "How do plants make food from sunlight?",
]




def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark a running nanochat web server")
    parser.add_argument("--url", type=str, default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--clients", type=positive_ints, default="1,2,4,8", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests before measuring")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--api-key", type=str, default=None, help="key of a server started with --api-key")
    parser.add_argument("--launch", action="store_true", help="start `python -m scripts.chat_web` (args after --) on a free port")
    parser.add_argument("--before-dir", type=str, default=None,
                        help="compare with the server of this checkout: launch both in turn, medians over --runs")
    parser.add_argument("--runs", type=int, default=3, help="launches of each server with --before-dir")
    parser.add_argument("server_args", nargs="*", help="arguments for chat_web when --launch or --before-dir is given (after --)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1 or args.runs < 1:
        raise SystemExit("error: --requests, --max-tokens and --runs must be >= 1")
    return args


def one_request(args, prompt, seed):
    """One streamed chat completion. Returns dict(ok, ttft, latency, tokens, error)."""
    body = {"model": "nanochat", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        with requests.post(args.url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=args.timeout) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"ok": False, "error": event["error"].get("message", str(event["error"]))}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content") and ttft is None:
                        ttft = time.perf_counter() - start
    except requests.RequestException as e:
        return {"ok": False, "error": str(e)}
    latency = time.perf_counter() - start
    return {"ok": True, "ttft": ttft if ttft is not None else latency, "latency": latency, "tokens": tokens}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def run_level(args, clients):
    def client(c):
        return [one_request(args, PROMPTS[(c + i) % len(PROMPTS)], seed=1000 * c + i) for i in range(args.requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for client_results in pool.map(client, range(clients)) for result in client_results]
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(results), "errors": len(results) - len(ok), "wall_sec": round(wall, 3),
        "requests_per_sec": round(len(ok) / wall, 3), "output_tok_per_sec": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1), "ttft_p95_ms": round(1000 * percentile(ttfts, 0.95), 1),
        "ttft_max_ms": round(1000 * max(ttfts), 1) if ttfts else None,
        "latency_p50_ms": round(1000 * percentile([r["latency"] for r in ok], 0.5), 1),
        "mean_output_tokens": round(tokens / len(ok), 1) if ok else 0,
        "first_error": next((r["error"] for r in results if not r["ok"]), None),
    }


def launch_server(server_args, checkout=REPO_ROOT):
    """Start chat_web of a checkout on a free port; returns (process, url) once it is ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "scripts.chat_web", "--port", str(port), *server_args]
    print("Launching:", " ".join(cmd), f"(in {checkout})")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with code {proc.returncode}; run the command above by hand to see why")
        try:
            if requests.get(url + "/health", timeout=2).json().get("ready"):
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("error: the server did not become ready within 600 s")


def measure(args, url):
    """Warm up, then one printed row of numbers per concurrency level; returns (workers, rows)."""
    try:
        stats = requests.get(url + "/stats", timeout=10).json()
        workers = [w["device"] for w in stats["workers"]]
    except (requests.RequestException, ValueError, KeyError) as e:
        raise SystemExit(f"error: no nanochat server at --url {url} ({e}); start one with python -m scripts.chat_web")
    print(f"Server {url}: {len(workers)} workers {workers}, rows per worker {stats.get('rows_per_worker', 1)}, "
          f"max_tokens {args.max_tokens}, {args.requests} requests per client")
    args.url = url
    for i in range(args.warmup):
        one_request(args, PROMPTS[0], seed=i)
    header = f"{'clients':>7} {'reqs':>5} {'errors':>6} {'req/s':>8} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'latency p50 ms':>15} {'tok/req':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for clients in args.clients:
        row = run_level(args, clients)
        rows.append(row)
        print(f"{row['clients']:>7} {row['requests']:>5} {row['errors']:>6} {row['requests_per_sec']:>8.2f} "
              f"{row['output_tok_per_sec']:>10.1f} {row['ttft_p50_ms']:>12.1f} {row['ttft_p95_ms']:>12.1f} "
              f"{row['latency_p50_ms']:>15.1f} {row['mean_output_tokens']:>8.1f}")
        if row["first_error"]:
            print(f"        first error: {row['first_error']}")
    return workers, rows


def compare(args):
    """Servers of --before-dir and of this checkout, launched in turn; medians and after/before ratios per level."""
    runs = {"before": [], "after": []}
    for run in range(args.runs):
        for name, checkout in (("before", args.before_dir), ("after", REPO_ROOT)):
            print(f"--- run {run} {name}")
            proc, url = launch_server(args.server_args, checkout)
            try:
                runs[name].append(measure(args, url)[1])
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    keys = ("output_tok_per_sec", "ttft_p50_ms", "ttft_p95_ms")
    medians = {name: [{key: statistics.median(rows[i][key] for rows in results) for key in keys}
                      for i in range(len(args.clients))] for name, results in runs.items()}
    print(f"medians of {args.runs} runs (after/before)")
    for i, clients in enumerate(args.clients):
        before, after = medians["before"][i], medians["after"][i]
        print(f"{clients:>3} clients: " + " | ".join(f"{key} {before[key]:.1f} -> {after[key]:.1f} ({after[key] / before[key]:.2f}x)"
                                                    for key in keys))
    print(json.dumps({"before_dir": args.before_dir, "runs": args.runs, "clients": args.clients, "max_tokens": args.max_tokens,
                      "requests_per_client": args.requests, "temperature": args.temperature, "medians": medians, "all": runs}))


def main(argv=None):
    args = parse_args(argv)
    if args.before_dir:
        return compare(args)
    proc = None
    if args.launch:
        proc, args.url = launch_server(args.server_args)
    try:
        workers, rows = measure(args, args.url)
        print(json.dumps({"url": args.url, "workers": workers, "max_tokens": args.max_tokens,
                          "requests_per_client": args.requests, "temperature": args.temperature, "levels": rows}))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
