"""
MuonAdamW: one optimizer for the whole GPT, single-process and distributed alike.

- Matrices inside the transformer blocks are updated with Muon: Nesterov momentum, MuonEq row equilibration,
  Polar Express orthogonalization, Muon+ renormalization, NorMuon-style variance normalization, cautious weight
  decay and a shape-based learning rate multiplier sqrt(max(1, rows/cols)).
- Embeddings, the unembedding and the per-layer scalars are updated with AdamW (decoupled weight decay).

There is no DDP wrapper: every rank computes gradients of its own local loss and this optimizer averages them as
part of step(). When a process group with more than one rank is initialized, optimizer state is sharded:
  * large AdamW params: grads are reduce-scattered along dim 0, each rank updates (and keeps state for) its own
    row slice, then the slices are all-gathered back (ZeRO-2 style);
  * small AdamW params (numel < 1024, the lambda vectors) or params whose first dim does not split evenly:
    grads are all-reduced and every rank does the full (replicated) update;
  * Muon groups of K same-shaped matrices: the stacked grads (padded to a multiple of the world size) are
    reduce-scattered so each rank owns a contiguous chunk of matrices; updated matrices are all-gathered back.
All communication is launched asynchronously up front and waited for group by group, so compute overlaps comms.
With world size 1 the very same code runs and the communication is simply skipped.

Param groups are plain dicts:
  {'kind': 'adamw', 'params': [...], 'lr', 'betas', 'eps', 'weight_decay'}
  {'kind': 'muon',  'params': [...same shape...], 'lr', 'momentum', 'ns_steps', 'beta2', 'weight_decay'}
Each group gets 'initial_lr' (= lr unless given); the training loop sets lr = initial_lr * multiplier.

Checkpoints hold the state a single process would have, whatever the world size: consolidated_state_dict gathers the
shards onto rank 0's CPU one tensor at a time, and load_resharded gives every rank its part under the current world
size (it also joins the per-rank state dicts of checkpoints written before), so a run saved by N processes resumes on
M. Not torch.distributed.checkpoint: it reshards only DTensors (every shard would be wrapped in one, on a device mesh)
and writes a folder of per-rank files that would need its own atomic rename and finiteness check, for no speed gain
(d12 on CPU, 1 process: DCP saves 1860 MiB in 10-11 s and loads in 3.5 s, torch.save in 5-11 s and 3 s). The price
is the gather: with 2 gloo processes at d12 the save takes 17 s (5 s of it the gather over loopback TCP, the rest one
writer instead of two) against 7 s for per-rank files, a load 1.6 s against 1.5 s (dev/bench_checkpoint.py). At d26
on 8 GPUs rank 0 holds the whole state in CPU memory while saving (9.3 GB) and one gathered tensor on its GPU
(at most 1.3 GB).
"""

import math
import functools

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE, is_ddp_initialized

# Polar Express coefficients (a, b, c) for 5 iterations (safety factor 2e-2, cushion 2). Iteration i uses triple i.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# torch >= 2.10 names the single-tensor collectives *_single; older versions only have the *_tensor spelling
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# AdamW params smaller than this are all-reduced and updated on every rank (sharding them is not worth a collective)
SMALL_PARAM_NUMEL = 1024


# bf16 orthogonalization only when the whole model computes in bf16; otherwise stay in fp32 (CPU, MPS, old GPUs)
ORTHOGONALIZE_DTYPE = torch.bfloat16 if COMPUTE_DTYPE == torch.bfloat16 else torch.float32

# -----------------------------------------------------------------------------
# The per-parameter math (pure functions on tensors, no communication). Muon's hyper-parameters that a schedule
# may change (lr, momentum, weight decay) arrive as 0-D fp32 tensors, so its compiled version sees new values as
# data and never recompiles; only shapes and dtypes are baked into a compiled graph.

def adamw_update(p, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step on tensor p (in place), as torch.optim.AdamW: decoupled weight decay, bias-corrected moments,
    eps added after the square root. Torch's fused kernel makes one pass over p, g and the moments (fp32 math, also
    for bf16 tensors) where a composition of ops makes a dozen, so there is nothing left for a compiler to fuse."""
    step = torch.full((), float(step), dtype=torch.float32, device=p.device)
    torch._fused_adamw_([p], [g], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


def polar_express(X, ns_steps):
    """Approximately orthogonalize each matrix of the stack X (K, rows, cols), in X's dtype."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # baddbmm fuses the scaled sums into the matmuls: b*A + c*A@A, then a*X + X@B (or B@X)
        A = X.mT @ X if tall else X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X


