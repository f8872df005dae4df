"""
MuonAdamW: the stacked/sharded implementation against a plain per-matrix reference, AdamW against torch's AdamW,
Muon's orthogonality, convergence, state_dict resume, 2 gloo processes == 1 process, and the state moved between
world sizes (consolidated on save, resharded on load).
"""

import os
import math
import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import optim
from nanochat.optim import MuonAdamW, POLAR_EXPRESS_COEFFS


# -----------------------------------------------------------------------------
# A deliberately simple reference: one matrix at a time, written straight from the spec (fp32 on CPU)

def reference_muon_matrix(W, g, M, S, lr, mu, beta2, wd, ns_steps):
    rows, cols = W.shape
    M.mul_(mu).add_((1 - mu) * g)
    U = (1 - mu) * g + mu * M
    target = U.norm() / math.sqrt(rows)
    for i in range(rows):
        U[i] = U[i] * (target / max(U[i].norm().item(), 1e-6))
    X = U / (U.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if rows > cols:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    X = X * (math.sqrt(min(rows, cols)) / X.norm())
    if rows >= cols:
        v = (X ** 2).mean(dim=1, keepdim=True); n = cols
    else:
        v = (X ** 2).mean(dim=0, keepdim=True); n = rows
    norm_before = (v.sum() * n).sqrt()
    S.mul_(beta2).add_((1 - beta2) * v)
    step = 1.0 / S.clamp_min(1e-10).sqrt()
    norm_after = (v * n * step ** 2).sum().sqrt()
    X = X * step * (norm_before / max(norm_after.item(), 1e-10))
    eff_lr = lr * math.sqrt(max(1.0, rows / cols))
    mask = (X * W >= 0).float()
    W.sub_(eff_lr * X + eff_lr * wd * W * mask)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(16, 8, generator=g),            # large adamw (128 numel < 1024 -> small); see big below
        "big": torch.randn(128, 16, generator=g),          # large adamw param, rows divisible by 2
        "odd": torch.randn(65, 16, generator=g),           # large adamw param, rows NOT divisible by 2 -> replicated
        "lam": torch.randn(4, generator=g),                # scalars
        "sq": [torch.randn(16, 16, generator=g) for _ in range(3)],   # muon group, K=3 (not divisible by 2)
        "tall": [torch.randn(32, 8, generator=g) for _ in range(2)],  # muon group, tall (c_fc-like, lr x2)
        "wide": [torch.randn(8, 32, generator=g) for _ in range(1)],  # muon group, wide, K=1 (rank 1 owns nothing)
    }


def to_params(raw):
    out = {}
    for k, v in raw.items():
        out[k] = [torch.nn.Parameter(t.clone()) for t in v] if isinstance(v, list) else torch.nn.Parameter(v.clone())
    return out


def build_optimizer(P, compile=False):
    groups = [
        dict(kind="adamw", params=[P["emb"], P["big"], P["odd"]], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[P["lam"]], lr=0.05, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=P["sq"], lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2),
        dict(kind="muon", params=P["tall"], lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2),
        dict(kind="muon", params=P["wide"], lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2),
    ]
    return MuonAdamW(groups, compile=compile)


def all_params(P):
    out = []
    for k in sorted(P):
        out.extend(P[k] if isinstance(P[k], list) else [P[k]])
    return out


def make_grads(step, rank, seed=100):
    """Deterministic per-(step, rank) grads matching all_params order."""
    g = torch.Generator().manual_seed(seed + 1000 * step + rank)
    return [torch.randn(p.shape, generator=g) for p in all_params(make_params())]


def set_grads(P, grads):
    for p, g in zip(all_params(P), grads):
        p.grad = g.clone()


# -----------------------------------------------------------------------------

