"""
The GPT model (the architecture behind the 1.65 h time-to-GPT-2 record).

- rotary position embeddings (base 100k, split-halves pairing), no positional table
- QK-norm (parameter-free RMS norm per head) followed by a fixed x1.2 scale of q and k
- ReLU^2 MLP, no biases, no learnable norm gains, untied token embedding / lm_head
- value embeddings on alternating layers (always the last), mixed into v through a 3*sigmoid gate
- per-layer residual and x0 lambdas, "smear" of the previous token's embedding, "backout" of the mid stream
- sliding-window attention by a pattern string (S = short window, L = full), last layer always full
- logits soft-capped at 15, vocab padded to a multiple of 64
- explicit compute dtype (nanochat.common.COMPUTE_DTYPE): fp32 master weights cast per matmul, no autocast
- the training loss is computed in token chunks (lm_head, soft-cap, cross-entropy), so the (B*T, vocab) fp32
  logits never exist at once. The kernel of a mean/sum loss is a device decision (common.choose_loss_kernel): "fused"
  computes each chunk's exact gradient in the forward pass (SoftcapCrossEntropy), "cross_entropy" recomputes the
  chunk in backward, as per-token losses always do
- built on the meta device, then `to_empty(device=...)` and `init_weights()`
"""

import math
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.common import COMPUTE_DTYPE, print0, choose_loss_kernel
from nanochat.flash_attention import flash_attn_func, flash_attn_with_kvcache, prepare_masks
from nanochat.optim import MuonAdamW

# Tuned constants of the recipe
VE_GATE_CHANNELS = 12      # the value-embedding gate reads this many leading channels of the block input
VE_GATE_RANGE = 3.0        # gate = 3 * sigmoid(.) in (0, 3)
SMEAR_CHANNELS = 24        # the smear gate reads this many leading channels of the embedding
QK_SCALE = 1.2             # q and k are multiplied by this after QK-norm (attention logits x1.44)
ROPE_BASE = 100_000
ROPE_CACHE_MULTIPLE = 10   # rotary tables cover 10x the training context (generation can run past it)
LOGIT_SOFTCAP = 15.0
LOSS_CHUNK_TOKENS = 2048  # tokens per loss chunk: 2048 x 32768 fp32 logits = 256 MiB per copy


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6          # query heads
    n_kv_head: int = 6       # key/value heads (GQA when smaller than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"


def config_from_depth(depth, aspect_ratio=64, head_dim=128, max_seq_len=2048, vocab_size=32768, window_pattern="SSSL"):
    """The shape base_train derives from --depth: width = depth*aspect nudged up to a multiple of head_dim."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    base_dim = depth * aspect_ratio
    model_dim = math.ceil(base_dim / head_dim) * head_dim
    num_heads = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern)


def short_window_size(sequence_len):
    """Left window of S layers: a quarter of the context rounded up to 128 (kernel tiles); 2048 -> 512.
    For tiny contexts (< 512) that rounding would swallow the whole context and silently turn every S layer
    into an L layer, so there we use a plain quarter (our own choice; identical for T >= 512)."""
    w = math.ceil(sequence_len / 4 / 128) * 128
    if w >= sequence_len:
        w = max(1, sequence_len // 4)
    return w


def compute_window_sizes(config):
    """One (left, right) window per layer, as the FA3 API wants it. L = (T, 0): full causal context."""
    pattern = config.window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"window_pattern must be a non-empty string of S and L characters, got {config.window_pattern!r}")
    T = config.sequence_len
    sizes = {"L": (T, 0), "S": (short_window_size(T), 0)}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = sizes["L"]  # the final layer always sees the whole context
    return windows


def has_value_embedding(layer_idx, n_layer):
    """Alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def norm(x):
    # parameter-free RMS norm (eps = dtype's machine epsilon)
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """x: (B, T, H, D). Split-halves pairing; rotates by -theta (kept for checkpoint compatibility, only
    relative rotations between q and k matter)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1)


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the activation dtype for the matmul (replaces autocast)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Embedding(nn.Embedding):
    """An embedding table left unset at construction: init_weights() sets it (and on the meta device torch's own
    initialization would import the compiler, ~2 s of an eager run's start-up)."""

    def reset_parameters(self):
        pass


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, D = config.n_embd, self.head_dim
        self.c_q = Linear(C, self.n_head * D)
        self.c_k = Linear(C, self.n_kv_head * D)
        self.c_v = Linear(C, self.n_kv_head * D)
        self.c_proj = Linear(C, C)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embedding(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: mix this layer's value embedding into v, per kv-head gate in (0, 3)
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE  # QK-norm after RoPE
        if kv_cache is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                        causal=True, window_size=window_size, cache_pos=kv_cache.lengths)
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)  # every layer has written its k/v at [pos, pos+T)
        y = y.contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