def muon_update(P, G, momentum_buffer, second_momentum_buffer, lr, momentum, beta2, weight_decay, ns_steps):
    """
    One Muon step on a stack of same-shaped matrices. P (K, rows, cols) fp32 params (updated in place),
    G the matching grads, momentum_buffer (K, rows, cols) and second_momentum_buffer (K, rows, 1) or (K, 1, cols).
    lr is the group lr; the shape multiplier sqrt(max(1, rows/cols)) is applied here.
    """
    rows, cols = P.shape[-2:]
    G = G.float()
    # 1) Nesterov momentum via lerps: M <- mu*M + (1-mu)*G ; U <- (1-mu)*G + mu*M
    momentum_buffer.lerp_(G, 1.0 - momentum)
    U = G.lerp(momentum_buffer, momentum)
    # 2) MuonEq: equilibrate row norms to the average row norm (fp32)
    target = U.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows)
    U = U * (target / U.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    # 3) Polar Express orthogonalization, then Muon+: every matrix gets Frobenius norm sqrt(min(rows, cols))
    X = polar_express(U.to(ORTHOGONALIZE_DTYPE), ns_steps).float()
    X = X * (math.sqrt(min(rows, cols)) / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # 4) NorMuon variance normalization along the longer dim (per row if rows >= cols, else per column),
    #    renormalized so the total Frobenius norm is unchanged
    red_dim = -1 if rows >= cols else -2
    n = X.size(red_dim)
    v = X.square().mean(dim=red_dim, keepdim=True)
    norm_before = (v.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_momentum_buffer.lerp_(v.to(second_momentum_buffer.dtype), 1.0 - beta2)
    step_size = second_momentum_buffer.float().clamp_min(1e-10).rsqrt()
    norm_after = ((v * n * step_size.square()).sum(dim=(-2, -1), keepdim=True)).sqrt()
    X = X * (step_size * (norm_before / norm_after.clamp_min(1e-10)))
    # 5) cautious weight decay (only where update and weight agree in sign) + the update, shape-scaled lr
    eff_lr = lr * math.sqrt(max(1.0, rows / cols))
    mask = (X * P) >= 0
    P.sub_(eff_lr * X + (eff_lr * weight_decay) * P * mask)


@functools.cache
def compiled(update):
    """The compiled twin of the Muon update: one graph per parameter shape/dtype, fused into a few kernels
    instead of a dozen full passes over memory per tensor. Created on first request, so an eager run never
    imports the compiler (2 s at start-up)."""
    return torch.compile(update, dynamic=False, fullgraph=True)


# -----------------------------------------------------------------------------
# How state is sharded over `world` ranks, and moving it between layouts

def rank_and_world():
    """(rank, world size), (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_ddp_initialized() else (0, 1)


def row_shard_size(p, world):
    """Rows of AdamW param p that each rank updates and keeps state for, or None when every rank keeps all of them
    (one process, a small param, or a first dim that does not split evenly)."""
    if world == 1 or p.numel() < SMALL_PARAM_NUMEL or p.shape[0] % world != 0:
        return None
    return p.shape[0] // world


def gather_rows(shard, length, rank, world):
    """Every rank's shard in rank order, cut to the first `length` rows (the padding dropped), on rank 0's CPU; None
    on the other ranks. Only rank 0 allocates the gathered tensor."""
    full = torch.empty((world * shard.shape[0], *shard.shape[1:]), dtype=shard.dtype, device=shard.device) \
        if rank == 0 else None
    dist.gather(shard.contiguous(), list(full.chunk(world)) if rank == 0 else None, dst=0)
    return full[:length].to("cpu", copy=length < len(full)) if rank == 0 else None  # a copy drops the padding


def take_rows(full, lo, count):
    """A copy of rows lo:lo+count of full, zero-padded past its end (matrices a trailing rank owns none of)."""
    out = full.new_zeros((count, *full.shape[1:]))
    kept = full[lo:lo + count]
    out[:len(kept)] = kept
    return out

# -----------------------------------------------------------------------------
# The optimizer

class MuonAdamW(torch.optim.Optimizer):
    """compile=True runs the compiled Muon update (worth it for long runs: each new shape costs a compilation)."""

    def __init__(self, param_groups, compile=False):
        self.muon_update = compiled(muon_update) if compile else muon_update
        param_groups = [dict(g) for g in param_groups]
        for group in param_groups:
            group["params"] = list(group["params"])
            kind = group.get("kind")  # every key of the group's kind is required (see the module docstring)
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                assert len(shapes) == 1, f"a muon group must hold same-shaped matrices, got shapes {sorted(shapes)}"
                assert all(p.ndim == 2 for p in group["params"]), "muon groups take 2-D matrices only"
            elif kind != "adamw":
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
            group.setdefault("initial_lr", group["lr"])
        super().__init__(param_groups, defaults={})

    # torch guards these four against tracing, and the guard's first call imports the compiler (~2 s of an eager
    # run's start-up); this optimizer's bookkeeping is never traced, so it calls them unguarded
    add_param_group = torch.optim.Optimizer.add_param_group.__wrapped__
    zero_grad = torch.optim.Optimizer.zero_grad.__wrapped__
    state_dict = torch.optim.Optimizer.state_dict.__wrapped__
    load_state_dict = torch.optim.Optimizer.load_state_dict.__wrapped__

    # --- checkpoints: the state in the layout of one process, whatever the world size -----------------

    def _state_layout(self, world):
        """{state_dict index of a param that keeps state: (rows of its state tensors in the one-process layout, rows
        each of `world` ranks keeps, or None when every rank keeps them all)}. An AdamW param keeps its own rows; a
        Muon group keeps its K stacked matrices on its first param, ceil(K / world) per rank (the last padded)."""
        layout, index = {}, 0
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                layout.update({index + i: (p.shape[0], row_shard_size(p, world)) for i, p in enumerate(params)})
            else:
                layout[index] = (len(params), math.ceil(len(params) / world) if world > 1 else None)
            index += len(params)
        return layout

    def consolidated_state_dict(self):
        """The state dict a single process would have, for any world size: on rank 0 (sharded tensors gathered onto
        its CPU one at a time), None on the other ranks. A collective: every rank calls it."""
        rank, world = rank_and_world()
        state_dict = self.state_dict()
        if world == 1:
            return state_dict
        layout = self._state_layout(world)
        state = {}
        for index in sorted(state_dict["state"]):  # the same order on every rank: the gathers pair up
            length, per_rank = layout[index]
            state[index] = {key: gather_rows(value, length, rank, world) if per_rank and torch.is_tensor(value)
                            else value for key, value in state_dict["state"][index].items()}
        return {"state": state, "param_groups": state_dict["param_groups"]} if rank == 0 else None

    def load_resharded(self, rank_state_dicts):
        """Load the state a run of W = len(rank_state_dicts) processes saved (its per-rank state dicts in rank order;
        a consolidated state dict is the state of one process, a list of one). Every state tensor is joined back into
        the one-process layout and this rank keeps its part under the current world size. Values are only copied, so
        a resume on as many processes as saved is bit-identical. A state of another model raises ValueError."""
        rank, world = rank_and_world()
        saved_layout, layout = self._state_layout(len(rank_state_dicts)), self._state_layout(world)
        state = {}
        for index, entry in rank_state_dicts[0]["state"].items():
            if index not in layout:
                raise ValueError(f"the saved optimizer state has state for parameter {index}, which keeps none here")
            length, per_rank = layout[index]
            state[index] = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    pieces = [sd["state"][index][key] for sd in rank_state_dicts] if saved_layout[index][1] else [value]
                    value = (torch.cat(pieces) if len(pieces) > 1 else value)[:length]  # a single piece: no copy
                    if len(value) != length:
                        raise ValueError(f"the saved optimizer state of parameter {index} has {len(value)} rows "
                                         f"where this model has {length}")
                    value = take_rows(value, rank * per_rank, per_rank) if per_rank else value.clone()
                state[index][key] = value
        self.load_state_dict({"state": state, "param_groups": rank_state_dicts[0]["param_groups"]})

    # --- phase 1: launch gradient averaging -----------------------------------------------------------

    def _launch_reduce(self, group, rank, world):
        """Start the (async) gradient averaging for one group; returns a small plan dict consumed by phase 2."""
        if group["kind"] == "adamw":
            plans = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                rows = row_shard_size(p, world)
                if rows is None:
                    work = dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) if world > 1 else None
                    plans.append(dict(p=p, mode="full", grad=g, work=work))
                else:
                    g_slice = torch.empty((rows, *p.shape[1:]), dtype=g.dtype, device=g.device)
                    work = _reduce_scatter(g_slice, g.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
                    plans.append(dict(p=p, mode="shard", grad=g_slice, work=work, rows=rows))
            return plans
        # muon: stack the grads of all K matrices (padded to chunk * world), reduce-scatter so each rank gets a chunk
        params = group["params"]
        if any(p.grad is None for p in params):
            assert all(p.grad is None for p in params), "muon group with partially missing grads"
            return None
        K = len(params)
        chunk = math.ceil(K / world)
        stacked = torch.zeros((chunk * world, *params[0].shape), dtype=params[0].grad.dtype, device=params[0].device)
        for i, p in enumerate(params):
            stacked[i].copy_(p.grad)
        if world == 1:
            return dict(stacked=stacked, grad=stacked, chunk=chunk, work=None)
        grad_chunk = torch.empty((chunk, *params[0].shape), dtype=stacked.dtype, device=stacked.device)
        work = _reduce_scatter(grad_chunk, stacked, op=dist.ReduceOp.SUM, async_op=True)
        return dict(stacked=stacked, grad=grad_chunk, chunk=chunk, work=work)

    # --- phase 2: wait, update, launch gathers --------------------------------------------------------

    def _adamw_step(self, group, plans, rank, world):
        gathers = []
        beta1, beta2 = group["betas"]
        for plan in plans:
            if plan["work"] is not None:
                plan["work"].wait()
            p, g = plan["p"], plan["grad"]
            if world > 1:
                g.div_(world)  # SUM -> mean over ranks (gloo and NCCL alike)
            if plan["mode"] == "full":
                target = p
            else:
                lo = rank * plan["rows"]
                target = p[lo:lo + plan["rows"]].clone()  # owned slice (separate buffer: it is gathered into p)
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(target), exp_avg_sq=torch.zeros_like(target))
            state["step"] += 1
            adamw_update(target, g, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], beta1, beta2,
                         group["eps"], group["weight_decay"])
            if plan["mode"] == "shard":
                gathers.append(_all_gather(p, target, async_op=True))
        return gathers

    def _muon_step(self, group, plan, rank, world):
        params = group["params"]
        K, chunk = len(params), plan["chunk"]
        shape = params[0].shape
        grad = plan["grad"]
        if plan["work"] is not None:
            plan["work"].wait()
            grad.div_(world)
        owned = min(chunk, max(0, K - rank * chunk))  # trailing ranks may own nothing
        # state for the whole group lives on its first parameter; buffers are chunk-sized (== K with one rank)
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros((chunk, *shape), dtype=params[0].dtype, device=params[0].device)
            second_shape = (chunk, shape[0], 1) if shape[0] >= shape[1] else (chunk, 1, shape[1])
            state["second_momentum_buffer"] = torch.zeros(second_shape, dtype=torch.float32, device=params[0].device)
        out = torch.zeros((chunk, *shape), dtype=params[0].dtype, device=params[0].device) if world > 1 else None
        if owned > 0:
            lo = rank * chunk
            P = torch.stack([params[i].float() for i in range(lo, lo + owned)])
            self.muon_update(P, grad[:owned], state["momentum_buffer"][:owned], state["second_momentum_buffer"][:owned],
                             *[torch.tensor(float(group[k])) for k in ("lr", "momentum", "beta2", "weight_decay")],
                             group["ns_steps"])
            if world == 1:
                for i in range(owned):
                    params[i].copy_(P[i])
                return None
            out[:owned].copy_(P)
        # gather everyone's updated chunk into the (now free) stacked-grad buffer
        work = _all_gather(plan["stacked"], out, async_op=True)
        return (work, plan["stacked"], params)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # without a process group (one process) the same code runs and the communication is skipped
        rank, world = rank_and_world()
        # phase 1: launch every reduction, in group order
        plans = [self._launch_reduce(group, rank, world) for group in self.param_groups]
        # phase 2: per group, wait for its reduction, compute, launch the gather
        adam_gathers, muon_gathers = [], []
        for group, plan in zip(self.param_groups, plans):
            if plan is None:
                continue
            if group["kind"] == "adamw":
                adam_gathers.extend(self._adamw_step(group, plan, rank, world))
            else:
                gathered = self._muon_step(group, plan, rank, world)
                if gathered is not None:
                    muon_gathers.append(gathered)
        # phase 3: wait for the gathers and copy the muon stacks back into the parameters
        for work in adam_gathers:
            work.wait()
        for work, stacked, params in muon_gathers:
            work.wait()
            for i, p in enumerate(params):
                p.copy_(stacked[i])
        return loss
