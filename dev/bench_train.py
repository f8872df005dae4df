"""
Training throughput benchmark: tokens/sec and MFU of full training steps (forward, backward, MuonAdamW step) for a
given depth and batch, on random tokens (no tokenizer or data needed).

    python -m dev.bench_train --depth=4 --device-batch-size=2 --max-seq-len=256            # CPU
    python -m dev.bench_train --depth=12 --device-batch-size=32                              # one GPU
    python -m dev.bench_train --depth=20 --device-batch-size=32 --fp8                        # fp8 on H100
    torchrun --nproc_per_node=8 -m dev.bench_train --depth=26 --device-batch-size=16         # a node
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import time
import argparse
import statistics

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark training tok/sec and MFU", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--depth", type=int, default=12, help="model depth (as base_train)")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio")
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="sequence length")
    parser.add_argument("--window-pattern", type=str, default="SSSL", help="sliding window pattern")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size of the random tokens")
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per step")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--fp8", action="store_true", help="FP8 Linear layers (CUDA sm89+)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["tensorwise", "rowwise"])
    parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1/0, -1 = only on CUDA")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.device_batch_size < 1 or args.max_seq_len < 2 or args.steps < 1:
        raise SystemExit("error: --depth, --device-batch-size, --steps must be >= 1 and --max-seq-len >= 2")

    from nanochat.common import compute_init, compute_cleanup, print0, autodetect_device_type, get_peak_flops, COMPUTE_DTYPE
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.flash_attention import get_backend

    device_type = args.device_type or autodetect_device_type()
    if args.fp8 and device_type != "cuda":
        raise SystemExit(f"error: --fp8 needs a CUDA GPU with compute capability >= 8.9; this run is on {device_type}")
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    config = config_from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                               max_seq_len=args.max_seq_len, vocab_size=args.vocab_size, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    flops_per_token = model.estimate_flops()
    if args.fp8:
        from nanochat import fp8
        fp8.convert_to_float8_training(model, recipe=args.fp8_recipe, device=device)
    optimizer = model.setup_optimizer()
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    backend, _ = get_backend(device_type)

    B, T = args.device_batch_size, args.max_seq_len
    generator = torch.Generator(device="cpu").manual_seed(1234 + rank)
    def batch():
        x = torch.randint(0, args.vocab_size, (B, T + 1), generator=generator)
        return x[:, :-1].to(device), x[:, 1:].to(device)

    tokens_per_step = B * T * args.grad_accum_steps * world_size
    if device_type == "cuda":
        device_name = torch.cuda.get_device_name(0)
        peak = get_peak_flops(device_name)
    else:
        device_name, peak = device_type, None
    print0(f"depth {args.depth} | dim {config.n_embd} | heads {config.n_head} | params {sum(p.numel() for p in model.parameters()):,} | "
           f"FLOPs/token {flops_per_token:.4e} | batch {B}x{T}x{args.grad_accum_steps}x{world_size} = {tokens_per_step:,} tokens | "
           f"dtype {COMPUTE_DTYPE} | attention {backend} | fp8 {'on (' + args.fp8_recipe + ')' if args.fp8 else 'off'} | "
           f"compile {'on' if use_compile else 'off'} | device {device_name}")

    times = []
    for i in range(args.warmup_steps + args.steps):
        synchronize()
        t0 = time.time()
        for _ in range(args.grad_accum_steps):
            x, y = batch()
            loss = train_model(x, y) / args.grad_accum_steps
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        synchronize()
        dt = time.time() - t0
        if i >= args.warmup_steps:
            times.append(dt)
        print0(f"{'warmup' if i < args.warmup_steps else 'step'} {i:3d} | loss {loss.item() * args.grad_accum_steps:.4f} | dt {dt * 1000:.1f}ms")

    dt = statistics.median(times)
    tok_per_sec = tokens_per_step / dt
    mfu = 100 * flops_per_token * tok_per_sec / (peak * world_size) if peak else None
    mem = f" | peak memory {torch.cuda.max_memory_allocated() / 2**20:,.0f}MiB" if device_type == "cuda" else ""
    print0(f"RESULT depth={args.depth} batch={B}x{T} | median step {dt * 1000:.1f}ms | tok/sec: {tok_per_sec:,.0f} | "
           f"mfu: {f'{mfu:.2f}%' if mfu is not None else 'n/a (unknown peak FLOPs)'}{mem}")
    compute_cleanup()
    return dict(tok_per_sec=tok_per_sec, mfu=mfu, step_ms=dt * 1000)


if __name__ == "__main__":
    main()
