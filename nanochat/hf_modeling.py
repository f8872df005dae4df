"""
The nanochat GPT as a self-contained transformers model (copied next to an exported checkpoint, loaded with
trust_remote_code=True). It depends only on torch and transformers, so it must repeat the architecture of
nanochat/gpt.py: tests/test_hf.py pins the two together (logits within 1e-4, greedy generation token for token).

Parameter names are those of gpt.py, so an export is the state dict as is. Generation goes through transformers'
cache (DynamicCache); the smear needs the previous token's embedding, which rides along on the cache object.
Padding: a token's position is its count of unmasked tokens before it (attention_mask), keys at masked positions are
not attended to, and a masked token does not smear into the next, so a left-padded row gives the logits of the same
row unpadded (at its real tokens) and batched generate() gives each row what it gets alone.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

VE_GATE_CHANNELS = 12
VE_GATE_RANGE = 3.0
SMEAR_CHANNELS = 24
QK_SCALE = 1.2
ROPE_BASE = 100_000
LOGIT_SOFTCAP = 15.0


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat"
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head"}

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 sequence_len=2048, window_sizes=None, value_embed_layers=None, max_position_embeddings=20480,
                 **kwargs):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        self.sequence_len = sequence_len  # training context
        self.window_sizes = window_sizes or [sequence_len] * n_layer  # per layer: how many past keys a query sees
        self.value_embed_layers = value_embed_layers or []
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = config.window_sizes[layer_idx]
        C, kv_dim = config.n_embd, config.n_kv_head * self.head_dim
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, kv_dim, bias=False)
        self.c_v = nn.Linear(C, kv_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, masks, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(rotary(q, cos, sin)) * QK_SCALE, norm(rotary(k, cos, sin)) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[self.window], enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, masks, cache):
        x = x + self.attn(norm(x), ve, cos, sin, masks, cache)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        C, L, Vp = config.n_embd, config.n_layer, config.padded_vocab_size
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(Vp, C),
            h=nn.ModuleList([Block(config, i) for i in range(L)]),
        ))
        self.lm_head = nn.Linear(C, Vp, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, kv_dim) for i in config.value_embed_layers})
        self.post_init()

    def smear(self, x, real, cache):
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1}, over pre-smear embeddings. A padding token
        (real 0) passes nothing on, like the start of a sequence."""
        x_real = x * real[..., None].to(x.dtype)
        prev = getattr(cache, "nanochat_prev_embedding", None) if cache is not None else None
        prev = torch.zeros_like(x_real[:, :1]) if prev is None else prev
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if cache is not None:
            cache.nanochat_prev_embedding = x_real[:, -1:]
        return x + gate * torch.cat([prev, x_real[:, :-1]], dim=1)

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, labels=None, **kwargs):
        B, T = input_ids.shape
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T  # keys: the cached tokens, then these
        if attention_mask is None:
            attention_mask = torch.ones(1, S, dtype=torch.long, device=input_ids.device)  # no padding in any row
        elif attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}: "
                             f"(batch, cached + new tokens)")
        real = attention_mask.bool()
        # a token's position counts the real tokens before it, so left padding moves no real token
        key_positions = real.int().cumsum(-1) - 1
        positions = key_positions[:, past:]
        D = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, D, 2, dtype=torch.float32, device=input_ids.device) / D))
        freqs = positions[..., None].float() * inv_freq
        dtype = self.lm_head.weight.dtype
        cos, sin = freqs.cos().to(dtype)[:, :, None, :], freqs.sin().to(dtype)[:, :, None, :]
        # causal and windowed by position: a query at position p sees the real keys at positions p - window .. p. A
        # padding query sees itself only: with no key its output would be NaN, and 0 x NaN poisons the rows that mask it
        offset = positions[:, :, None] - key_positions[:, None, :]
        itself = torch.arange(S, device=input_ids.device) == torch.arange(past, S, device=input_ids.device)[:, None]
        visible = (real[:, None, :] & (offset >= 0)) | itself
        masks = {w: (visible & (offset <= w))[:, None] for w in set(self.config.window_sizes)}

        x = self.smear(norm(self.transformer.wte(input_ids)), real[:, past:], cache)
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks, cache)
            if i == self.config.n_layer // 2:
                x_mid = x
        x = norm(x - self.backout_lambda * x_mid)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        loss = None
        if labels is not None:  # transformers convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
