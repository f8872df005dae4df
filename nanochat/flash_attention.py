"""
One attention entry point for training and KV-cache decoding, mirroring the Flash Attention 3 API:

    flash_attn_func(q, k, v, causal=False, window_size=(-1, -1))
    flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), cache_pos=None)

Tensors are (B, T, heads, D); k/v may have fewer heads than q (GQA). window_size = (left, right): a query at
position i sees keys in [i - left, i] (left < 0: unlimited). In the kv-cache call every row has its own length
(cache_seqlens), so one batch can decode different prompts at different positions. The fastest available backend is
chosen here and nowhere else:

  fa3   Flash Attention 3 kernels loaded through the `kernels` package (the gpu extra, which dev/setup_env.sh
        installs where nvidia-smi lists a GPU): CUDA Hopper (sm90) with bf16 compute
  flex  PyTorch FlexAttention with block-sparse masks (compiled): every other CUDA GPU. Sliding windows skip
        whole masked tiles instead of computing a dense mask
  sdpa  torch scaled_dot_product_attention: CPU / MPS. Full-context layers take the fused causal path;
        sliding windows need an explicit (dense) mask

FA3 takes per-row cache lengths natively; with flex and sdpa, rows at different positions attend through a dense
(rows, T_new, keys) mask (decoding: one query per row, so the mask is small).

The choice is printed once per device type. Tests may force a backend with set_backend_override().
"""

import os
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from nanochat.common import COMPUTE_DTYPE, print0

BACKENDS = ("fa3", "flex", "sdpa")

_backend_override = None   # None = automatic; else one of BACKENDS (tests)
_resolved = {}             # device type -> (backend, reason)


# -----------------------------------------------------------------------------------------------------
# backend resolution

@functools.cache
def _load_fa3():
    """Try once to load the FA3 kernels. Returns (module or None, reason). Failures are reported, not hidden."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    if COMPUTE_DTYPE != torch.bfloat16:
        return None, f"compute dtype is {COMPUTE_DTYPE} and FA3 kernels need bf16"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return None, f"GPU is sm{major}{minor}; the FA3 kernels target Hopper (sm90)"
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel  # optional: only Hopper GPUs use it
        module = get_kernel("varunneal/flash-attention-3").flash_attn_interface
    except Exception as e:  # missing package, offline hub, incompatible build...
        return None, f"could not load FA3 through the `kernels` package ({type(e).__name__}: {e})"
    return module, "Hopper GPU with bf16: loaded varunneal/flash-attention-3 via `kernels`"


def get_backend(device_type=None):
    """(backend, reason) used for tensors on `device_type` (default: cuda if available else cpu)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if _backend_override is not None:
        if _backend_override == "fa3":
            module, reason = _load_fa3()
            assert module is not None, f"attention backend 'fa3' forced but unavailable: {reason}"
        return _backend_override, "forced by set_backend_override()"
    if device_type not in _resolved:
        if device_type == "cuda":
            module, fa3_reason = _load_fa3()
            if module is not None:
                choice = ("fa3", fa3_reason)
            else:  # every torch we support has FlexAttention
                choice = ("flex", f"FA3 unavailable ({fa3_reason}); FlexAttention with block-sparse window masks")
        else:
            choice = ("sdpa", f"{device_type} device: PyTorch SDPA (fused causal path for full-context layers, "
                              "dense mask for sliding windows)")
        _resolved[device_type] = choice
        print0(f"Attention backend: {choice[0]} ({choice[1]})")
    return _resolved[device_type]


def set_backend_override(name):
    """Force a backend (tests): 'fa3', 'flex', 'sdpa', or None for automatic."""
    global _backend_override
    assert name is None or name in BACKENDS, f"unknown attention backend {name!r}"
    _backend_override = name


def has_fa3():
    return _load_fa3()[0] is not None


# -----------------------------------------------------------------------------------------------------
# masks shared by the non-FA3 backends

def _effective_left(window_size, Tk):
    """The window's left extent over Tk keys, or -1 when the window covers every key (no mask needed)."""
    left = window_size[0]
    return -1 if left < 0 or left >= Tk - 1 else left


def _check_window(causal, window_size):
    left, right = window_size
    if not causal and (left >= 0 or right >= 0):
        raise NotImplementedError("windowed attention is only supported with causal=True")


