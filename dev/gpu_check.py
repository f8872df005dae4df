"""
Everything only a GPU can show, in one command meant to finish in under 8 minutes on one H100, printed as one
markdown table (for the README):

    python -m dev.gpu_check               # on a CUDA machine
    python -m dev.gpu_check --dry-run     # the same plumbing on CPU with tiny shapes (run by tests/test_gpu_ready.py)

The rows, in the order they run (one that would start after --budget-s seconds is listed as skipped):
  tests        the CUDA-only tests (CUDA_TESTS) on the GPU
  loss kernel  forward + backward of the chunked training loss with each kernel (common.LOSS_KERNELS), compiled, on a
               one-layer model of d20's and d24's width: time and peak memory (what common.choose_loss_kernel waits for)
  decode       KV-cache decoding of a d20 model (random weights) at batch 1, 8 and 32: tok/s
  train        base_train steps (dev.bench_train: compiled, random tokens) at d12 and d20 with the default attention
               backend and with --fp8, then every other backend that loads (fa3, flex, sdpa with --window-pattern=L):
               tok/s, MFU, peak memory
  auto batch   --device-batch-size=auto's choice for the speedrun's d24 (compiled, fp8 where the GPU has it)
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import gc
import sys
import time
import argparse
import subprocess
import dataclasses

import torch

from dev import bench_train
from nanochat import flash_attention
from nanochat.auto_batch import auto_device_batch_size
from nanochat.common import LOSS_KERNELS, synchronize
from nanochat.engine import KVCache
from nanochat.gpt import GPT, config_from_depth

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TESTS = ["tests/test_attention.py",  # every backend that loads, on the GPU
              "tests/test_gpu_ready.py::test_cuda_search_fits_under_a_memory_cap",
              "tests/test_gpu_ready.py::test_loss_kernels_agree_on_cuda",
              "tests/test_dataloader.py::test_cuda_pinned_async_copies_are_correct"]

# The shapes of a real check, and of a dry run on CPU: every row runs the same code on smaller numbers.
REAL = dict(train_depths=(12, 20), train_flags=[], train_batch=32, seq_len=2048, vocab=32768, steps=10, warmup=3,
            loss_shapes=[(20, 32), (24, 16)], decode_depth=20, decode_batches=(1, 8, 32), decode_tokens=(128, 64),
            auto_depth=24, auto_sequences=64, compile=True)
DRY = dict(train_depths=(1, 2), train_flags=["--aspect-ratio=32", "--head-dim=32"], train_batch=2, seq_len=32,
           vocab=256, steps=1, warmup=0, loss_shapes=[(1, 2), (2, 2)], decode_depth=1, decode_batches=(1, 2),
           decode_tokens=(8, 4), auto_depth=2, auto_sequences=4, compile=False)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Run every check only a GPU can answer and print one markdown table")
    parser.add_argument("--dry-run", action="store_true", help="run the plumbing on CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=420, help="start no row after this many seconds")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shapes = DRY if args.dry_run else REAL
    device_type = "cpu" if args.dry_run else "cuda"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; python -m dev.gpu_check --dry-run runs the plumbing on CPU")
    device = torch.device(device_type)
    start, rows = time.time(), []
    for check, setting, run in planned_rows(shapes, device, args.dry_run):
        if time.time() - start > args.budget_s:
            rows.append((check, setting, dict(note=f"skipped: past the {args.budget_s:.0f} s budget"), 0.0))
            continue
        t0 = time.time()
        try:
            row = run()
        except Exception as e:  # one failing check must not hide the others
            row = dict(note=f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}")
        finally:
            flash_attention.set_backend_override(None)
            release_memory(device, shapes["compile"])
        rows.append((check, setting, row, time.time() - t0))
    name = torch.cuda.get_device_name() if device_type == "cuda" else "CPU (dry run)"
    print(f"\nGPU check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}, {time.time() - start:.0f} s\n")
    print("| check | setting | result | MFU | peak memory (MiB) | time (s) |\n|---|---|---|---|---|---|")
    for check, setting, row, seconds in rows:
        mfu = f"{row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        peak = f"{row['peak']:,.0f}" if row.get("peak") is not None else ""
        result = "; ".join(x for x in (row.get("result", ""), row.get("note", "")) if x)
        print(f"| {check} | {setting} | {result} | {mfu} | {peak} | {seconds:.0f} |")
    return rows


def planned_rows(shapes, device, dry_run):
    """(check, setting, function returning the row) in the order they run."""
    rows = [("tests", "CUDA_TESTS" + (" (collected only)" if dry_run else ""), lambda: cuda_tests(dry_run))]
    for depth, batch in shapes["loss_shapes"]:
        for kernel in LOSS_KERNELS:
            rows.append(("loss kernel", f"{kernel}, d{depth} width, {batch}x{shapes['seq_len']} tokens",
                         lambda d=depth, b=batch, k=kernel: loss_kernel_row(shapes, device, d, b, k)))
    for batch in shapes["decode_batches"]:
        rows.append(("decode", f"d{shapes['decode_depth']}, batch {batch}, {shapes['decode_tokens'][0]}-token prompt",
                     lambda b=batch: decode_row(shapes, device, b)))
    default = flash_attention.get_backend(device.type)[0]
    small, large = shapes["train_depths"]
    train = [(small, default, False), (large, default, False), (large, default, True), (small, default, True)]
    train += [(depth, backend, False) for depth in (small, large) for backend in flash_attention.BACKENDS
              if backend != default]
    for depth, backend, fp8 in train[:3]:
        rows.append(train_row_spec(shapes, device, depth, backend, fp8))
    rows.append(("auto batch", f"d{shapes['auto_depth']}, {shapes['seq_len']} tokens a sequence, at most "
                 f"{shapes['auto_sequences']} sequences", lambda: auto_batch_row(shapes, device)))
    rows += [train_row_spec(shapes, device, depth, backend, fp8) for depth, backend, fp8 in train[3:]]
    return rows

# -----------------------------------------------------------------------------
# The checks

def cuda_tests(dry_run):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    out = subprocess.run(cmd + (["--collect-only"] if dry_run else []), cwd=REPO_ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=240)  # a hung test costs no more
    summary = (out.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    if out.returncode != 0:
        failed = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("FAILED", "ERROR"))]
        return dict(result=summary, note=f"exit code {out.returncode}: {' '.join(failed)[:300]}")
    return dict(result=summary)


def train_row_spec(shapes, device, depth, backend, fp8):
    window = "L" if backend == "sdpa" else "SSSL"
    batch = f"{shapes['train_batch']}x{shapes['seq_len']}"
    setting = f"d{depth}, {backend} (window {window}){', fp8' if fp8 else ''}, {batch}"
    return ("train", setting, lambda: train_row(shapes, device, depth, backend, window, fp8))


def train_row(shapes, device, depth, backend, window, fp8):
    if backend == "fa3" and not flash_attention.has_fa3():
        return dict(note=f"fa3 does not load: {flash_attention._load_fa3()[1]}")
    if backend == "flex" and device.type != "cuda":
        return dict(note="FlexAttention has no backward pass on CPU")
    if fp8:
        from nanochat.fp8 import check_fp8_support, Fp8UnsupportedError
        try:
            check_fp8_support(device)
        except Fp8UnsupportedError as e:
            return dict(note=f"no fp8: {e}")
    flash_attention.set_backend_override(backend)
    argv = [f"--device-type={device.type}", f"--depth={depth}", f"--max-seq-len={shapes['seq_len']}",
            f"--window-pattern={window}", f"--vocab-size={shapes['vocab']}",
            f"--device-batch-size={shapes['train_batch']}",
            f"--steps={shapes['steps']}", f"--warmup-steps={shapes['warmup']}",
            f"--compile={'on' if shapes['compile'] else 'off'}", *shapes["train_flags"], *(["--fp8"] if fp8 else [])]
    result = bench_train.run_once(bench_train.parse_args(argv))
    return dict(result=f"{result['tok_per_sec']:,.0f} tok/s", mfu=result["mfu"], peak=peak_mib(device))


def loss_kernel_row(shapes, device, depth, batch, kernel):
    """Forward + backward through the lm_head and the chunked loss, on a one-layer model of this depth's width."""
    config = dataclasses.replace(config_from_depth(depth, max_seq_len=shapes["seq_len"], vocab_size=shapes["vocab"]),
                                 n_layer=1)
    model = build_model(config, device)
    model.loss_kernel = kernel
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if shapes["compile"] else model
    tokens = torch.randint(0, shapes["vocab"], (batch, shapes["seq_len"]), device=device)
    times = []
    for i in range(shapes["warmup"] + max(shapes["steps"] // 2, 1)):
        synchronize(device.type)
        t0 = time.time()
        step_model(tokens, tokens).backward()
        model.zero_grad(set_to_none=True)
        synchronize(device.type)
        if i >= shapes["warmup"]:
            times.append(time.time() - t0)
    return dict(result=f"{1000 * sorted(times)[len(times) // 2]:.1f} ms forward + backward", peak=peak_mib(device))


@torch.inference_mode()
def decode_row(shapes, device, batch):
    config = config_from_depth(shapes["decode_depth"], max_seq_len=shapes["seq_len"], vocab_size=shapes["vocab"])
    model = build_model(config, device).eval()
    prompt, steps = shapes["decode_tokens"]
    cache = KVCache(batch, config.n_kv_head, prompt + steps, config.n_embd // config.n_head, config.n_layer, device)
    logits = model(torch.randint(0, shapes["vocab"], (batch, prompt), device=device), kv_cache=cache)
    synchronize(device.type)
    t0 = time.time()
    for _ in range(steps):
        logits = model(logits[:, -1:].argmax(dim=-1), kv_cache=cache)
    synchronize(device.type)
    return dict(result=f"{batch * steps / (time.time() - t0):,.0f} tok/s", peak=peak_mib(device))


def auto_batch_row(shapes, device):
    from nanochat.fp8 import check_fp8_support, Fp8UnsupportedError
    try:
        check_fp8_support(device)
        recipe = "tensorwise"
    except Fp8UnsupportedError:
        recipe = None
    config = config_from_depth(shapes["auto_depth"], max_seq_len=shapes["seq_len"], vocab_size=shapes["vocab"])
    chosen = auto_device_batch_size(config, device, shapes["seq_len"], shapes["auto_sequences"],
                                    use_compile=shapes["compile"], fp8_recipe=recipe)
    return dict(result=f"auto -> {chosen} sequences ({'fp8' if recipe else 'no fp8'})")

# -----------------------------------------------------------------------------

def build_model(config, device):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def release_memory(device, compiled):
    if compiled:
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