def test_initial_lr_and_group_validation():
    P = to_params(make_params())
    opt = build_optimizer(P)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    with pytest.raises(AssertionError):
        MuonAdamW([dict(kind="muon", params=[P["sq"][0], P["tall"][0]], lr=0.1)])
    with pytest.raises(ValueError):
        MuonAdamW([dict(kind="sgd", params=[P["lam"]], lr=0.1)])


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(20, 10)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    ours = MuonAdamW([dict(kind="adamw", params=[a], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)])
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(10):
        g = torch.randn(20, 10)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_single_process_step_matches_reference():
    P = to_params(make_params())
    opt = build_optimizer(P)
    ref = {k: ([t.clone() for t in v] if isinstance(v, list) else v.clone()) for k, v in make_params().items()}
    ref_M = {k: [torch.zeros_like(t) for t in ref[k]] for k in ("sq", "tall", "wide")}
    ref_S = {k: [torch.zeros(t.shape[0], 1) if t.shape[0] >= t.shape[1] else torch.zeros(1, t.shape[1]) for t in ref[k]]
             for k in ("sq", "tall", "wide")}
    # torch AdamW serves as the AdamW reference
    ref_adam = {k: torch.nn.Parameter(ref[k].clone()) for k in ("emb", "big", "odd", "lam")}
    adam1 = torch.optim.AdamW([ref_adam[k] for k in ("emb", "big", "odd")], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    adam2 = torch.optim.AdamW([ref_adam["lam"]], lr=0.05, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0)
    names = []
    for k in sorted(make_params()):
        v = make_params()[k]
        names.extend([(k, i) for i in range(len(v))] if isinstance(v, list) else [(k, None)])
    for step in range(4):
        grads = make_grads(step, 0)
        set_grads(P, grads)
        opt.step()
        for (k, i), g in zip(names, grads):
            if i is None:
                ref_adam[k].grad = g.clone()
            else:
                reference_muon_matrix(ref[k][i], g.clone(), ref_M[k][i], ref_S[k][i], 0.02, 0.9, 0.9, 0.2, 5)
        adam1.step(); adam2.step()
    for k in ("sq", "tall", "wide"):
        for p, r in zip(P[k], ref[k]):
            torch.testing.assert_close(p.detach(), r, rtol=1e-4, atol=1e-5)
    for k in ("emb", "big", "odd", "lam"):
        torch.testing.assert_close(P[k].detach(), ref_adam[k].detach(), rtol=1e-5, atol=1e-6)


def test_first_muon_update_is_near_orthogonal():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(32, 64))
    opt = MuonAdamW([dict(kind="muon", params=[W], lr=1.0, momentum=0.0, ns_steps=5, beta2=1.0, weight_decay=0.0)])
    W.grad = torch.randn(32, 64)
    opt.step()
    s = torch.linalg.svdvals(-W.detach())
    s = s / s.mean()
    assert s.max() / s.min() < 4
    # the momentum buffer after one step holds (1-mu)*G = G; the update is what moved W
    assert torch.isfinite(W).all()


