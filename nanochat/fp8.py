"""
FP8 training for Linear layers (`--fp8`, `--fp8-recipe tensorwise|rowwise`) with torch._scaled_mm, no torchao.

Only GPUs with compute capability >= 8.9 (Ada, Hopper, Blackwell) have fp8 tensor cores; anywhere else
convert_to_float8_training() stops with a clear error instead of silently training in bf16.

Recipes
- tensorwise (default, fastest): one dynamic scale per tensor. Forward GEMM in e4m3 x e4m3 with fast accumulation;
  the output gradient is quantized once to e5m2 (wider range, gradients are spiky) and reused by both backward GEMMs.
  Only the fp8 tensors and their inverse scales are saved for backward (less memory than bf16).
- rowwise: one power-of-2 scale per row of each GEMM operand (along the contracted dimension), e4m3 everywhere.
  More accurate with outliers, slower at our sizes. Backward re-quantizes along the other axis, so it saves the
  high-precision input instead of the fp8 copy.

What gets converted: bias-free nn.Linear layers whose in/out features are multiples of 16 (GEMM tile constraint) and
at least 128 (tiny layers such as the value-embedding gates gain nothing and lose accuracy).

FLOPs: fp8 changes how a matmul is computed, not how many FLOPs it is. Float8Linear subclasses nn.Linear and shares
the original weight, and GPT.estimate_flops() counts matmul weights structurally over every nn.Linear, so FLOPs per
token (and the --target-flops horizon and MFU) are identical with and without --fp8. MFU stays relative to the
bf16 peak (print it as bf16_mfu): fp8 runs can exceed what a bf16 run could reach.

Evaluation (val bpb, CORE, sampling) should run inside `with disable_fp8(model):`, which makes every Float8Linear
compute in high precision with the same weights (no copies, no memory spike).
"""

import contextlib
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, NanochatError, print0

RECIPES = ("tensorwise", "rowwise")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344
MIN_FEATURES = 128


class Fp8UnsupportedError(NanochatError, RuntimeError):
    """This device cannot run fp8 GEMMs; the message says why and to drop --fp8."""


def check_fp8_support(device):
    """Raise Fp8UnsupportedError (one clear line) unless `device` can run fp8 GEMMs."""
    device = torch.device(device)
    if device.type != "cuda":
        raise Fp8UnsupportedError(f"--fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper/Blackwell); "
                                  f"this run is on {device.type}. Drop --fp8.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise Fp8UnsupportedError(f"--fp8 needs compute capability >= 8.9 but {name} is sm{major}{minor}. Drop --fp8.")
    if COMPUTE_DTYPE != torch.bfloat16:
        raise Fp8UnsupportedError(f"--fp8 needs bf16 compute but COMPUTE_DTYPE is {COMPUTE_DTYPE} "
                                  "(unset NANOCHAT_DTYPE or set it to bfloat16).")


# -----------------------------------------------------------------------------------------------------
# quantization

def quantize(x, fp8_dtype, dim=None, power_of_2=False):
    """Scale x into the fp8 range and cast. Returns (x_fp8, inverse_scale) with x ~= x_fp8 * inverse_scale.
    dim=None: one scale for the tensor (0-d); else one scale per slice along `dim` (kept as a size-1 dim)."""
    fp8_max = FP8_MAX[fp8_dtype]
    x32 = x.float()
    amax = x32.abs().amax() if dim is None else x32.abs().amax(dim=dim, keepdim=True)
    # float64 so that a tiny amax cannot overflow the scale to inf
    scale = (fp8_max / amax.double().clamp(min=1e-12)).float()
    if power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))  # exact to apply and to invert
    x_fp8 = (x32 * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x_fp8, scale.reciprocal()


def _col_major(t):
    # _scaled_mm wants its second operand column-major
    return t.t().contiguous().t()


class _TensorwiseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        # x (M, K) in the compute dtype, weight (N, K) fp32 master
        x_fp8, x_inv = quantize(x, E4M3)
        w_fp8, w_inv = quantize(weight, E4M3)
        out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        go_fp8, go_inv = quantize(grad_out, E5M2)  # once, reused by both GEMMs
        grad_x = torch._scaled_mm(go_fp8, _col_major(w_fp8), scale_a=go_inv, scale_b=w_inv,
                                  out_dtype=grad_out.dtype, use_fast_accum=False)
        grad_w = torch._scaled_mm(go_fp8.t().contiguous(), _col_major(x_fp8), scale_a=go_inv, scale_b=x_inv,
                                  out_dtype=grad_out.dtype, use_fast_accum=False)
        return grad_x, grad_w.to(ctx.weight_dtype)


class _RowwiseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        x_fp8, x_inv = quantize(x, E4M3, dim=1, power_of_2=True)          # (M, 1): per row of x over K
        w_fp8, w_inv = quantize(weight, E4M3, dim=1, power_of_2=True)     # (N, 1): per row of W over K
        out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv.flatten().unsqueeze(0), out_dtype=torch.bfloat16)
        ctx.save_for_backward(x, weight)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        # grad_x (M, K) = go (M, N) @ W (N, K): scales per row of go and per column of W (both over N)
        go_r, go_r_inv = quantize(grad_out, E4M3, dim=1, power_of_2=True)
        w_c, w_c_inv = quantize(weight, E4M3, dim=0, power_of_2=True)
        grad_x = torch._scaled_mm(go_r, _col_major(w_c), scale_a=go_r_inv, scale_b=w_c_inv, out_dtype=torch.bfloat16)
        # grad_w (N, K) = go^T (N, M) @ x (M, K): scales per column of go and per column of x (both over M)
        go_c, go_c_inv = quantize(grad_out, E4M3, dim=0, power_of_2=True)
        x_c, x_c_inv = quantize(x, E4M3, dim=0, power_of_2=True)
        grad_w = torch._scaled_mm(go_c.t().contiguous(), _col_major(x_c), scale_a=go_c_inv.flatten().unsqueeze(1), scale_b=x_c_inv,
                                  out_dtype=torch.bfloat16)
        return grad_x.to(grad_out.dtype), grad_w.to(weight.dtype)


