"""
--device-batch-size=auto: the largest micro-batch (sequences per device per micro-step) that fits the device.

The training scripts plan the total batch (tokens per optimizer step) without it; the micro-batch only decides how
many gradient-accumulation steps make up that total, so a run's result does not depend on the card it ran on. The
candidates are the sizes of LADDER that split the planned sequences per rank evenly.

- CUDA: the candidates are tried from the largest down on a throwaway model and optimizer of the run's shape
  (compiled and fp8 when the run is), two training steps each: the second runs with the optimizer state allocated,
  as every later step does. A candidate that runs out of memory is freed and the next smaller one tried. The ranks
  agree after every forward + backward, so all of them pick the same size.
- CPU / MPS: running out of memory there is no exception but the OS killing the process, so the size comes from an
  estimate of the memory a token costs (an over-estimate: CPU steps measured at d4 and d8 used about half of it)
  against the RAM available to each process on this machine.
"""

import os
import gc

import psutil
import torch

from nanochat.common import print0, peak_memory_mib, is_ddp_initialized, int_in
from nanochat.training import any_rank
from nanochat.errors import NanochatError
from nanochat.gpt import GPT

LADDER = (64, 32, 16, 8, 4, 2, 1)


def positive_int_or_auto(text):
    """argparse type of --device-batch-size: 'auto' or an integer >= 1 (anything else: argparse's one error line)."""
    return text if text == "auto" else int_in("[1, inf)")(text)


def candidate_sizes(sequences_per_rank):
    """The LADDER sizes that divide the sequences each rank processes per optimizer step, largest first."""
    return [b for b in LADDER if b <= sequences_per_rank and sequences_per_rank % b == 0] or [1]


def auto_device_batch_size(config, device, seq_len, sequences_per_rank, use_compile=False, fp8_recipe=None):
    """The micro-batch for --device-batch-size=auto, the same on every rank; prints the decision."""
    sizes = candidate_sizes(sequences_per_rank)
    if device.type == "cuda":
        return search_device_batch_size(config, device, seq_len, sizes, use_compile, fp8_recipe)
    return estimate_device_batch_size(config, device, seq_len, sizes)


def search_device_batch_size(config, device, seq_len, sizes, use_compile=False, fp8_recipe=None):
    """Try each size (largest first) on a throwaway model and optimizer; the first that trains two steps wins."""
    model, optimizer = _throwaway_model(config, device, use_compile, fp8_recipe)
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    out_of_memory, chosen, peak = [], None, None
    for size in sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if _trains(step_model, optimizer, size, seq_len, config.vocab_size, device):
            chosen, peak = size, peak_memory_mib(device.type)
            break
        out_of_memory.append(size)
    del model, optimizer, step_model
    _release_memory(device, use_compile)
    if chosen is None:
        raise NanochatError(f"--device-batch-size=auto: even 1 sequence of {seq_len} tokens per micro-step runs "
                            "out of memory on this device; use a smaller model (--depth) or a shorter --max-seq-len")
    total = f" of {torch.cuda.get_device_properties(device).total_memory / 2**20:,.0f}" if device.type == "cuda" else ""
    print0(f"Device batch size: auto -> {chosen} (the largest of {sizes} whose forward, backward and optimizer step "
           f"fit{' compiled' if use_compile else ''}: peak {peak:,.0f}{total} MiB"
           f"{'; out of memory at ' + ', '.join(map(str, out_of_memory)) if out_of_memory else ''})")
    return chosen


def _throwaway_model(config, device, use_compile, fp8_recipe):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if fp8_recipe is not None:
        from nanochat import fp8  # only fp8 runs need it
        fp8.convert_to_float8_training(model, recipe=fp8_recipe, device=device)
    return model, model.setup_optimizer(compile=use_compile)


def _trains(model, optimizer, size, seq_len, vocab_size, device):
    """True when two training steps at this size run without running out of memory on any rank."""
    tokens = torch.randint(0, vocab_size, (size, seq_len), device=device)  # inputs and targets alike
    for _ in range(2):
        try:
            model(tokens, tokens).backward()
            out_of_memory = False
        except torch.OutOfMemoryError:
            out_of_memory = True
        if any_rank(out_of_memory, device):  # before the optimizer step, whose collectives every rank must join
            optimizer.zero_grad(set_to_none=True)
            _release_memory(device)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return True


def _release_memory(device, compiled=False):
    if compiled:
        torch.compiler.reset()  # the compiled graphs of the throwaway model (the run compiles its own)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # the run reports its own peak


def estimate_device_batch_size(config, device, seq_len, sizes):
    """The largest size whose estimated memory fits in this process's share of the available RAM."""
    with torch.device("meta"):
        num_params = sum(p.numel() for p in GPT(config).parameters())
    # weights, gradients and optimizer state: ~16 bytes a parameter. A token: the loss chunk's vocab-wide rows and
    # each layer's activations, with SDPA's dense window masks on CPU
    token_bytes = 8 * config.vocab_size + config.n_layer * (128 * config.n_embd + 8 * config.n_head * seq_len)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    budget = psutil.virtual_memory().available / local_ranks - 16 * num_params
    fitting = [b for b in sizes if b * seq_len * token_bytes <= budget]
    chosen = fitting[0] if fitting else sizes[-1]
    if is_ddp_initialized():  # nodes may differ in RAM: the smallest choice fits them all
        chosen = torch.tensor(chosen, device=device)
        torch.distributed.all_reduce(chosen, op=torch.distributed.ReduceOp.MIN)
        chosen = int(chosen.item())
    print0(f"Device batch size: auto -> {chosen} (the largest of {sizes} that fits in {device.type} memory, estimated: "
           f"{seq_len * token_bytes / 2**20:,.0f} MiB a sequence, {max(budget, 0) / 2**20:,.0f} MiB available to each "
           "process after weights and optimizer state)")
    return chosen