def test_converges_on_quadratic():
    torch.manual_seed(0)
    target_m = torch.randn(16, 16)
    target_a = torch.randn(64, 8)
    m = torch.nn.Parameter(torch.zeros(16, 16))
    a = torch.nn.Parameter(torch.zeros(64, 8))
    opt = MuonAdamW([dict(kind="muon", params=[m], lr=0.1, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.0),
                     dict(kind="adamw", params=[a], lr=0.05, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)])
    d0 = ((m - target_m).norm().item(), (a - target_a).norm().item())
    for _ in range(50):
        loss = ((m - target_m) ** 2).sum() + ((a - target_a) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    d1 = ((m - target_m).norm().item(), (a - target_a).norm().item())
    assert d1[0] < d0[0] / 2 and d1[1] < d0[1] / 2


def test_deterministic_and_state_dict_resume(tmp_path):
    # uninterrupted: 6 steps
    P = to_params(make_params())
    opt = build_optimizer(P)
    for step in range(6):
        set_grads(P, make_grads(step, 0)); opt.step()
    # interrupted: 3 steps, save (through torch.save), rebuild everything, load, 3 more
    Q = to_params(make_params())
    opt2 = build_optimizer(Q)
    for step in range(3):
        set_grads(Q, make_grads(step, 0)); opt2.step()
    torch.save({"opt": opt2.state_dict(), "params": [p.detach() for p in all_params(Q)]}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    R = to_params(make_params())
    for p, saved in zip(all_params(R), ck["params"]):
        p.data.copy_(saved)
    opt3 = build_optimizer(R)
    opt3.load_state_dict(ck["opt"])
    for step in range(3, 6):
        set_grads(R, make_grads(step, 0)); opt3.step()
    for p, r in zip(all_params(P), all_params(R)):
        assert torch.equal(p, r)  # bit-exact


# -----------------------------------------------------------------------------
# The state between world sizes

def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        assert entry.keys() == b["state"][index].keys()
        for key, value in entry.items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


def state_as_rank(monkeypatch, rank, world, saved):
    """The state dict that rank `rank` of a `world`-process run holds after load_resharded(saved)."""
    monkeypatch.setattr(optim, "rank_and_world", lambda: (rank, world))
    opt = build_optimizer(to_params(make_params()))
    opt.load_resharded(saved)
    return opt.state_dict()


def expected_rows(full, rank, per_rank):
    """Rows rank*per_rank.. of full, zeros past its end: written out one row at a time."""
    out = torch.zeros((per_rank, *full.shape[1:]))
    for j in range(per_rank):
        if rank * per_rank + j < len(full):
            out[j] = full[rank * per_rank + j]
    return out


def test_state_reshards_between_any_world_sizes(monkeypatch):
    """The one-process state split for N ranks as the sharded step keeps it (AdamW: 'big' by rows when they split
    evenly, 'odd', 'emb', 'lam' whole; Muon: ceil(K/N) matrices each, zero-padded, trailing ranks owning none),
    then joined and split again for M ranks: the same state as splitting the one-process state for M directly."""
    P = to_params(make_params())
    opt = build_optimizer(P)
    for step in range(3):
        set_grads(P, make_grads(step, 0)); opt.step()
    full = opt.state_dict()
    # state_dict indices: emb 0, big 1, odd 2 | lam 3 | sq 4-6 (state on 4) | tall 7-8 (on 7) | wide 9
    sharded = {1: lambda world: 128 // world if world in (2, 4) else None,
               4: lambda world: math.ceil(3 / world), 7: lambda world: math.ceil(2 / world), 9: lambda world: 1}
    assert sorted(full["state"]) == [0, 1, 2, 3, 4, 7, 9]
    for saved_world in (1, 2, 3, 4):
        shards = [state_as_rank(monkeypatch, rank, saved_world, [full]) for rank in range(saved_world)]
        for rank, shard in enumerate(shards):
            for index, entry in full["state"].items():
                per_rank = sharded.get(index, lambda world: None)(saved_world)
                for key, value in entry.items():
                    if torch.is_tensor(value):
                        want = expected_rows(value, rank, per_rank) if per_rank else value
                        assert torch.equal(shard["state"][index][key], want), (saved_world, rank, index, key)
        # wide (K=1) on 2 ranks and sq (K=3) on 4: the last rank owns no matrix, its buffers are padding
        if saved_world in (2, 4):
            assert not shards[-1]["state"][4 if saved_world == 4 else 9]["momentum_buffer"].any()
        for world in (1, 2, 3, 4):
            for rank in range(world):
                assert_same_state(state_as_rank(monkeypatch, rank, world, shards),
                                  state_as_rank(monkeypatch, rank, world, [full]))
        assert_same_state(state_as_rank(monkeypatch, 0, 1, shards), full)


def test_state_of_another_model_is_refused(monkeypatch):
    P = to_params(make_params())
    opt = build_optimizer(P)
    set_grads(P, make_grads(0, 0)); opt.step()
    saved = opt.state_dict()
    saved["state"][4]["momentum_buffer"] = saved["state"][4]["momentum_buffer"][:2]  # 2 stacked matrices, not 3
    with pytest.raises(ValueError, match="parameter 4 has 2 rows where this model has 3"):
        state_as_rank(monkeypatch, 0, 2, [saved])


@pytest.mark.slow
def test_compiled_matches_eager_and_schedule_never_recompiles():
    """The compiled update functions equal the eager ones while lr/momentum/betas/weight decay change every step,
    and after the first step (one graph per shape) a changing schedule triggers no recompilation."""
    torch._dynamo.reset()
    P, Q = to_params(make_params()), to_params(make_params())
    eager, compiled = build_optimizer(P), build_optimizer(Q, compile=True)
    for step in range(4):
        for opt in (eager, compiled):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * (1.0 - 0.2 * step)
                g["weight_decay"] = 0.1 * step
                if g["kind"] == "muon":
                    g["momentum"] = 0.85 + 0.03 * step
                else:
                    g["betas"] = (0.8 + 0.02 * step, 0.95)
        grads = make_grads(step, 0)
        set_grads(P, grads)
        set_grads(Q, grads)
        eager.step()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            compiled.step()
        if step > 0:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        for p, q in zip(all_params(P), all_params(Q)):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# 2 gloo processes vs 1 process

def _two_rank_worker(rank, world, init_file, out_dir, compile):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    P = to_params(make_params())
    opt = build_optimizer(P, compile)
    for step in range(3):
        set_grads(P, make_grads(step, rank)); opt.step()
    state = copy.deepcopy(opt.state_dict())
    for step in range(3, 5):
        set_grads(P, make_grads(step, rank)); opt.step()
    final = [p.detach().clone() for p in all_params(P)]
    # resume from the step-3 state on a fresh optimizer, with params restored from a fresh 3-step replay
    Q = to_params(make_params())
    opt_q = build_optimizer(Q, compile)
    for step in range(3):
        set_grads(Q, make_grads(step, rank)); opt_q.step()
    opt_r = build_optimizer(Q, compile)
    opt_r.load_state_dict(state)
    for step in range(3, 5):
        set_grads(Q, make_grads(step, rank)); opt_r.step()
    resumed = [p.detach().clone() for p in all_params(Q)]
    torch.save({"final": final, "resumed": resumed, "state_keys": len(state["state"])}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_two_process_gloo_matches_single_process(tmp_path, compile):
    """Sharded (2 ranks) == single process with averaged grads; compiled ranks against the eager single process."""
    os.environ["OMP_NUM_THREADS"] = "1"
    init_file = tmp_path / "pg_init"
    mp.spawn(_two_rank_worker, args=(2, str(init_file), str(tmp_path), compile), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # single process sees the rank-averaged gradient
    P = to_params(make_params())
    opt = build_optimizer(P)
    for step in range(5):
        g0, g1 = make_grads(step, 0), make_grads(step, 1)
        set_grads(P, [(a + b) / 2 for a, b in zip(g0, g1)])
        opt.step()
    for p, a, b, c, d in zip(all_params(P), r0["final"], r1["final"], r0["resumed"], r1["resumed"]):
        assert torch.equal(a, b)  # ranks agree exactly after the all-gathers
        assert torch.equal(a, c) and torch.equal(b, d)  # resume from a sharded state_dict is exact
        torch.testing.assert_close(a, p.detach(), rtol=1e-4, atol=1e-5)


def _consolidating_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    P = to_params(make_params())
    opt = build_optimizer(P)
    for step in range(3):
        set_grads(P, make_grads(step, rank)); opt.step()
    consolidated = opt.consolidated_state_dict()
    assert (consolidated is None) == (rank != 0)
    if rank == 0:
        torch.save({"consolidated": consolidated, "params": [p.detach().clone() for p in all_params(P)]},
                   os.path.join(out_dir, "consolidated.pt"))
    torch.save(opt.state_dict(), os.path.join(out_dir, f"shard{rank}.pt"))
    dist.barrier()
    # a resume on as many ranks from the consolidated state: the next two steps are bit-identical
    Q = to_params(make_params())
    for q, p in zip(all_params(Q), all_params(P)):
        q.data.copy_(p.detach())
    resumed = build_optimizer(Q)
    resumed.load_resharded([torch.load(os.path.join(out_dir, "consolidated.pt"))["consolidated"]])
    for step in range(3, 5):
        set_grads(P, make_grads(step, rank)); opt.step()
        set_grads(Q, make_grads(step, rank)); resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(all_params(P), all_params(Q)))
    if rank == 0:
        torch.save([p.detach().clone() for p in all_params(P)], os.path.join(out_dir, "final.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_state_consolidates_to_the_single_process_state(tmp_path):
    """2 gloo ranks gather their shards (AdamW rows, Muon chunks with padding, a rank owning nothing) into the state
    one process has after the same steps, which a single process resumes from (and 2 ranks, bit for bit)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_consolidating_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "consolidated.pt")
    # joining the per-rank states on one process gives exactly what the gather wrote
    joined = build_optimizer(to_params(make_params()))
    joined.load_resharded([torch.load(tmp_path / f"shard{rank}.pt") for rank in (0, 1)])
    assert_same_state(joined.state_dict(), saved["consolidated"])
    # ... which is the state of one process fed the rank-averaged grads, up to the order of float reductions
    P = to_params(make_params())
    opt = build_optimizer(P)
    averaged = [[(a + b) / 2 for a, b in zip(make_grads(step, 0), make_grads(step, 1))] for step in range(5)]
    for step in range(3):
        set_grads(P, averaged[step]); opt.step()
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(saved["consolidated"]["state"][index][key], value, rtol=1e-4, atol=1e-6)
    # 2 -> 1: one process resumed from the consolidated state ends where the 2 ranks ended
    R = to_params(make_params())
    for r, p in zip(all_params(R), saved["params"]):
        r.data.copy_(p)
    resumed = build_optimizer(R)
    resumed.load_resharded([saved["consolidated"]])
    for step in range(3, 5):
        set_grads(R, averaged[step]); resumed.step()
    for r, p in zip(all_params(R), torch.load(tmp_path / "final.pt")):
        torch.testing.assert_close(r.detach(), p, rtol=1e-4, atol=1e-5)
