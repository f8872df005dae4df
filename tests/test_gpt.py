"""
The GPT model: parameter/FLOP tables (HEAD recipe, and the spec's SEED table derived from it), shapes, init,
windows, smear/KV-cache exactness, the optimizer groups, and a tiny model that learns.
"""

import copy
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt

from nanochat.gpt import GPT, GPTConfig, config_from_depth, compute_window_sizes, has_value_embedding, short_window_size
from nanochat.engine import KVCache
from conftest import make_tiny_model


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: tiny tensors run faster on one thread


def meta_model(depth, **kw):
    with torch.device("meta"):
        return GPT(config_from_depth(depth, **kw))


def tiny(vocab=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, T=64, pattern="SL", seed=0, noise=0.0):
    model = make_tiny_model(vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                            sequence_len=T, window_pattern=pattern, seed=seed)
    if noise:  # zero-initialized projections make a fresh model nearly trivial; perturb to test real numerics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    return model


# -------------------------------------------------------------------------------------------------
# parameter counts and FLOPs per token (V = 32768, T = 2048, SSSL, aspect 64, head dim 128)

# What our (HEAD recipe) model produces. HEAD differences vs the SEED table: ve_gate reads 12 channels instead of
# 32 (n_ve*20*H fewer transformer params), scalars add smear_gate (24) + smear_lambda + backout_lambda (+26), the
# short window is 512 instead of 1024, and FLOPs count the smear_gate matmul (24 weights).
HEAD_TABLE = {
    # depth: (transformer_matrices, scaling params, total params, FLOPs/token)
    12: (84_935_088, 110_100_912, 286_261_730, 759_696_048),
    20: (393_217_200, 435_160_240, 896_533_746, 2_886_212_784),
    24: (679_478_976, 729_810_624, 1_384_122_122, 4_775_225_616),
    26: (863_897_580, 918_423_532, 1_681_786_938, 5_991_051_288),
}

# The spec's SEED table (model_training.md 1.7); FLOPs there are rounded to 5 significant digits, except d24 which
# the leaderboard pins exactly (4,945,112,064 = total_training_flops / (524288 * 16704)).
SEED_TABLE = {
    12: (84_935_808, 110_101_632, 286_262_424, 8.0217e8),
    20: (393_219_200, 435_162_240, 896_535_720, 3.0042e9),
    24: (679_481_856, 729_813_504, 1_384_124_976, 4_945_112_064),
    26: (863_900_960, 918_426_912, 1_681_790_292, 6.1853e9),
}


@pytest.mark.parametrize("depth", [12, 20, 24, 26])
def test_head_param_and_flops_table(depth):
    model = meta_model(depth)
    counts = model.num_scaling_params()
    tm, scaling, total, flops = HEAD_TABLE[depth]
    assert counts["transformer_matrices"] == tm
    assert counts["transformer_matrices"] + counts["lm_head"] == scaling
    assert counts["total"] == total
    assert model.estimate_flops() == flops
    L = depth
    assert counts["scalars"] == 2 * L + 26
    assert counts["wte"] == counts["lm_head"] == 32768 * model.config.n_embd


def test_head_d24_matches_spec_reference():
    # spec 1.9: "HEAD d24 reference numbers (T=2048, SSSL, short=512): scaling params 729,810,624; FLOPs/token 4.7752e9"
    model = meta_model(24)
    c = model.num_scaling_params()
    assert c["transformer_matrices"] + c["lm_head"] == 729_810_624
    assert f"{model.estimate_flops():.4e}" == "4.7752e+09"


