"""
Every attention backend that runs here (SDPA; FlexAttention in eager mode on CPU; FA3 when loadable) against a
naive float64 reference: causal, sliding windows, GQA, training forward/backward and KV-cache decoding.
"""

import pytest
import torch

from nanochat import flash_attention as fa


def _backends_here():
    backends = ["sdpa", "flex"]
    if torch.cuda.is_available() and fa.has_fa3():
        backends.append("fa3")
    return backends


BACKENDS = _backends_here()
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.usefixtures("single_thread")]  # conftest.py: tiny tensors run faster on one thread
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def backend(request):
    fa.set_backend_override(request.param)
    yield request.param
    fa.set_backend_override(None)


def naive_attention(q, k, v, window_left=-1):
    """Reference: queries are the last Tq positions of Tk keys; query at absolute position p sees keys
    j <= p with p - j <= window_left (window_left < 0: unlimited). float64, explicit GQA head repetition."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5
    q_pos = torch.arange(Tk - Tq, Tk)[:, None]
    k_pos = torch.arange(Tk)[None, :]
    allowed = k_pos <= q_pos
    if window_left >= 0:
        allowed &= (q_pos - k_pos) <= window_left
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _dtype(backend):
    return torch.bfloat16 if backend == "fa3" else torch.float32


def _tol(backend):
    return dict(atol=2e-2, rtol=2e-2) if backend == "fa3" else dict(atol=2e-5, rtol=2e-5)


CASES = [
    # (B, T, H, Hkv, D, window_left)
    (2, 64, 4, 4, 16, 64),     # L layer: window = T (full)
    (2, 64, 4, 4, 16, -1),     # unlimited
    (1, 64, 4, 4, 16, 8),      # sliding window
    (2, 48, 8, 2, 16, 13),     # GQA + window + T not a multiple of the window
    (1, 32, 4, 1, 32, -1),     # multi-query attention
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("B,T,H,Hkv,D,w", CASES)
def test_training_forward_matches_reference(backend, B, T, H, Hkv, D, w):
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=_dtype(backend))
    k = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=_dtype(backend))
    v = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=_dtype(backend))
    y = fa.flash_attn_func(q, k, v, causal=True, window_size=(w, 0))
    assert y.shape == (B, T, H, D) and y.dtype == q.dtype
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, w), **_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("w", [-1, 8])
def test_training_backward_matches_reference(backend, w):
    if backend == "flex" and DEVICE == "cpu":
        pytest.skip("FlexAttention has no backward on CPU (torch raises NotImplementedError); its forward is tested")
    torch.manual_seed(1)
    B, T, H, Hkv, D = 2, 40, 4, 2, 16
    dt = _dtype(backend)
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=dt, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=dt, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=dt, requires_grad=True)
    g = torch.randn(B, T, H, D, device=DEVICE, dtype=dt)
    fa.flash_attn_func(q, k, v, causal=True, window_size=(w, 0)).backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    naive_attention(q2, k2, v2, w).backward(g.double())
    tol = dict(atol=5e-2, rtol=5e-2) if backend == "fa3" else dict(atol=1e-4, rtol=1e-4)
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("Hkv,w", [(4, -1), (4, 8), (2, 5), (1, 64)])
def test_kvcache_prefill_chunk_and_decode(backend, Hkv, w):
    """Prefill 16 tokens, then a chunk of 7 (queries not at position 0), then decode one token at a time; every
    step must equal full attention over everything seen so far (the window must be honoured at decode too)."""
    torch.manual_seed(2)
    B, H, D, T_max, T_total = 2, 4, 16, 64, 33
    dt = _dtype(backend)
    q = torch.randn(B, T_total, H, D, device=DEVICE, dtype=dt)
    k = torch.randn(B, T_total, Hkv, D, device=DEVICE, dtype=dt)
    v = torch.randn(B, T_total, Hkv, D, device=DEVICE, dtype=dt)
    k_cache = torch.zeros(B, T_max, Hkv, D, device=DEVICE, dtype=dt)
    v_cache = torch.zeros(B, T_max, Hkv, D, device=DEVICE, dtype=dt)
    seqlens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    chunks = [(0, 16), (16, 23)] + [(t, t + 1) for t in range(23, T_total)]
    for start, end in chunks:
        y = fa.flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, k=k[:, start:end], v=v[:, start:end],
                                       cache_seqlens=seqlens, causal=True, window_size=(w, 0))
        want = naive_attention(q[:, start:end], k[:, :end], v[:, :end], w)
        torch.testing.assert_close(y.double(), want, **_tol(backend))
        seqlens += end - start  # the caller (model) advances the cache
    torch.testing.assert_close(k_cache[:, :T_total], k)  # written in place
    assert torch.count_nonzero(k_cache[:, T_total:]) == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("Hkv,w", [(4, -1), (2, 5)])
def test_kvcache_decode_rows_at_different_positions(backend, Hkv, w):
    """Rows holding 3, 17 and 10 tokens decode together: each row's new k/v land at its own length and its query
    sees only its own keys (within the window), as if it were decoded alone."""
    torch.manual_seed(3)
    B, H, D, T_max, steps = 3, 4, 16, 32, 4
    dt = _dtype(backend)
    lengths = [3, 17, 10]
    q = torch.randn(B, steps, H, D, device=DEVICE, dtype=dt)
    k = torch.randn(B, T_max, Hkv, D, device=DEVICE, dtype=dt)
    v = torch.randn(B, T_max, Hkv, D, device=DEVICE, dtype=dt)
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)
    for row, n in enumerate(lengths):
        k_cache[row, :n], v_cache[row, :n] = k[row, :n], v[row, :n]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    for step in range(steps):
        positions = [n + step for n in lengths]
        rows = torch.arange(B)
        y = fa.flash_attn_with_kvcache(q[:, step:step + 1], k_cache, v_cache, k=k[rows, positions][:, None],
                                       v=v[rows, positions][:, None], cache_seqlens=seqlens, causal=True,
                                       window_size=(w, 0), cache_pos=positions)
        for row, pos in enumerate(positions):
            want = naive_attention(q[row:row + 1, step:step + 1], k[row:row + 1, :pos + 1], v[row:row + 1, :pos + 1], w)
            torch.testing.assert_close(y[row:row + 1].double(), want, **_tol(backend))
        seqlens += 1
    for row, n in enumerate(lengths):  # written in place, nothing past each row's end
        torch.testing.assert_close(k_cache[row, :n + steps], k[row, :n + steps])
        assert torch.count_nonzero(k_cache[row, n + steps:]) == 0


def test_kvcache_overflow_is_a_clear_error():
    q = torch.randn(1, 4, 2, 8)
    k_cache = torch.zeros(1, 6, 2, 8)
    with pytest.raises(ValueError, match="KV cache overflow"):
        fa.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k=q, v=q, cache_seqlens=torch.tensor([4], dtype=torch.int32),
                                   causal=True)


def test_backend_choice_and_override():
    assert fa.get_backend("cpu")[0] == "sdpa"
    assert fa.get_backend("mps")[0] == "sdpa"
    fa.set_backend_override("sdpa")
    try:
        assert fa.get_backend("cpu") == ("sdpa", "forced by set_backend_override()")
    finally:
        fa.set_backend_override(None)
    with pytest.raises(AssertionError):
        fa.set_backend_override("bogus")
    if not fa.has_fa3():
        fa.set_backend_override("fa3")
        try:
            with pytest.raises(AssertionError, match="unavailable"):
                fa.get_backend("cuda")
        finally:
            fa.set_backend_override(None)


def test_windowed_non_causal_is_rejected():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError):
        fa.flash_attn_func(q, q, q, causal=False, window_size=(2, 2))


def test_backend_is_announced_once(monkeypatch, capsys):
    monkeypatch.setattr(fa, "_resolved", {})
    fa.get_backend("cpu")
    fa.get_backend("cpu")
    q = torch.randn(1, 4, 2, 8)
    fa.flash_attn_func(q, q, q, causal=True)
    out = capsys.readouterr().out
    assert out.count("Attention backend: sdpa") == 1
