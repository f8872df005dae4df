"""
Inference benchmark of a checkpoint through the Engine: prefill speed, then time-to-first-token, time per output
token, throughput, memory-bandwidth and compute utilization over a sweep of decode batch sizes.

    python -m scripts.infer_bench -i sft --batch-sizes 1,8,32,128
    python -m scripts.infer_bench -i base --prompt-tokens 512 --decode-tokens 64 --device-type cpu   # smoke run

Meant for one CUDA GPU (peak bandwidth/FLOPs come from a GPU-name table; unknown devices report n/a). The very
last stdout line is one JSON document with every number.
"""

import json
import time
import argparse
import statistics

import torch

from nanochat.chat import load_chat_model

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


def peak_bandwidth(device_name):
    name = (device_name or "").lower()
    for keys, bandwidth in PEAK_BANDWIDTH:
        if all(k in name for k in keys):
            return bandwidth
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark inference of a nanochat checkpoint")
    parser.add_argument("-i", "--source", type=str, default="base", choices=["base", "sft", "rl"], help="checkpoint family")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (clamped to sequence_len - decode tokens)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens generated per timed run")
    parser.add_argument("--batch-sizes", type=str, default="1,8,32,128", help="comma-separated decode batch sizes")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--device-type", type=str, default="", choices=["cuda", "cpu", "mps", ""], help="device (default: autodetect)")
    args = parser.parse_args(argv)
    try:
        args.batch_list = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"error: --batch-sizes {args.batch_sizes!r} must be comma-separated integers")
    if not args.batch_list or min(args.batch_list) < 1:
        raise SystemExit("error: --batch-sizes must be >= 1")
    if args.prompt_tokens < 1 or args.decode_tokens < 2:
        raise SystemExit("error: --prompt-tokens must be >= 1 and --decode-tokens >= 2")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_generate(engine, prompt, batch_size, decode_tokens, temperature, device):
    """One timed generation. The first next() (batch-1 prefill + KV replication + first sample) is the TTFT;
    every later next() is one decode step for all rows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    generator = engine.generate(prompt, num_samples=batch_size, max_tokens=decode_tokens, temperature=temperature, seed=42)
    start = time.perf_counter()
    next(generator)
    synchronize(device)
    ttft = time.perf_counter() - start
    step_times = []
    while True:
        start = time.perf_counter()
        try:
            next(generator)
        except StopIteration:
            break
        synchronize(device)
        step_times.append(time.perf_counter() - start)
    peak_vram = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return ttft, step_times, peak_vram


def main(argv=None):
    args = parse_args(argv)
    from nanochat.common import compute_init, autodetect_device_type, get_peak_flops, COMPUTE_DTYPE, get_dist_info
    from nanochat.engine import Engine
    if get_dist_info()[3] != 1:
        raise SystemExit("error: infer_bench runs on a single device; start it with python, not torchrun")
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_chat_model(args.source, device, args.model_tag, args.step)
    engine = Engine(model, tokenizer)
    cfg = model.config

    prompt_len = min(args.prompt_tokens, cfg.sequence_len - args.decode_tokens)
    if prompt_len < 1:
        raise SystemExit(f"error: --decode-tokens {args.decode_tokens} leaves no room for a prompt in the {cfg.sequence_len}-token context")
    if prompt_len < args.prompt_tokens:
        print(f"Note: prompt clamped from {args.prompt_tokens} to {prompt_len} tokens (sequence_len {cfg.sequence_len} - decode {args.decode_tokens})")
    text = PARAGRAPH * max(1, prompt_len // 10)
    prompt = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())[:prompt_len]

    # static card from the architecture
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        total_vram = torch.cuda.get_device_properties(device).total_memory
    else:
        gpu_name, total_vram = device.type, None
    bandwidth = peak_bandwidth(gpu_name) if device.type == "cuda" else None
    peak_flops = get_peak_flops(gpu_name) if device.type == "cuda" else None
    param_dtypes, weight_bytes = {}, 0
    for p in model.parameters():
        param_dtypes[str(p.dtype).removeprefix("torch.")] = param_dtypes.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
        weight_bytes += p.numel() * p.element_size()
    head_dim = cfg.n_embd // cfg.n_head
    kv_elem = torch.tensor([], dtype=COMPUTE_DTYPE).element_size()
    windows = [w if w > 0 else cfg.sequence_len for w, _ in model.window_sizes]
    kv_bytes_per_token = cfg.n_layer * 2 * cfg.n_kv_head * head_dim * kv_elem
    context_mid = prompt_len + args.decode_tokens // 2
    kv_read_per_step = sum(2 * cfg.n_kv_head * head_dim * kv_elem * min(context_mid, w) for w in windows)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))

    def decode_flops(context):
        return 2 * matmul_params + sum(4 * cfg.n_head * head_dim * min(context, w) for w in windows)

    def prefill_flops(n):
        attention = 0
        for w in windows:
            w = min(w, n)
            attention += 4 * cfg.n_head * head_dim * (w * (w + 1) / 2 + (n - w) * w)
        return 2 * matmul_params * n + attention

    ceiling = bandwidth / (weight_bytes + kv_read_per_step) if bandwidth else None
    max_rows = (total_vram - weight_bytes) // (kv_bytes_per_token * cfg.sequence_len) if total_vram else None

    rule = "=" * 100
    print(rule)
    print(f"Model: {args.source} {args.model_tag or '(largest tag)'} step {meta.get('step', args.step if args.step is not None else '(last)')} | depth {cfg.n_layer} | "
          f"dim {cfg.n_embd} | heads {cfg.n_head} | kv heads {cfg.n_kv_head} | context {cfg.sequence_len}")
    print(f"Device: {gpu_name} | peak bandwidth {bandwidth / 1e12 if bandwidth else float('nan'):.2f} TB/s | "
          f"peak {peak_flops / 1e12 if peak_flops else float('nan'):.0f} TFLOPS | "
          f"VRAM {total_vram / 2**30 if total_vram else float('nan'):.1f} GiB")
    print(f"Parameters: {', '.join(f'{n:,} {d}' for d, n in param_dtypes.items())} | weights {weight_bytes / 2**20:.1f} MiB")
    print(f"KV cache: {kv_bytes_per_token:,} bytes/token stored, {kv_read_per_step:,} bytes read/step at context {context_mid} "
          f"(window pattern {cfg.window_pattern})")
    print(f"Batch-1 ceiling: {ceiling:,.0f} tok/s" if ceiling else "Batch-1 ceiling: n/a (unknown peak bandwidth)",
          f"| max full-context rows: {max_rows:,}" if max_rows is not None else "| max full-context rows: n/a")
    print(rule)

    # prefill: warm up, then a batch-1 run with 2 decode tokens; its TTFT is the prefill time
    bench_generate(engine, prompt, 1, 2, args.temperature, device)
    prefill_time, _, _ = bench_generate(engine, prompt, 1, 2, args.temperature, device)
    prefill_tps = prompt_len / prefill_time
    prefill_mfu = 100 * prefill_flops(prompt_len) / prefill_time / peak_flops if peak_flops else None
    print(f"Prefill (batch 1, {prompt_len} tokens): {prefill_tps:,.0f} tok/s | MFU " +
          (f"{prefill_mfu:.1f}%" if prefill_mfu is not None else "n/a"))

    print(f"{'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'MBU %':>7} {'MFU %':>8} {'VRAM GiB':>9} {'steps':>18}")
    sweep = []
    for batch_size in args.batch_list:
        bench_generate(engine, prompt, batch_size, 8, args.temperature, device)  # warm up
        ttft, step_times, peak_vram = bench_generate(engine, prompt, batch_size, args.decode_tokens, args.temperature, device)
        steps = len(step_times)
        tpot = statistics.median(step_times) if step_times else float("nan")
        tok_per_sec = batch_size * steps / sum(step_times) if step_times else 0.0
        mbu = 100 * (weight_bytes + batch_size * kv_read_per_step) / tpot / bandwidth if bandwidth and steps else None
        mfu = 100 * batch_size * decode_flops(context_mid) / tpot / peak_flops if peak_flops and steps else None
        expected = args.decode_tokens - 1
        steps_text = f"{steps}" if steps == expected else f"{steps} (early stop @ {steps})"
        print(f"{batch_size:>6} {1000 * ttft:>9.2f} {1000 * tpot:>9.3f} {tok_per_sec:>10.1f} "
              f"{(f'{mbu:.2f}' if mbu is not None else 'n/a'):>7} {(f'{mfu:.4f}' if mfu is not None else 'n/a'):>8} "
              f"{(f'{peak_vram / 2**30:.2f}' if peak_vram is not None else 'n/a'):>9} {steps_text:>18}")
        sweep.append({"batch_size": batch_size, "ttft_sec": round(ttft, 6), "tpot_sec": round(tpot, 6) if steps else None,
                      "tok_per_sec": round(tok_per_sec, 1), "mbu_percent": round(mbu, 2) if mbu is not None else None,
                      "mfu_percent": round(mfu, 4) if mfu is not None else None, "peak_vram_bytes": peak_vram,
                      "decode_steps": steps})

    print(json.dumps({
        "source": args.source, "step": meta.get("step", args.step), "model_config": meta.get("model_config"),
        "gpu": gpu_name, "peak_bandwidth_bytes_per_sec": bandwidth, "total_vram_bytes": total_vram,
        "num_params": sum(param_dtypes.values()), "param_dtypes": param_dtypes, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token, "kv_read_bytes_per_step": kv_read_per_step, "context_mid": context_mid,
        "peak_flops_per_sec": peak_flops, "decode_flops_per_token": decode_flops(context_mid),
        "ceiling_bs1_tok_per_sec": round(ceiling, 1) if ceiling else None, "max_full_context_rows": max_rows,
        "prompt_tokens": prompt_len, "decode_tokens": args.decode_tokens, "temperature": args.temperature,
        "prefill": {"tok_per_sec": round(prefill_tps, 1), "mfu_percent": round(prefill_mfu, 2) if prefill_mfu is not None else None,
                    "time_sec": round(prefill_time, 6)},
        "sweep": sweep,
    }))


if __name__ == "__main__":
    main()