@pytest.mark.parametrize("depth", [12, 20, 24, 26])
def test_seed_table_reproduced_from_our_counts(depth):
    """Derive SEED's numbers from ours by undoing the HEAD changes explicitly; must equal the spec's table."""
    model = meta_model(depth)
    c = model.num_scaling_params()
    cfg = model.config
    L, C, H, T = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.sequence_len
    D = C // H
    n_ve = sum(has_value_embedding(i, L) for i in range(L))
    seed_tm = c["transformer_matrices"] + n_ve * (32 - 12) * H   # ve_gate (H, 32) instead of (H, 12)
    seed_scaling = seed_tm + c["lm_head"]
    seed_total = c["total"] + n_ve * (32 - 12) * H - 26           # no smear/backout scalars
    pattern = "SSSL"
    seed_windows = [T if (pattern[i % 4] == "L" or i == L - 1) else T // 2 for i in range(L)]  # SEED short = T/2
    seed_flops = 6 * seed_scaling + sum(12 * H * D * min(w, T) for w in seed_windows)
    tm, scaling, total, flops = SEED_TABLE[depth]
    assert (seed_tm, seed_scaling, seed_total) == (tm, scaling, total)
    if isinstance(flops, int):
        assert seed_flops == flops
    else:
        assert float(f"{seed_flops:.4e}") == flops


def test_closed_form_and_matmul_params():
    model = meta_model(12)
    c = model.num_scaling_params()
    L, C, H = 12, 768, 6
    assert c["transformer_matrices"] == 12 * L * C * C + 6 * 12 * H
    assert c["value_embeds"] == 6 * 32768 * C
    # matmul params = every Linear: lm_head, block linears (incl. ve_gates), smear_gate
    assert model.num_matmul_params() == c["lm_head"] + c["transformer_matrices"] + 24


def test_depth_to_shape():
    assert [(config_from_depth(d).n_embd, config_from_depth(d).n_head) for d in (12, 20, 24, 26, 32)] == \
           [(768, 6), (1280, 10), (1536, 12), (1664, 13), (2048, 16)]
    assert config_from_depth(25).n_embd == 1664  # odd depth nudged up to a multiple of the head dim
    with pytest.raises(ValueError):
        config_from_depth(0)


# -------------------------------------------------------------------------------------------------
# structure

def test_windows_and_value_embedding_layers():
    assert short_window_size(2048) == 512
    assert short_window_size(512) == 128
    assert short_window_size(64) == 16  # tiny contexts keep a real short window
    windows = compute_window_sizes(config_from_depth(26))
    longs = [i for i, (w, _) in enumerate(windows) if w == 2048]
    assert longs == [3, 7, 11, 15, 19, 23, 25]  # tiled SSSL plus the forced last layer
    assert all(w == 512 for i, (w, _) in enumerate(windows) if i not in longs)
    assert all(right == 0 for _, right in windows)
    assert [i for i in range(4) if has_value_embedding(i, 4)] == [1, 3]
    assert [i for i in range(5) if has_value_embedding(i, 5)] == [0, 2, 4]
    with pytest.raises(ValueError, match="window_pattern"):
        compute_window_sizes(GPTConfig(window_pattern="SXL"))
    assert compute_window_sizes(GPTConfig(n_layer=2, sequence_len=64, window_pattern="s"))[0] == (16, 0)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(n_embd=100, n_head=3, n_kv_head=3))
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPT(GPTConfig(n_head=6, n_kv_head=4))


def test_vocab_padding_and_logits():
    model = tiny(vocab=300)
    assert model.transformer.wte.weight.shape[0] == 320 and model.lm_head.weight.shape[0] == 320
    idx = torch.randint(0, 300, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-cap


def test_init_values():
    model = tiny(n_layer=3)
    b = model.transformer.h[0]
    assert torch.count_nonzero(b.attn.c_proj.weight) == 0 and torch.count_nonzero(b.mlp.c_proj.weight) == 0
    torch.testing.assert_close(model.resid_lambdas.data, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.data, torch.tensor([0.20, 0.125, 0.05]))
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0.0
    gate = model.transformer.h[2].attn.ve_gate.weight
    assert gate.shape == (2, 12) and gate.min() >= 0 and gate.max() <= 0.02
    assert model.transformer.h[1].attn.ve_gate is None
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.05
    assert "cos" not in model.state_dict()  # rotary tables are recomputed, never saved
    # meta construction + init is deterministic under the global seed
    other = tiny(n_layer=3)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), other.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_loss_reductions_and_ignore_index():
    model = tiny(noise=0.02)
    idx = torch.randint(0, 300, (2, 12))
    targets = idx.clone()
    targets[0, :5] = -1
    per_token = model(idx, targets=targets, loss_reduction="none")
    assert per_token.shape == (24,)
    assert torch.all(per_token[:5] == 0)
    mean = model(idx, targets=targets)
    torch.testing.assert_close(mean, per_token.sum() / 19)