class SoftcapCrossEntropy(torch.autograd.Function):
    """Sum over non-ignored targets (-1) of the cross-entropy of the soft-capped logits x @ weight[:vocab_size].T,
    in chunks of LOSS_CHUNK_TOKENS. The loss is a scalar, so its gradient is known in forward: each chunk's
    gradients are computed there and its logits dropped. Peak memory is two chunks of logits, and the lm_head costs
    three matmuls, as unchunked (checkpointing would recompute the logits: a fourth).
    A chunk's logits are laid out (vocab, tokens), where the three matmuls run fastest on CPU, and the cap is
    15 tanh(z/15) = 30 sigmoid(2z/15) - 15 (torch's CPU sigmoid is 3x faster than its tanh). The softmax ignores
    the -15 (it is shift-invariant) and needs no max: 30 sigmoid(.) lies in [0, 30], so its exp cannot overflow."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size):
        w = weight[:vocab_size].to(x.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)
        for start in range(0, x.size(0), LOSS_CHUNK_TOKENS):
            rows = slice(start, start + LOSS_CHUNK_TOKENS)
            valid = (targets[rows] != -1).unsqueeze(1)
            tc = targets[rows].clamp(min=0).unsqueeze(0)
            xc = x[rows] * valid  # an ignored target's token adds nothing to grad_w
            u = (w @ xc.t()).float().mul_(2 / LOGIT_SOFTCAP).sigmoid_()  # capped logits = 30u - 15
            p = u.mul(2 * LOGIT_SOFTCAP).exp_()
            total = p.sum(dim=0, keepdim=True)
            loss = loss + ((total.log() - 2 * LOGIT_SOFTCAP * u.gather(0, tc)) * valid.t()).sum()
            p.div_(total).scatter_add_(0, tc, torch.full_like(tc, -1, dtype=p.dtype))  # d loss / d capped = softmax - one-hot
            p = p.mul_(u.addcmul_(u, u, value=-1)).to(x.dtype)  # d capped / d logits = 1 - tanh^2 = 4u(1 - u)
            grad_x[rows] = (p.t() @ w) * (4 * valid)
            grad_w[:vocab_size].add_(p @ (4 * xc))  # compiled, add_(alpha=4) into this slice lost the 4 (torch 2.13)
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss, None, None


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        super().__init__()
        C, H, Hkv, L = config.n_embd, config.n_head, config.n_kv_head, config.n_layer
        if L < 1:
            raise ValueError(f"n_layer must be >= 1, got {L}")
        if C % H != 0:
            raise ValueError(f"n_embd={C} must be divisible by n_head={H}")
        if Hkv < 1 or H % Hkv != 0:
            raise ValueError(f"n_head={H} must be a multiple of n_kv_head={Hkv}")
        if (C // H) % 2 != 0:
            raise ValueError(f"head dim {C // H} must be even for rotary embeddings")
        if C < max(SMEAR_CHANNELS, VE_GATE_CHANNELS):
            raise ValueError(f"n_embd={C} must be >= {SMEAR_CHANNELS} (smear/value-embedding gates read that many channels)")
        self.config = config
        self.window_sizes = compute_window_sizes(config)
        # pad the vocab so the embedding/unembedding matmuls get tile-friendly shapes; logits are sliced back
        V = config.vocab_size
        self.padded_vocab_size = math.ceil(V / pad_vocab_size_to) * pad_vocab_size_to
        if self.padded_vocab_size != V:
            print0(f"Padding vocab size from {V} to {self.padded_vocab_size} (multiple of {pad_vocab_size_to})")
        Vp = self.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(Vp, C),
            h=nn.ModuleList([Block(config, i) for i in range(L)]),
        ))
        self.lm_head = Linear(C, Vp)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = Hkv * (C // H)
        self.value_embeds = nn.ModuleDict({str(i): Embedding(Vp, kv_dim) for i in range(L) if has_value_embedding(i, L)})
        # rotary tables: non-persistent (computed by init_weights, never in checkpoints)
        rotary_shape = (1, ROPE_CACHE_MULTIPLE * config.sequence_len, 1, C // H // 2)
        self.register_buffer("cos", torch.empty(rotary_shape, dtype=COMPUTE_DTYPE), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_shape, dtype=COMPUTE_DTYPE), persistent=False)

    # ------------------------------------------------------------------------------------------------
    # initialization

    @torch.no_grad()
    def init_weights(self):
        C, L = self.config.n_embd, self.config.n_layer
        s = 3 ** 0.5 * C ** -0.5  # uniform bound with std 1/sqrt(C)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            for lin in (attn.c_q, attn.c_k, attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(attn.c_proj.weight)  # every block starts as the identity
            nn.init.uniform_(mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(mlp.c_proj.weight)
            if attn.ve_gate is not None:
                nn.init.uniform_(attn.ve_gate.weight, 0.0, 0.02)  # gates start slightly above 1.5
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        depth_frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        cos, sin = self._precompute_rotary_embeddings(self.cos.size(1), self.config.n_embd // self.config.n_head,
                                                      device=self.cos.device)
        self.cos, self.sin = cos, sin
        prepare_masks(self.config.sequence_len, self.window_sizes, self.cos.device)  # no-op unless FlexAttention
        self.loss_kernel = choose_loss_kernel(self.cos.device.type)  # here: a compiled forward must not print
        # embeddings are only looked up, never matmul'd: store them in the compute dtype to halve their memory.
        # fp16 is the exception: GradScaler cannot unscale fp16 gradients, so fp16 runs keep fp32 tables.
        if COMPUTE_DTYPE != torch.float16:
            self.transformer.wte.to(dtype=COMPUTE_DTYPE)
            for ve in self.value_embeds.values():
                ve.to(dtype=COMPUTE_DTYPE)

    def to_empty(self, *, device, recurse=True):
        """As nn.Module.to_empty, without torch.empty_like of meta tensors: its first call imports sympy (~0.7 s)."""
        return self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), recurse=recurse)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=ROPE_BASE, device=None):
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(COMPUTE_DTYPE), freqs.sin().to(COMPUTE_DTYPE)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2) broadcasts over (B, T, H, D/2)

    def get_device(self):
        return self.transformer.wte.weight.device

    # ------------------------------------------------------------------------------------------------
    # parameter counts and FLOPs

    def num_scaling_params(self):
        """Parameter breakdown. Scaling params for the training horizon = transformer_matrices + lm_head."""
        wte = self.transformer.wte.weight.numel()
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = self.lm_head.weight.numel()
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                          self.smear_lambda, self.backout_lambda))
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        assert total == sum(p.numel() for p in self.parameters()), "parameter breakdown misses a parameter"
        return dict(wte=wte, value_embeds=value_embeds, lm_head=lm_head,
                    transformer_matrices=transformer_matrices, scalars=scalars, total=total)

    def num_matmul_params(self):
        """Weights that take part in a matmul. Counted structurally over every nn.Linear (fp8 modules included,
        they subclass nn.Linear), so the count is the same before and after fp8 conversion."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention (PaLM convention,
        causality not halved; each layer attends over min(window, T) keys). Embedding lookups are free."""
        C, H = self.config.n_embd, self.config.n_head
        D = C // H
        attention = sum(12 * H * D * min(window, self.config.sequence_len) for window, _ in self.window_sizes)
        return 6 * self.num_matmul_params() + attention

    # ------------------------------------------------------------------------------------------------
    # optimizer

    def setup_optimizer(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                        adam_betas=None, scalar_lr=0.5, compile=False):
        """Muon for every matrix inside the blocks (grouped by shape), AdamW for the rest.
        adam_betas=None keeps the tuned per-group betas; a (beta1, beta2) pair overrides them for the
        lm_head, wte, value-embedding and resid-lambda groups (--adam-beta1/--adam-beta2).
        compile=True runs the optimizer math compiled (pass the same decision as for the model)."""
        C = self.config.n_embd
        dmodel_lr_scale = (C / 768) ** -0.5  # AdamW LRs were tuned at width 768
        print0(f"Scaling the LR for the AdamW parameters proportional to 1/sqrt({C}/768) = {dmodel_lr_scale:.6f}")

        def betas(default):
            return tuple(adam_betas) if adam_betas is not None else default

        def adamw(name, params, lr, betas_, wd):
            return dict(kind="adamw", name=name, params=list(params), lr=lr, betas=betas_, eps=1e-10, weight_decay=wd)

        groups = [
            adamw("lm_head", [self.lm_head.weight], unembedding_lr * dmodel_lr_scale, betas((0.8, 0.96)), 0.01),
            adamw("wte", [self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, betas((0.8, 0.995)), 0.001),
            adamw("value_embeds", self.value_embeds.parameters(), embedding_lr * dmodel_lr_scale * 0.5,
                  betas((0.8, 0.995)), 0.01),
            adamw("resid_lambdas", [self.resid_lambdas], scalar_lr * 0.01, betas((0.8, 0.95)), 0.05),
            adamw("x0_lambdas", [self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            # fixed LR, deliberately not scaled with the batch size
            adamw("smear_backout", [self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        by_shape = {}
        for p in self.transformer.h.parameters():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape in sorted(by_shape):
            groups.append(dict(kind="muon", name=f"muon_{'x'.join(map(str, shape))}", params=by_shape[shape],
                               lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        groups = [g for g in groups if g["params"]]
        covered = sum(p.numel() for g in groups for p in g["params"])
        assert covered == sum(p.numel() for p in self.parameters()), "optimizer groups must cover every parameter"
        return MuonAdamW(groups, compile=compile)  # each group's initial_lr = its lr

    # ------------------------------------------------------------------------------------------------
    # forward

    def _smear(self, x, kv_cache):
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1} using pre-smear embeddings.
        With a KV cache the previous embedding of the last forward is kept, so decoding one token at a time
        (or prefilling in chunks) gives exactly what one full forward gives."""
        prev = kv_cache.prev_embedding if kv_cache is not None else None
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if prev is not None:
            out = x + gate * torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        elif x.size(1) > 1:
            out = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        else:
            out = x  # first token of a sequence has no predecessor
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:].detach().clone()
        return out

    def _rotary(self, T, kv_cache):
        """cos/sin of the next T positions: (1, T, 1, D/2) when every row is at the same position, else gathered
        per row, (B, T, 1, D/2) (a KV cache holding different prompts)."""
        lengths = [0] if kv_cache is None else kv_cache.lengths
        start, end = min(lengths), max(lengths) + T
        assert end <= self.cos.size(1), f"sequence of {end} tokens exceeds the rotary cache ({self.cos.size(1)})"
        if start + T == end:
            return self.cos[:, start:end], self.sin[:, start:end]
        positions = kv_cache.cache_seqlens[:, None].long() + torch.arange(T, device=self.cos.device)
        return self.cos[0, positions], self.sin[0, positions]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        cos_sin = self._rotary(T, kv_cache)

        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))
        x = self._smear(x, kv_cache)
        x0 = x
        L = self.config.n_layer
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == L // 2:
                x_mid = x
        x = x - self.backout_lambda.to(x.dtype) * x_mid  # "backout": remove part of the mid-depth stream
        x = norm(x)
        if targets is None:
            return self._logits(x)
        x, targets = x.reshape(B * T, -1), targets.reshape(-1)
        assert loss_reduction in ("mean", "sum", "none"), f"loss_reduction must be mean, sum or none, got {loss_reduction!r}"
        # fp8 replaces lm_head by a Float8Linear, whose own matmuls the fused loss would bypass
        if (loss_reduction != "none" and torch.is_grad_enabled() and type(self.lm_head) is Linear
                and self.loss_kernel == "fused"):
            loss = SoftcapCrossEntropy.apply(x, self.lm_head.weight, targets, self.config.vocab_size)
        else:
            # chunk by chunk; with gradients, checkpointing drops each chunk's logits and recomputes them in backward
            token_losses = self._token_losses
            if torch.is_grad_enabled():
                token_losses = functools.partial(checkpoint, self._token_losses, use_reentrant=False)
            losses = torch.cat([token_losses(xc, tc) for xc, tc in zip(x.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS))])
            if loss_reduction == "none":
                return losses
            loss = losses.sum()
        return loss if loss_reduction == "sum" else loss / (targets != -1).sum()  # mean over non-ignored targets

    def _logits(self, x):
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    def _token_losses(self, x, targets):
        return F.cross_entropy(self._logits(x), targets, ignore_index=-1, reduction="none")

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 generation without a KV cache (what the Engine is tested against). Yields ints."""
        assert isinstance(tokens, list) and len(tokens) > 0
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()
