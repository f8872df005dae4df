"""
Inference benchmark of a checkpoint through the Engine: prefill speed, then time-to-first-token, time per output
token, throughput, memory-bandwidth and compute utilization over a sweep of decode batch sizes, and the throughput
of rows holding different prompts at different positions ("mixed", the serving case).

    python -m scripts.infer_bench -i sft --batch-sizes 1,8,32,128
    python -m scripts.infer_bench -i base --prompt-tokens 512 --decode-tokens 64 --device-type cpu   # smoke run

Meant for one CUDA GPU (peak bandwidth/FLOPs come from a GPU-name table; unknown devices report n/a). The very
last stdout line is one JSON document with every number.
"""

import json
import time
import argparse
import statistics
from collections import Counter

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.cli import add_model_flags, run
from nanochat.common import compute_init, autodetect_device_type, get_peak_flops, get_dist_info, COMPUTE_DTYPE
from nanochat.common import synchronize, peak_memory_mib, positive_ints, int_in, float_in
from nanochat.engine import Engine
from nanochat.errors import NanochatError

# Natural text keeps greedy decoding from collapsing into a loop of one token.
PARAGRAPH = ("The history of science is the study of how people came to understand the natural world. "
             "Early astronomers charted the motions of the planets long before anyone could explain them. "
             "Over centuries, careful measurement and open debate turned those observations into theories. ")

# Peak memory bandwidth in bytes/s by GPU name; first match wins, so specific names come first.
PEAK_BANDWIDTH = [
    (["h200"], 4.8e12), (["h100", "nvl"], 3.9e12), (["h100", "pcie"], 2.0e12), (["h100"], 3.35e12),
    (["h800"], 3.35e12), (["gb200"], 8.0e12), (["b200"], 8.0e12), (["b100"], 8.0e12),
    (["a100", "80gb"], 2.039e12), (["a100"], 1.555e12), (["a10g"], 0.6e12), (["a10"], 0.6e12),
    (["l40s"], 0.864e12), (["l4"], 0.3e12), (["5090"], 1.792e12), (["4090"], 1.008e12), (["3090"], 0.936e12),
]


def cell(value, width, digits, scale=1):
    """One right-aligned table cell; n/a for a number this device cannot give."""
    return f"{'n/a' if value is None else f'{scale * value:.{digits}f}':>{width}}"