_MATMULS = {"tensorwise": _TensorwiseMatmul, "rowwise": _RowwiseMatmul}


def fp8_linear(x, weight, recipe="tensorwise"):
    """y = x @ weight.T with fp8 GEMMs (forward and backward). x: (..., K), weight: (N, K)."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    if x2d.size(0) % 16 != 0:
        # the backward weight GEMM contracts over rows and needs a multiple of 16: fall back for odd shapes
        return F.linear(x, weight.to(x.dtype))
    out = _MATMULS[recipe].apply(x2d, weight)
    return out.reshape(*shape[:-1], weight.size(0))


# -----------------------------------------------------------------------------------------------------
# module conversion

class Float8Linear(nn.Linear):
    """nn.Linear computing in fp8. Shares the original weight Parameter, so state dicts and optimizer groups are
    unchanged by conversion."""

    @classmethod
    def from_linear(cls, linear, recipe):
        with torch.device("meta"):  # shell only: no second copy of the weight is ever allocated
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        new.recipe = recipe
        new.fp8_enabled = True
        return new

    def forward(self, x):
        if not self.fp8_enabled:
            return F.linear(x, self.weight.to(x.dtype))
        return fp8_linear(x.to(COMPUTE_DTYPE), self.weight, self.recipe)


def convert_to_float8_training(model, recipe="tensorwise", device=None):
    """Swap eligible Linear layers of `model` for Float8Linear in place. Call after init/checkpoint load and before
    torch.compile. Raises Fp8UnsupportedError on hardware without fp8 and ValueError for an unknown recipe.
    Returns the names of the converted and the skipped Linear layers (.converted, .skipped)."""
    if recipe not in RECIPES:
        raise ValueError(f"--fp8-recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    check_fp8_support(device if device is not None else next(model.parameters()).device)
    report = SimpleNamespace(recipe=recipe, converted=[], skipped=[])
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, Float8Linear):
                continue
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (child.bias is None and child.in_features % 16 == 0 and child.out_features % 16 == 0
                    and min(child.in_features, child.out_features) >= MIN_FEATURES):
                setattr(parent, child_name, Float8Linear.from_linear(child, recipe))
                report.converted.append(full_name)
            else:
                report.skipped.append(full_name)
    print0(f"FP8 ({recipe}): converted {len(report.converted)} Linear layers, skipped {len(report.skipped)} "
           f"(features not multiples of 16 or < {MIN_FEATURES})")
    return report


@contextlib.contextmanager
def disable_fp8(model):
    """Run Float8Linear layers in high precision inside the block (evaluation), restoring afterwards."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    previous = [m.fp8_enabled for m in layers]
    for m in layers:
        m.fp8_enabled = False
    try:
        yield
    finally:
        for m, state in zip(layers, previous):
            m.fp8_enabled = state

