"""
Training throughput benchmark: tokens/sec, MFU, peak memory and the optimizer step time alone, for full training
steps (forward, backward, MuonAdamW step) at a given depth and batch, on random tokens (no tokenizer or data).

One run in this process:
    python -m dev.bench_train --depth=4 --device-batch-size=1 --max-seq-len=512                     # CPU
    python -m dev.bench_train --depth=12 --device-batch-size=32                                      # one GPU
    torchrun --nproc_per_node=8 -m dev.bench_train --depth=26 --device-batch-size=16                 # a node

Side by side, as ratios: --runs N repeats each variant N times in fresh subprocesses, alternating variants so a
noisy shared machine hurts them alike, and reports medians. A variant is TREE:COMPILE, TREE = after (this checkout)
or before (the checkout given by --before-dir, e.g. a `git worktree` of an older commit), COMPILE = on|off:
    python -m dev.bench_train --depth=6 --head-dim=64 --window-pattern=L --max-seq-len=512 --device-batch-size=32 \\
        --runs=3 --before-dir=/tmp/before --variants=before:off,after:on
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import sys
import json
import time
import inspect
import argparse
import statistics
import subprocess

import torch

THIS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Benchmark training tok/sec, MFU, peak memory and optimizer time",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    parser.add_argument("--compile", type=str, default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the model (fullgraph) and the optimizer math; auto = as base_train decides")
    parser.add_argument("--runs", type=int, default=0, help="> 0: run every variant this many times in subprocesses")
    parser.add_argument("--variants", type=str, default="after:off,after:on", help="comma list of TREE:COMPILE")
    parser.add_argument("--before-dir", type=str, default="", help="checkout that the 'before' variants import")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.device_batch_size < 1 or args.max_seq_len < 2 or args.steps < 1:
        raise SystemExit("error: --depth, --device-batch-size, --steps must be >= 1 and --max-seq-len >= 2")
    return args


def run_once(args):
    """Train warmup + timed steps in this process; returns the measurements of the timed steps."""
    from nanochat.common import compute_init, compute_cleanup, print0, autodetect_device_type, get_peak_flops
    from nanochat.common import COMPUTE_DTYPE, synchronize, peak_memory_mib
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.flash_attention import get_backend

    device_type = args.device_type or autodetect_device_type()
    if args.fp8 and device_type != "cuda":
        raise SystemExit(f"error: --fp8 needs a CUDA GPU with compute capability >= 8.9; this run is on {device_type}")
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
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
    use_compile = args.compile == "on"
    if args.compile == "auto":
        from nanochat.common import should_compile
        use_compile = should_compile(device_type, "auto", args.warmup_steps + args.steps)
    # a 'before' checkout may predate the optimizer's compile switch: it then runs its optimizer as it always did
    compile_kwarg = {"compile": use_compile} if "compile" in inspect.signature(model.setup_optimizer).parameters else {}
    optimizer = model.setup_optimizer(**compile_kwarg)
    train_model = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    backend, _ = get_backend(device_type)

    B, T = args.device_batch_size, args.max_seq_len
    generator = torch.Generator(device="cpu").manual_seed(1234 + rank)
    def batch():
        x = torch.randint(0, args.vocab_size, (B, T + 1), generator=generator)
        return x[:, :-1].to(device), x[:, 1:].to(device)

    tokens_per_step = B * T * args.grad_accum_steps * world_size
    device_name = torch.cuda.get_device_name(0) if device_type == "cuda" else device_type
    peak = get_peak_flops(device_name)
    print0(f"depth {args.depth} | dim {config.n_embd} | heads {config.n_head} | params {sum(p.numel() for p in model.parameters()):,} | "
           f"FLOPs/token {flops_per_token:.4e} | batch {B}x{T}x{args.grad_accum_steps}x{world_size} = {tokens_per_step:,} tokens | "
           f"dtype {COMPUTE_DTYPE} | attention {backend} | fp8 {'on (' + args.fp8_recipe + ')' if args.fp8 else 'off'} | "
           f"compile {args.compile} | optimizer compile {compile_kwarg.get('compile', 'n/a')} | device {device_name}")

    step_times, opt_times = [], []
    for i in range(args.warmup_steps + args.steps):
        synchronize(device_type)
        t0 = time.time()
        for _ in range(args.grad_accum_steps):
            x, y = batch()
            loss = train_model(x, y) / args.grad_accum_steps
            loss.backward()
        synchronize(device_type)
        t1 = time.time()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        synchronize(device_type)
        t2 = time.time()
        if i >= args.warmup_steps:
            step_times.append(t2 - t0)
            opt_times.append(t2 - t1)
        print0(f"{'warmup' if i < args.warmup_steps else 'step'} {i:3d} | loss {loss.item() * args.grad_accum_steps:.4f} | "
               f"dt {(t2 - t0) * 1000:.1f}ms (optimizer {(t2 - t1) * 1000:.1f}ms)")

    dt = statistics.median(step_times)
    result = dict(tok_per_sec=tokens_per_step / dt, step_ms=dt * 1000, optimizer_ms=statistics.median(opt_times) * 1000,
                  peak_memory_mib=peak_memory_mib(device_type))
    result["mfu"] = 100 * flops_per_token * result["tok_per_sec"] / (peak * world_size) if peak else None
    mfu = f"{result['mfu']:.2f}%" if peak else "n/a (unknown peak FLOPs)"
    print0(f"RESULT {json.dumps(result)}")
    print0(f"depth={args.depth} batch={B}x{T} | median step {dt * 1000:.1f}ms | optimizer {result['optimizer_ms']:.1f}ms | "
           f"tok/sec: {result['tok_per_sec']:,.0f} | mfu: {mfu} | peak memory {result['peak_memory_mib']:,.0f}MiB")
    compute_cleanup()
    return result


def compare(args, argv):
    """Run each variant args.runs times in alternating subprocesses; print medians and ratios to the first variant."""
    variants = [v.split(":") for v in args.variants.split(",")]
    for tree, mode in variants:
        if tree not in ("before", "after") or mode not in ("on", "off") or (tree == "before" and not args.before_dir):
            raise SystemExit(f"error: bad variant {tree}:{mode} (TREE = before|after, COMPILE = on|off; before needs --before-dir)")
    skip = ("--runs", "--variants", "--before-dir", "--compile")
    child_argv = [a for a in argv if not a.startswith(skip)]
    results = {f"{t}:{m}": [] for t, m in variants}
    for run in range(args.runs):
        for tree, mode in variants:
            root = THIS_DIR if tree == "after" else os.path.abspath(args.before_dir)
            env = dict(os.environ, PYTHONPATH=root)
            cmd = [sys.executable, os.path.abspath(__file__), *child_argv, f"--compile={mode}"]
            t0 = time.time()
            out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"error: variant {tree}:{mode} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
            result = dict(json.loads(line[len("RESULT "):]), process_s=time.time() - t0)
            results[f"{tree}:{mode}"].append(result)
            print(f"run {run} {tree}:{mode} | " + " | ".join(f"{k} {v:,.1f}" for k, v in result.items() if v is not None), flush=True)
    keys = ("tok_per_sec", "step_ms", "optimizer_ms", "peak_memory_mib", "process_s")
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in results.items()}
    base = medians[f"{variants[0][0]}:{variants[0][1]}"]
    print(f"\nmedians of {args.runs} alternating runs (ratio to {variants[0][0]}:{variants[0][1]})")
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, m in medians.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:,.1f} ({m[k] / base[k]:.2f}x)" for k in keys) + " |")
    return medians


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return compare(args, argv) if args.runs > 0 else run_once(args)


if __name__ == "__main__":
    main()