@pytest.mark.parametrize("chunk_tokens", [7, 2048])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_equals_full_logits_loss(monkeypatch, reduction, chunk_tokens):
    """Loss in token chunks (7 tokens: uneven last chunk; 2048: one chunk) == cross-entropy of the full soft-capped
    logits, for the loss and every gradient, with ignored targets; 'none' is backpropagated with per-token weights,
    mean/sum (the fused SoftcapCrossEntropy) with a scale that is not 1."""
    monkeypatch.setattr(gpt, "LOSS_CHUNK_TOKENS", chunk_tokens)
    model = tiny(noise=0.02)
    full = copy.deepcopy(model)
    idx = torch.randint(0, 300, (2, 16))
    targets = torch.randint(0, 300, (2, 16))
    targets[0, :5] = -1
    loss = model(idx, targets=targets, loss_reduction=reduction)
    logits = full(idx)
    ref = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(loss, ref)
    weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_training_loss_never_keeps_full_logits_for_backward(monkeypatch):
    """Nothing of (B*T) x vocab size is saved for backward: peak memory grows with the loss chunk, not B*T*vocab."""
    monkeypatch.setattr(gpt, "LOSS_CHUNK_TOKENS", 8)
    V, B, T = 4096, 4, 32  # the batch's logits are 16 chunks, 4x the lm_head weight
    model = tiny(vocab=V, n_embd=32, n_head=2, n_kv_head=2, T=T, noise=0.02)
    idx = torch.randint(0, V, (B, T))
    for reduction in ("mean", "none"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(idx, targets=idx, loss_reduction=reduction).sum()
        assert max(saved) <= model.lm_head.weight.numel(), reduction  # a weight-sized gradient at most
        model.zero_grad(set_to_none=True)
        loss.backward()
        assert model.lm_head.weight.grad.abs().sum() > 0


def test_backward_reaches_every_parameter():
    model = tiny(noise=0.02)
    idx = torch.randint(0, 300, (2, 16))
    model(idx, targets=idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("pattern,n_kv_head", [("SL", 2), ("L", 4), ("S", 1)])
def test_kv_cache_forward_equals_full_forward(pattern, n_kv_head):
    """Chunked prefill + one-token decode through the KV cache (smear's cached embedding included) must equal
    one full forward, with sliding windows and GQA active."""
    model = tiny(T=64, pattern=pattern, n_kv_head=n_kv_head, noise=0.05, seed=1)
    idx = torch.randint(0, 300, (2, 40))
    full = model(idx)
    cache = KVCache(2, n_kv_head, 64, 16, 3, "cpu")
    outs = [model(idx[:, :20], kv_cache=cache), model(idx[:, 20:27], kv_cache=cache)]
    outs += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(27, 40)]
    assert cache.lengths == [40, 40]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)


def test_naive_generate_one_token_prompt_and_determinism():
    model = tiny(noise=0.05)
    a = list(model.generate([5], max_tokens=6, temperature=1.0, seed=3))  # one-token prompt works (smear)
    b = list(model.generate([5], max_tokens=6, temperature=1.0, seed=3))
    assert a == b and len(a) == 6 and all(0 <= t < 300 for t in a)
    greedy = list(model.generate([5, 6, 7], max_tokens=4, temperature=0.0))
    assert greedy == list(model.generate([5, 6, 7], max_tokens=4, temperature=0.0, top_k=3))


# -------------------------------------------------------------------------------------------------
# optimizer groups (spec 2.1, HEAD table), checked against a stand-in MuonAdamW that records its groups

def test_setup_optimizer_groups(monkeypatch):
    recorded = {}

    class FakeMuonAdamW:
        def __init__(self, param_groups):
            recorded["groups"] = param_groups
            self.param_groups = param_groups

    monkeypatch.setitem(sys.modules, "nanochat.optim", types.SimpleNamespace(MuonAdamW=FakeMuonAdamW))
    model = tiny(n_embd=192, n_head=3, n_kv_head=3, n_layer=2)
    opt = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28, scalar_lr=0.5)
    groups = {g["name"]: g for g in opt.param_groups}
    dscale = (192 / 768) ** -0.5
    assert groups["lm_head"]["lr"] == pytest.approx(0.008 * dscale) and groups["lm_head"]["betas"] == (0.8, 0.96)
    assert groups["lm_head"]["weight_decay"] == 0.01
    assert groups["wte"]["lr"] == pytest.approx(0.3 * dscale) and groups["wte"]["betas"] == (0.8, 0.995)
    assert groups["value_embeds"]["lr"] == pytest.approx(0.15 * dscale) and groups["value_embeds"]["weight_decay"] == 0.01
    assert groups["resid_lambdas"]["lr"] == pytest.approx(0.005) and groups["resid_lambdas"]["weight_decay"] == 0.05
    assert groups["x0_lambdas"]["betas"] == (0.96, 0.95) and groups["x0_lambdas"]["lr"] == 0.5
    assert groups["smear_backout"]["lr"] == 0.2 and len(groups["smear_backout"]["params"]) == 3
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted(shapes) and (3, 12) in shapes  # the tiny ve_gate goes to Muon too
    for g in muon:
        assert len({tuple(p.shape) for p in g["params"]}) == 1
        assert (g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.95, 5, 0.9, 0.28)
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "adamw":
            assert g["eps"] == 1e-10
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len(set(map(id, all_params))) == len(list(model.parameters()))
    # SEED-style explicit betas override the tuned ones for the groups SEED applied them to
    opt = model.setup_optimizer(adam_betas=(0.7, 0.9))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["wte"]["betas"] == (0.7, 0.9) and groups["x0_lambdas"]["betas"] == (0.96, 0.95)


def test_tiny_model_learns_with_real_optimizer():
    model = tiny(vocab=64, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, T=32, seed=0)
    opt = model.setup_optimizer(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.02)
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(15):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] - 0.5, losses