@functools.lru_cache(maxsize=64)
def _dense_mask(Tq, Tk, left, device):
    """Boolean (Tq, Tk) mask: query row r sits at absolute position Tk - Tq + r (queries are the newest tokens)."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos <= left) if left >= 0 else k_pos <= q_pos


# -----------------------------------------------------------------------------------------------------
# SDPA backend

def _sdpa(q, k, v, causal, window_size, q_positions=None):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D), queries aligned to the end of the keys, or, when given, at the
    per-row absolute positions q_positions (B, Tq) (rows of different lengths; keys past a row's query are masked)."""
    Tq, Tk = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    left = _effective_left(window_size, Tk)
    if q_positions is not None:
        offset = q_positions[:, :, None] - torch.arange(Tk, device=q.device)  # query position - key position
        mask = (offset >= 0) & (offset <= left) if left >= 0 else offset >= 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
    elif not causal:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif Tq == Tk and left < 0:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # fused causal kernel
    elif Tq == 1:
        # decoding one token: it may see the last left+1 keys, which are all in the past
        if left >= 0:
            k, v = k[:, :, Tk - (left + 1):], v[:, :, Tk - (left + 1):]
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(Tq, Tk, left, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------------------------------
# FlexAttention backend

@functools.cache
def _flex_attention_fn(device_type):
    # fused kernels need compilation; on CPU (tests only) the eager path is exact and needs no compiler
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


@functools.lru_cache(maxsize=64)
def _block_mask(Tq, Tk, left, device):
    offset = Tk - Tq

    def causal_window(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & (q_pos - kv_idx <= left) if left >= 0 else kv_idx <= q_pos

    return create_block_mask(causal_window, B=None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=device)


def _flex(q, k, v, causal, window_size):
    Tq, Tk = q.size(1), k.size(1)
    if not causal or Tq == 1:
        return _sdpa(q, k, v, causal, window_size)  # unmasked / single-query decode: SDPA is already optimal
    left = _effective_left(window_size, Tk)
    gqa = q.size(2) != k.size(2)
    flex = _flex_attention_fn(q.device.type)
    y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
             block_mask=_block_mask(Tq, Tk, left, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


def prepare_masks(seq_len, window_sizes, device):
    """Resolve the attention backend and build the FlexAttention block masks for full-length training sequences
    ahead of time (called by GPT.init_weights), so a torch.compile'd model only looks them up and never traces the
    backend choice (it prints) or mask construction."""
    device = torch.device(device)
    if get_backend(device.type)[0] != "flex" or device.type != "cuda":
        return
    for left, _ in window_sizes:
        _block_mask(seq_len, seq_len, _effective_left((left, 0), seq_len), device)


# -----------------------------------------------------------------------------------------------------
# public entry points

def _fa3_output(out):
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Attention over a whole sequence (training / no cache). Returns (B, T, H, D)."""
    _check_window(causal, window_size)
    backend, _ = get_backend(q.device.type)
    if backend == "fa3":
        return _fa3_output(_load_fa3()[0].flash_attn_func(q, k, v, causal=causal, window_size=window_size))
    return (_flex if backend == "flex" else _sdpa)(q, k, v, causal, window_size)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), cache_pos=None):
    """Attention of new queries over a KV cache (B, T_max, Hkv, D) whose row b holds cache_seqlens[b] tokens. The
    new k/v (if given) are written into the cache in place at [cache_seqlens[b], + T_new) of each row; the caller
    advances cache_seqlens afterwards. `cache_pos` (a python int when every row has the same length, else the list
    of lengths) avoids a device->host sync when the caller already knows them."""
    _check_window(causal, window_size)
    backend, _ = get_backend(q.device.type)
    if backend == "fa3":
        return _fa3_output(_load_fa3()[0].flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                                  causal=causal, window_size=window_size))
    lengths = cache_seqlens.tolist() if cache_pos is None else [cache_pos] if isinstance(cache_pos, int) else cache_pos
    T_new = q.size(1) if k is not None else 0  # tokens this call appends to every row
    pos, end = min(lengths), max(lengths) + T_new
    if end > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {max(lengths)} cached + {T_new} new tokens > cache length {k_cache.size(1)}")
    if pos + T_new == end:  # every row at the same position: contiguous writes, the backends' own causal masks
        if k is not None:
            k_cache[:, pos:end] = k.to(k_cache.dtype)
            v_cache[:, pos:end] = v.to(v_cache.dtype)
        return (_flex if backend == "flex" else _sdpa)(q, k_cache[:, :end], v_cache[:, :end], causal, window_size)
    # rows at different positions (a batch of different prompts): scatter the new k/v, mask per row. The queries
    # are each row's last q.size(1) tokens once the new ones are in.
    q_positions = cache_seqlens[:, None].long() + torch.arange(T_new - q.size(1), T_new, device=q.device)
    if k is not None:
        rows = torch.arange(q.size(0), device=q.device)[:, None]
        k_cache[rows, q_positions] = k.to(k_cache.dtype)
        v_cache[rows, q_positions] = v.to(v_cache.dtype)
    return _sdpa(q, k_cache[:, :end], v_cache[:, :end], causal, window_size, q_positions=q_positions)
