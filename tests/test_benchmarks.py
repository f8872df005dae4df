"""
The benchmarks run and report what they promise, at the smallest size: dev/bench_train.py (training throughput),
dev/bench_serving.py (a load test of the chat server), scripts/infer_bench.py (prefill and decode speed) and
dev/bench_checkpoint.py (optimizer checkpoint layouts).
"""

import json

import pytest

from nanochat.errors import NanochatError
from scripts import chat_web
from test_chat_web import LiveServer, build_tiny_chat_model, make_args, make_worker, save_tiny_checkpoint, server  # noqa: F401


def test_bench_checkpoint_smoke(capsys):
    from dev.bench_checkpoint import main
    main(["--depth=1", "--vocab-size=256", "--rounds=1"])
    main(["--plan-depth=2", "--plan-world=8"])
    out = capsys.readouterr().out
    assert "per-rank: save" in out and "consolidated: save" in out and "d2 on 8 ranks: optimizer state" in out


def test_bench_train_smoke(capsys):
    from dev.bench_train import main
    result = main(["--device-type=cpu", "--depth=1", "--aspect-ratio=64", "--head-dim=32", "--max-seq-len=32",
                   "--vocab-size=256", "--device-batch-size=1", "--steps=2", "--warmup-steps=0"])
    assert result["tok_per_sec"] > 0 and result["mfu"] is None
    assert "tok/sec:" in capsys.readouterr().out


def test_serving_benchmark(server, capsys):  # noqa: F811 (the live server fixture of test_chat_web)
    from dev import bench_serving
    bench_serving.main(["--url", server.url, "--clients", "1,3", "--requests", "1", "--max-tokens", "4", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "req/s" in out and "TTFT p50 ms" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert [level["clients"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["errors"] == 0 and level["requests"] == level["clients"] and level["requests_per_sec"] > 0
        assert 0 < level["ttft_p50_ms"] <= level["latency_p50_ms"] + 1e-6


def test_serving_benchmark_sends_the_api_key(tiny_tokenizer, capsys):
    from dev import bench_serving
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size())
    app = chat_web.create_app(make_args(api_key="s3cret"), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        bench_serving.main(["--url", live.url, "--api-key", "s3cret", "--clients", "1", "--requests", "1",
                            "--max-tokens", "2", "--warmup", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["levels"][0]["errors"] == 0


def test_serving_benchmark_compares_checkouts(monkeypatch, capsys):
    """--before-dir launches the two checkouts' servers in turn and reports the medians of each."""
    from dev import bench_serving
    launched = []

    class Server:
        def terminate(self):
            pass

        def wait(self, timeout):
            pass

    def launch(server_args, checkout):
        launched.append((checkout, server_args))
        return Server(), "http://server"

    numbers = iter([100, 300, 120, 360, 90, 330])  # before, after, before, ... tok/s of the one level
    def measure(args, url):
        tok_per_sec = next(numbers)
        return ["cpu"], [{"clients": 8, "output_tok_per_sec": tok_per_sec, "ttft_p50_ms": 1e4 / tok_per_sec, "ttft_p95_ms": 2e4 / tok_per_sec}]

    monkeypatch.setattr(bench_serving, "launch_server", launch)
    monkeypatch.setattr(bench_serving, "measure", measure)
    bench_serving.main(["--before-dir", "/old", "--runs", "3", "--clients", "8", "--", "-i", "sft"])
    out = capsys.readouterr().out
    assert launched == [("/old", ["-i", "sft"]), (bench_serving.REPO_ROOT, ["-i", "sft"])] * 3
    report = json.loads(out.strip().splitlines()[-1])
    assert report["medians"]["before"][0]["output_tok_per_sec"] == 100 and report["medians"]["after"][0]["output_tok_per_sec"] == 330
    assert report["medians"]["after"][0]["ttft_p95_ms"] == pytest.approx(2e4 / 330)
    assert "8 clients: output_tok_per_sec 100.0 -> 330.0 (3.30x)" in out


def test_inference_benchmark_smoke(base_dir, tiny_tokenizer, capsys):
    from scripts import infer_bench
    save_tiny_checkpoint(base_dir, tiny_tokenizer)
    infer_bench.main(["-i", "sft", "--device-type", "cpu", "--prompt-tokens", "16", "--decode-tokens", "4", "--batch-sizes", "1,2"])
    out = capsys.readouterr().out
    assert "Prefill (batch 1, 16 tokens)" in out and "TPOT ms" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["prompt_tokens"] == 16 and [row["batch_size"] for row in report["sweep"]] == [1, 2]
    for row in report["sweep"]:  # 4 decode tokens = a first token, then 3 timed decode steps (a tiny random model never stops)
        assert row["decode_steps"] == 3 and row["tok_per_sec"] > 0 and row["tpot_sec"] > 0 and row["ttft_sec"] > 0
        assert row["peak_memory_mib"] > 0 and row["mbu_percent"] is None  # no bandwidth figure for a CPU
        assert row["mixed_tok_per_sec"] > 0  # rows holding prompts of different lengths
    assert report["prefill"]["tok_per_sec"] > 0 and report["weight_bytes"] > 0
    # more decode tokens than the context holds leaves no room for a prompt: one typed error, before any timing
    with pytest.raises(NanochatError, match="^--decode-tokens 256 leaves no room for a prompt in the 256-token context$"):
        infer_bench.main(["-i", "sft", "--device-type", "cpu", "--decode-tokens", "256"])
