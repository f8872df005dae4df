"""
FP8 training without torchao. On CPU: the clear error on unsupported hardware, the quantization math, the fp8 GEMMs
themselves (torch._scaled_mm runs on CPU too), module conversion/filtering, the eval switch, and that FLOPs per token
are unchanged by conversion.
"""

import pytest
import torch
import torch.nn as nn

from nanochat import fp8
from nanochat.gpt import GPT, config_from_depth
from conftest import make_tiny_model


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: tiny tensors run faster on one thread


@pytest.fixture
def no_hardware_check(monkeypatch):
    """The fp8 math runs on CPU too (torch._scaled_mm): skip the GPU capability check to exercise it here."""
    monkeypatch.setattr(fp8, "check_fp8_support", lambda device: None)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_unsupported_hardware_is_a_clear_error(monkeypatch):
    model = nn.Sequential(nn.Linear(128, 128, bias=False))
    with pytest.raises(fp8.Fp8UnsupportedError, match="compute capability >= 8.9.*Drop --fp8"):
        fp8.convert_to_float8_training(model, device="cpu")
    with pytest.raises(fp8.Fp8UnsupportedError):
        fp8.check_fp8_support("mps")
    monkeypatch.setattr(fp8, "check_fp8_support", lambda device: None)
    with pytest.raises(ValueError, match="--fp8-recipe"):
        fp8.convert_to_float8_training(model, recipe="blockwise")
    assert not isinstance(model[0], fp8.Float8Linear)  # nothing converted on failure


@pytest.mark.parametrize("fp8_dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_tensorwise(fp8_dtype):
    x = torch.randn(64, 96) * 7
    q, inv = fp8.quantize(x, fp8_dtype)
    assert q.dtype == fp8_dtype and inv.shape == ()
    assert q.float().abs().max().item() == fp8.FP8_MAX[fp8_dtype]  # amax maps exactly onto the fp8 max
    tol = 0.04 if fp8_dtype == fp8.E4M3 else 0.08  # 3 vs 2 mantissa bits
    assert rel_err(q.float() * inv, x) < tol
    zeros, inv0 = fp8.quantize(torch.zeros(4, 4), fp8_dtype)  # no inf/nan scale for an all-zero tensor
    assert torch.isfinite(inv0) and torch.count_nonzero(zeros.float()) == 0


def test_quantize_rowwise_power_of_two():
    x = torch.randn(32, 64) * torch.logspace(-3, 3, 32)[:, None]  # rows of very different magnitude
    q, inv = fp8.quantize(x, fp8.E4M3, dim=1, power_of_2=True)
    assert inv.shape == (32, 1)
    assert torch.equal(torch.log2(inv), torch.round(torch.log2(inv)))  # exact powers of two
    assert rel_err(q.float() * inv, x) < 0.05
    q_t, inv_t = fp8.quantize(x, fp8.E4M3)  # one tensor scale loses the small rows entirely
    small = slice(0, 4)
    assert rel_err((q.float() * inv)[small], x[small]) < rel_err((q_t.float() * inv_t)[small], x[small])


@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_forward_backward_close_to_high_precision(recipe, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 128, dtype=dtype, requires_grad=True)
    w = torch.randn(256, 128, requires_grad=True)
    y = fp8.fp8_linear(x, w, recipe)
    assert y.shape == (4, 16, 256) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = x_ref @ w_ref.t()
    y_ref.backward(g.float())
    assert rel_err(y, y_ref) < 0.06
    assert rel_err(x.grad, x_ref.grad) < 0.08
    assert rel_err(w.grad, w_ref.grad) < 0.08
    assert w.grad.dtype == torch.float32  # fp32 master weight gets an fp32 grad
    # and it really is quantized: not bit-identical to the high-precision result
    assert rel_err(y, y_ref) > 1e-4


def test_odd_row_count_falls_back_to_high_precision():
    x = torch.randn(3, 5, 128)
    w = torch.randn(128, 128)
    torch.testing.assert_close(fp8.fp8_linear(x, w), x @ w.t())


def tiny_model():
    return make_tiny_model(256, n_layer=2, n_embd=128, n_head=2, sequence_len=32, window_pattern="L")


def test_conversion_filter_weights_shared_and_flops_unchanged(no_hardware_check):
    model = tiny_model()
    flops_before = model.estimate_flops()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.transformer.h[0].mlp.c_fc.weight
    report = fp8.convert_to_float8_training(model, recipe="tensorwise")
    assert isinstance(model.transformer.h[0].mlp.c_fc, fp8.Float8Linear)
    assert model.transformer.h[0].mlp.c_fc.weight is weight  # shared, not copied
    assert isinstance(model.lm_head, fp8.Float8Linear)
    # too small for fp8: value-embedding gates (12 in), smear gate (24 in)
    assert "smear_gate" in report.skipped and "transformer.h.1.attn.ve_gate" in report.skipped
    assert len(report.converted) == 2 * 6 + 1
    assert model.estimate_flops() == flops_before
    assert model.state_dict().keys() == state_before.keys()  # checkpoints are interchangeable


def test_converted_model_trains_and_eval_switch(no_hardware_check):
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 256, (2, 32))
    ref_logits = model(idx)
    fp8.convert_to_float8_training(model, recipe="tensorwise")
    with fp8.disable_fp8(model):
        torch.testing.assert_close(model(idx), ref_logits)  # high precision inside the context
    fp8_logits = model(idx)
    assert not torch.equal(fp8_logits, ref_logits) and rel_err(fp8_logits, ref_logits) < 0.1
    assert all(m.fp8_enabled for m in model.modules() if isinstance(m, fp8.Float8Linear))  # restored
    loss = model(idx, targets=idx)
    loss.backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
    assert torch.isfinite(model.transformer.h[0].mlp.c_fc.weight.grad).all()


def test_real_sizes_convert_everything_but_tiny_gates(no_hardware_check):
    with torch.device("meta"):
        model = GPT(config_from_depth(24))
    flops = model.estimate_flops()
    report = fp8.convert_to_float8_training(model)
    assert len(report.converted) == 24 * 6 + 1  # all block linears + lm_head
    assert len(report.skipped) == 12 + 1       # 12 ve_gates + smear_gate
    assert model.estimate_flops() == flops