def bench_generate(engine, prompt, batch_size, decode_tokens, temperature, device_type):
    """One timed generation of one prompt in batch_size rows. The first next() (batch-1 prefill + KV copies + first
    sample) is the TTFT; every later next() is one decode step for all rows still going. Returns (ttft, step_times,
    tokens decoded after the first, peak memory MiB)."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # a new peak for peak_memory_mib (a process's peak RSS cannot be reset)
    synchronize(device_type)
    generator = engine.generate(prompt, num_samples=batch_size, max_tokens=decode_tokens, temperature=temperature, seed=42)
    step_times, tokens, start = [], 0, time.perf_counter()
    for column, _ in generator:
        synchronize(device_type)
        now = time.perf_counter()
        step_times.append(now - start)
        tokens += sum(token is not None for token in column)  # None: that row has ended
        start = now
    return step_times[0], step_times[1:], tokens - batch_size, peak_memory_mib(device_type)


def bench_mixed(engine, prompt, batch_size, decode_tokens, temperature, device_type):
    """Decode tok/s when the rows hold different prompts, from half the prompt's length to all of it (every row at its
    own position, as when serving many users). Timed from the first step after all rows are prefilled."""
    lengths = [max(1, len(prompt) * (batch_size + i) // (2 * batch_size)) for i in range(batch_size)]
    batch = engine.new_batch(batch_size, len(prompt) + decode_tokens)
    for n in lengths:
        batch.add(prompt[:n], max_tokens=decode_tokens, temperature=temperature)
    batch.step()  # prefills every row, samples its first token
    synchronize(device_type)
    tokens, start = 0, time.perf_counter()
    while batch.rows:
        tokens += sum(token is not None for _, column, _ in batch.step() for token in column)
    synchronize(device_type)
    return tokens / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark inference of a nanochat checkpoint")
    add_model_flags(parser, default_source="base")
    parser.add_argument("--prompt-tokens", type=int_in("[1, inf)"), default=2048, help="prompt length (clamped to sequence_len - decode tokens)")
    parser.add_argument("--decode-tokens", type=int_in("[2, inf)"), default=256, help="tokens generated per timed run")
    parser.add_argument("--batch-sizes", type=positive_ints, default="1,8,32,128", help="comma-separated decode batch sizes")
    parser.add_argument("-t", "--temperature", type=float_in("[0, inf)"), default=0.0, help="sampling temperature (0 = greedy)")
    args = parser.parse_args(argv)
    if get_dist_info()[3] != 1:
        raise NanochatError("infer_bench runs on a single device; start it with python, not torchrun")
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_model(args.source, device, "eval", args.model_tag, args.step)
    engine = Engine(model, tokenizer)
    cfg = model.config

    prompt_len = min(args.prompt_tokens, cfg.sequence_len - args.decode_tokens)
    if prompt_len < 1:
        raise NanochatError(f"--decode-tokens {args.decode_tokens} leaves no room for a prompt in the {cfg.sequence_len}-token context")
    if prompt_len < args.prompt_tokens:
        print(f"Note: prompt clamped from {args.prompt_tokens} to {prompt_len} tokens (sequence_len {cfg.sequence_len} - decode {args.decode_tokens})")
    prompt = tokenizer.encode(PARAGRAPH * max(1, prompt_len // 10), prepend=tokenizer.get_bos_token_id())[:prompt_len]

    # what one decode step must read and compute, from the architecture
    gpu_name, total_memory = device_type, None
    if device_type == "cuda":
        gpu_name, total_memory = torch.cuda.get_device_name(), torch.cuda.get_device_properties(device).total_memory
    bandwidth = next((bw for keys, bw in PEAK_BANDWIDTH if all(k in gpu_name.lower() for k in keys)), None)
    peak_flops = get_peak_flops(gpu_name)  # None (n/a) for a CPU, as bandwidth
    param_dtypes = Counter()
    for p in model.parameters():
        param_dtypes[str(p.dtype).removeprefix("torch.")] += p.numel()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.n_embd // cfg.n_head
    kv_elem = torch.tensor([], dtype=COMPUTE_DTYPE).element_size()
    windows = [w if w >= 0 else cfg.sequence_len for w, _ in model.window_sizes]
    kv_bytes_per_token = cfg.n_layer * 2 * cfg.n_kv_head * head_dim * kv_elem
    context_mid = prompt_len + args.decode_tokens // 2
    kv_read_per_step = sum(2 * cfg.n_kv_head * head_dim * kv_elem * min(context_mid, w) for w in windows)
    matmul_params = model.num_matmul_params()

    def forward_flops_per_token(context):
        # 2 FLOPs per matmul weight, plus QK^T and AV over the keys each layer's window lets it see
        return 2 * matmul_params + sum(4 * cfg.n_head * head_dim * min(context, w) for w in windows)

    print(f"Model: {args.source} {args.model_tag or '(largest tag)'} step {meta.get('step')} | depth {cfg.n_layer} | "
          f"dim {cfg.n_embd} | heads {cfg.n_head} | kv heads {cfg.n_kv_head} | context {cfg.sequence_len}")
    print(f"Device: {gpu_name} | peak bandwidth {cell(bandwidth, 0, 2, 1e-12)} TB/s | peak {cell(peak_flops, 0, 0, 1e-12)} "
          f"TFLOPS | memory {cell(total_memory, 0, 1, 2**-30)} GiB")
    print(f"Parameters: {', '.join(f'{n:,} {d}' for d, n in param_dtypes.items())} | weights {weight_bytes / 2**20:.1f} MiB")
    print(f"KV cache: {kv_bytes_per_token:,} bytes/token stored, {kv_read_per_step:,} bytes read/step at context {context_mid} "
          f"(window pattern {cfg.window_pattern})")

    # prefill: warm up, then a batch-1 run with 2 decode tokens; its TTFT is the prefill time
    bench_generate(engine, prompt, 1, 2, args.temperature, device_type)
    prefill_time, _, _, _ = bench_generate(engine, prompt, 1, 2, args.temperature, device_type)
    prefill_tps = prompt_len / prefill_time
    # prefill attention is approximated at the prompt's mean context
    prefill_mfu = 100 * prefill_tps * forward_flops_per_token(prompt_len // 2) / peak_flops if peak_flops else None
    print(f"Prefill (batch 1, {prompt_len} tokens): {prefill_tps:,.0f} tok/s | MFU " +
          (f"{prefill_mfu:.1f}%" if prefill_mfu is not None else "n/a"))

    print(f"{'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'MBU %':>7} {'MFU %':>8} {'peak MiB':>9} {'steps':>6} "
          f"{'mixed tok/s':>12}")
    sweep = []
    for batch_size in args.batch_sizes:
        bench_generate(engine, prompt, batch_size, 8, args.temperature, device_type)  # warm up
        ttft, step_times, tokens, peak_mib = bench_generate(engine, prompt, batch_size, args.decode_tokens, args.temperature, device_type)
        steps = len(step_times)
        tpot = statistics.median(step_times) if steps else None
        tok_per_sec = tokens / sum(step_times) if steps else None
        mbu = 100 * (weight_bytes + batch_size * kv_read_per_step) / tpot / bandwidth if bandwidth and steps else None
        mfu = 100 * batch_size * forward_flops_per_token(context_mid) / tpot / peak_flops if peak_flops and steps else None
        mixed_tok_per_sec = bench_mixed(engine, prompt, batch_size, args.decode_tokens, args.temperature, device_type)
        row = {"batch_size": batch_size, "ttft_sec": ttft, "tpot_sec": tpot, "tok_per_sec": tok_per_sec,
               "mbu_percent": mbu, "mfu_percent": mfu, "peak_memory_mib": peak_mib, "decode_steps": steps,
               "mixed_tok_per_sec": mixed_tok_per_sec}
        print(f"{batch_size:>6} {cell(ttft, 9, 2, 1000)} {cell(tpot, 9, 3, 1000)} {cell(tok_per_sec, 10, 1)} "
              f"{cell(mbu, 7, 2)} {cell(mfu, 8, 4)} {cell(peak_mib, 9, 0)} {steps:>6} {cell(mixed_tok_per_sec, 12, 1)}")
        sweep.append(row)

    print(json.dumps({
        "source": args.source, "step": meta.get("step"), "model_config": meta.get("model_config"),
        "device": gpu_name, "peak_bandwidth_bytes_per_sec": bandwidth, "total_memory_bytes": total_memory,
        "peak_flops_per_sec": peak_flops, "param_dtypes": param_dtypes, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token, "kv_read_bytes_per_step": kv_read_per_step, "context_mid": context_mid,
        "decode_flops_per_token": forward_flops_per_token(context_mid),
        "prompt_tokens": prompt_len, "decode_tokens": args.decode_tokens, "temperature": args.temperature,
        "prefill": {"tok_per_sec": prefill_tps, "mfu_percent": prefill_mfu, "time_sec": prefill_time},
        "sweep": sweep,
    }))


if __name__ == "__main__":
    run(main)
