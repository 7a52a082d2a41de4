"""The MoE's routed experts, every form they run in, and the one dispatcher the model and the engine both call.

    from glm5.model.experts import run_experts, experts_path
    routed = run_experts(experts, x, indices, weights)                # x [N, H], indices / weights [N, k] -> [N, H]
    routed = run_experts(experts, x, indices, weights, static=True)   # no host sync: CUDA-graph capturable
    routed = run_experts(experts, x, indices, weights, path="reference")   # one path by name (tests, benchmarks)

The experts are fused 3-D parameters, gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]; each
computes down(silu(gate x) * up x), and a token's output is the sum over its k experts weighted by the
router's (fp32) weights. The paths, in the order `experts_path` tries them:

  path          runs when                                                  how
  cpu_rows      CPU, fp32, no autograd, N <= CPU_ROWS_MAX_ROWS, kernels     `glm5.kernels.experts`: each picked expert
                built, not under torch.compile (USE_CPU_ROWS; static or     reads its weights once for all its rows (a
                not; the startup check decides against the path below)     C kernel)
  gathered      static, CPU, under torch.compile                           (inductor fuses the gather into its loop)
  dense_all     static, not grouped_mm, E <= 2 N k                         every expert on every row, weighted by
                                                                           the (mostly zero) dense routing weights
  gathered      static, not grouped_mm, E > 2 N k                          each (row, expert) pair's weights
                                                                           gathered, one batched matmul
  cpu_autograd  CPU, fp32, autograd recording, no autocast, kernels built  `_CPUExperts`: matmuls into one buffer,
                (USE_CPU_EXPERTS)                                          C SwiGLU and combine, written-out backward
  per_token     no autograd, N <= PER_TOKEN_MAX_ROWS (decode sizes)        each token's k experts one row at a
                                                                           time, no sort (a few tiny matmuls beat
                                                                           the grouping's ops)
  grouped_mm    CUDA, bf16, torch._grouped_mm exists (USE_GROUPED_MM)      sort by expert, one grouped matmul each
                (static or not; its row counts need no host sync)          way
  padded_loop   CPU, bf16/fp16 (or CPU autocast to them) (PAD_EXPERT_ROWS) sort by expert, each expert's rows padded
                                                                           with weight-0 rows to recurring sizes
                                                                           (oneDNN compiles a kernel per shape)
  loop          otherwise                                                  sort by expert, one matmul per expert
                                                                           that has tokens
  reference     only by name                                               transformers' per-expert loop (tests)

All paths compute the same sums; they differ in the order of floating-point operations only
(tests/test_experts.py checks each against `reference` and the dispatcher against this table;
tests/test_kernels.py the CPU kernels' backward, tests/test_cuda_graphs.py the static forms in the engine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels import experts as experts_kernel
from glm5.kernels import swiglu, swiglu_runs
from glm5.kernels.check import kernel_or_fallback, size_class
from glm5.kernels.elementwise import moe_combine, moe_combine_backward, swiglu_backward_into, swiglu_into
from glm5.model.layers import no_autograd

# Switches (benchmarks, debugging; each has a tested fallback giving the same numbers):
USE_GROUPED_MM = True  # torch._grouped_mm where this device/dtype has it (CUDA bf16)
USE_CPU_EXPERTS = True  # CPU fp32 training through `_CPUExperts` when the kernels are built
PAD_EXPERT_ROWS = True  # CPU bf16/fp16: round each expert's row count up (see _padded_counts)
PAD_ROWS = 128
# no-autograd calls with at most this many rows take the per-token path (the engine's decode steps)
PER_TOKEN_MAX_ROWS = 4
USE_CPU_ROWS = True  # CPU fp32 decode sizes through glm5.kernels.experts (the startup check still decides)
CPU_ROWS_MAX_ROWS = experts_kernel.MAX_ROWS

PATHS = ("cpu_rows", "dense_all", "gathered", "cpu_autograd", "per_token", "grouped_mm", "padded_loop", "loop", "reference")


class Experts(nn.Module):
    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.intermediate = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size, self.intermediate))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, static: bool = False,
                path: str | None = None) -> torch.Tensor:
        """x [N, H], indices / weights [N, k] -> sum_k weights * expert_k(x), [N, H] (see `run_experts`)."""
        return run_experts(self, x, indices, weights, static=static, path=path)


def experts_path(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 static: bool = False) -> str:
    """The name of the path `run_experts` takes for these inputs (the table in the module docstring)."""
    N, k = indices.shape
    inference = no_autograd(x, experts.gate_up_proj, experts.down_proj, weights)
    if inference and _cpu_rows_ok(experts, x, N):
        return "cpu_rows"
    if static:
        if USE_GROUPED_MM and _grouped_mm_ok(x):
            return "grouped_mm"
        return _static_path(experts, x, N, k)
    if not inference and _cpu_experts_ok(x, experts.gate_up_proj, experts.down_proj, weights):
        return "cpu_autograd"
    if inference and N <= PER_TOKEN_MAX_ROWS:
        return "per_token"
    if USE_GROUPED_MM and _grouped_mm_ok(x):
        return "grouped_mm"
    if _pad_expert_rows(x):
        return "padded_loop"
    return "loop"


def run_experts(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                static: bool = False, path: str | None = None) -> torch.Tensor:
    """The routed experts on x [N, H] with the router's indices / weights [N, k] -> [N, H] in x's dtype.

    `static`: no host sync and no data-dependent shape (the engine's CUDA-graph steps). `path`: force one path
    by name (it must suit the inputs: `cpu_autograd` needs the CPU kernels, `grouped_mm` CUDA bf16)."""
    path = path or experts_path(experts, x, indices, weights, static)
    if path not in _FUNCTIONS:
        raise ValueError(f"experts path {path!r}: expected one of {PATHS}")
    if path == "cpu_rows":
        return experts_cpu_rows(experts, x, indices, weights, static=static)
    return _FUNCTIONS[path](experts, x, indices, weights)


# ---------------------------------------------------------------------------------------- sort-based paths
def _group_by_expert(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, pad: bool):
    """Rows sorted by expert: (order of the flat (token, slot) pairs, each row's token, each row's weight,
    rows per expert [E]). With `pad`, each expert's group is padded to `_padded_counts` with rows that read
    token 0 and carry weight 0 (exact zeros everywhere)."""
    N, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token_of = order // k
    # rows per expert, counted without a host sync (CUDA's bincount reads the max back), so grouped_mm is
    # capturable by a CUDA graph
    counts = torch.zeros(experts.num_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    row_weights = weights.reshape(-1)[order]
    if pad:
        counts_padded = _padded_counts(counts)
        starts = counts.cumsum(0) - counts
        dest = (counts_padded.cumsum(0) - counts_padded - starts).repeat_interleave(counts) + torch.arange(
            N * k, device=x.device)
        total = int(counts_padded.sum())
        token_of = token_of.new_zeros(total).index_copy_(0, dest, token_of)
        row_weights = row_weights.new_zeros(total).index_copy_(0, dest, row_weights)
        counts = counts_padded
    return order, token_of, row_weights, counts


def _combine(x: torch.Tensor, ys: torch.Tensor, token_of: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Each row's output times its weight (fp32 weights, as transformers multiplies), summed into its token."""
    if no_autograd(ys, row_weights) and ys.dtype == torch.float32:
        ys = ys.mul_(row_weights.unsqueeze(-1))
    else:
        ys = ys * row_weights.unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))


def _loop(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, pad: bool = False):
    _, token_of, row_weights, counts = _group_by_expert(experts, x, indices, weights, pad)
    xs = x.index_select(0, token_of)  # [N*k, H] grouped by expert (backward: index_add, not an index_put)
    # split / unbind rather than slicing and indexing: their backward is one cat / stack, where each slice's or
    # index's backward would allocate and zero a full-size gradient (per expert)
    pieces = []
    counts_list = counts.tolist()
    gate_up, down = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    in_place = no_autograd(xs, experts.gate_up_proj, experts.down_proj)
    for e, chunk in enumerate(xs.split(counts_list)):
        if counts_list[e] == 0:
            continue
        h = F.linear(chunk, gate_up[e])
        # training on a CPU in fp32: the SwiGLU kernel, whose gradient needs no cat (else None); inference: in
        # place below
        hidden = None if in_place else swiglu(h)
        if hidden is None:
            gate, up = h.chunk(2, dim=-1)
            hidden = F.silu(gate, inplace=True).mul_(up) if in_place else F.silu(gate) * up
        pieces.append(F.linear(hidden, down[e]))
    return _combine(x, torch.cat(pieces, dim=0), token_of, row_weights)


def experts_loop(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sort by expert, one matmul per expert that has tokens."""
    return _loop(experts, x, indices, weights)


def experts_padded_loop(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The loop with each expert's rows padded: oneDNN JIT-compiles a bf16 kernel per new matmul shape (~3 ms
    each, measured), and per-expert row counts change every step; rounding each group up keeps the shapes few
    and cached. Padding rows read token 0 and carry weight 0, so they add exact zeros everywhere."""
    return _loop(experts, x, indices, weights, pad=True)


def experts_grouped_mm(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sort by expert, then `torch._grouped_mm` for all experts at once (CUDA bf16); no host sync."""
    _, token_of, row_weights, counts = _group_by_expert(experts, x, indices, weights, pad=False)
    xs = x.index_select(0, token_of)
    offsets = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(xs, experts.gate_up_proj.transpose(1, 2), offs=offsets)
    gate, up = h.chunk(2, dim=-1)
    ys = torch._grouped_mm(F.silu(gate) * up, experts.down_proj.transpose(1, 2), offs=offsets)
    return _combine(x, ys, token_of, row_weights)


def experts_cpu_autograd(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sort by expert, then `_CPUExperts` (fp32 CPU training; its combine gathers each token's k rows)."""
    N, k = indices.shape
    order, token_of, row_weights, counts = _group_by_expert(experts, x, indices, weights, pad=False)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return _CPUExperts.apply(x, experts.gate_up_proj, experts.down_proj, token_of, row_weights, inverse.view(N, k),
                             counts.tolist())


class _CPUExperts(torch.autograd.Function):
    """The routed experts in fp32 on a CPU with a written-out backward. Each expert's three matmuls write into
    slices of one buffer (no per-expert outputs to concatenate, no `chunk` / `split` / `unbind` whose
    backwards are cats and stacks), SwiGLU and the weighted combine are C kernels (glm5.kernels), and the
    combine gathers each token's k rows (`inverse`) instead of scattering. Same math as `experts_loop`, the
    reference in tests/test_kernels.py."""

    @staticmethod
    def forward(ctx, x, gate_up, down, token_of, row_weights, inverse, counts):
        N, H = x.shape
        I = down.shape[2]
        xs = x.index_select(0, token_of)  # [R, H], grouped by expert
        R = xs.shape[0]
        hs, acts, ys = xs.new_empty(R, 2 * I), xs.new_empty(R, I), xs.new_empty(R, H)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(xs[rows], gate_up[e].t(), out=hs[rows])
                swiglu_into(hs[rows], acts[rows])
                torch.mm(acts[rows], down[e].t(), out=ys[rows])
            start += n
        ctx.save_for_backward(x, gate_up, down, token_of, row_weights, inverse, xs, hs, acts, ys)
        ctx.counts = counts
        return moe_combine(ys, row_weights, inverse, N)

    @staticmethod
    def backward(ctx, dout):
        x, gate_up, down, token_of, row_weights, inverse, xs, hs, acts, ys = ctx.saved_tensors
        dys, d_weights = moe_combine_backward(dout, ys, row_weights, token_of)
        d_gate_up, d_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        dxs = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(dys[rows].t(), acts[rows], out=d_down[e])                 # [H, I]
                d_act = dys[rows] @ down[e]                                        # [n, I]
                d_h = swiglu_backward_into(hs[rows], d_act)                        # [n, 2I]
                torch.mm(d_h.t(), xs[rows], out=d_gate_up[e])                      # [2I, H]
                torch.mm(d_h, gate_up[e], out=dxs[rows])                           # [n, H]
            start += n
        dx = moe_combine(dxs, None, inverse, x.shape[0])  # each token's k rows summed: index_select's backward
        return dx, d_gate_up, d_down, None, d_weights, None, None


# ---------------------------------------------------------------------------------------- unsorted paths
def experts_cpu_rows(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     static: bool = False) -> torch.Tensor:
    """`glm5.kernels.experts`: each picked expert's weights read once for all its rows, behind the startup check
    against the path it replaces (per_token / loop; the static forms when `static`)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    N, k = indices.shape
    if static:
        fallback = _static_path(experts, x, N, k)
    else:
        fallback = "per_token" if N <= PER_TOKEN_MAX_ROWS else "loop"
    return kernel_or_fallback(
        "experts_rows", (size_class(N), k, experts.num_experts, x.shape[1], down.shape[2]),
        lambda: experts_kernel.experts_rows(x, indices, weights.float(), gate_up, down),
        lambda: _FUNCTIONS[fallback](experts, x, indices, weights))


def experts_per_token(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's k experts, one row at a time (decode sizes: no sort, no grouping; reads the routing on the
    host)."""
    out = torch.zeros_like(x)
    w = weights.tolist()
    for n, row in enumerate(indices.tolist()):
        xn = x[n : n + 1]
        for j, e in enumerate(row):
            gate, up = F.linear(xn, experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, experts.down_proj[e]) * w[n][j]
            out[n : n + 1] += y.to(out.dtype)
    return out


def experts_dense_all(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, each row's outputs weighted by its dense routing weights (zero for experts it
    did not pick): no host sync; cheaper than gathering N k weight matrices when the experts are few."""
    N = x.shape[0]
    h = torch.matmul(x, experts.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
    gate, up = h.chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, experts.down_proj.transpose(1, 2))  # [E, N, hidden]
    dense = torch.zeros(N, experts.num_experts, dtype=torch.float32, device=x.device).scatter_(1, indices, weights.float())
    return torch.einsum("ne,enh->nh", dense, ys.float()).to(x.dtype)


def experts_gathered(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each (row, expert) pair's weights gathered and one batched matmul: no host sync, small N. (At the
    released widths in fp32 this and `experts_dense_all` would move gigabytes per step; there CUDA graphs want
    bf16 and grouped_mm.)"""
    N, k = indices.shape
    flat = indices.reshape(-1)
    rows = x.repeat_interleave(k, dim=0).unsqueeze(1)  # [N*k, 1, hidden]
    h = torch.bmm(rows, experts.gate_up_proj.index_select(0, flat).transpose(1, 2))
    gate, up = h.chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, experts.down_proj.index_select(0, flat).transpose(1, 2)).squeeze(1)
    ys = ys.float() * weights.reshape(-1, 1)
    return ys.view(N, k, -1).sum(dim=1).to(x.dtype)


def experts_reference(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The plain reference: for each expert, find its tokens and add its weighted output (transformers' loop)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token_idx, slot = torch.where(indices == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(x[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.down_proj[e]) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


_FUNCTIONS = {
    "cpu_rows": experts_cpu_rows, "dense_all": experts_dense_all, "gathered": experts_gathered, "cpu_autograd": experts_cpu_autograd,
    "per_token": experts_per_token, "grouped_mm": experts_grouped_mm, "padded_loop": experts_padded_loop,
    "loop": experts_loop, "reference": experts_reference,
}
assert tuple(_FUNCTIONS) == PATHS


# ---------------------------------------------------------------------------------------- conditions
def _cpu_experts_ok(x, gate_up, down, row_weights) -> bool:
    """Training in fp32 on a CPU with the kernels of glm5.kernels built, no autocast. (Inference keeps the
    loop: with nothing to save for a backward, its per-expert temporaries are cheaper than `_CPUExperts`'
    whole-batch buffers: fresh pages, 215 vs 155 ms of an 8K forward.)"""
    return (USE_CPU_EXPERTS and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and all(t.dtype == torch.float32 for t in (x, gate_up, down, row_weights)) and swiglu_runs(x))


def _padded_counts(counts: torch.Tensor) -> torch.Tensor:
    """Row counts rounded up to a power of two below PAD_ROWS, to a multiple of PAD_ROWS above (0 stays 0):
    few distinct shapes, and small decode batches are not blown up to PAD_ROWS rows per expert."""
    pow2 = torch.exp2(torch.ceil(torch.log2(counts.clamp(min=1).double()))).long()
    rounded = (counts + PAD_ROWS - 1) // PAD_ROWS * PAD_ROWS
    return torch.where(counts == 0, 0, torch.where(counts <= PAD_ROWS, pow2, rounded))


def _static_path(experts: Experts, x: torch.Tensor, N: int, k: int) -> str:
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        # inductor fuses the gathered weights into one reduction loop that reads each pair's expert once, where
        # dense_all's batched matmul stays an aten call over every expert (batch 8 of tiny-bench: 0.6 vs 1.5 ms)
        return "gathered"
    return "dense_all" if experts.num_experts <= 2 * N * k else "gathered"


def _cpu_rows_ok(experts: Experts, x: torch.Tensor, N: int) -> bool:
    """A decode-sized call in fp32 on a CPU where the experts kernel loads, not under torch.compile (a ctypes
    call cannot be traced; inductor fuses the gathered form instead)."""
    if not (USE_CPU_ROWS and x.device.type == "cpu" and N <= CPU_ROWS_MAX_ROWS and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")
            and all(t.dtype == torch.float32 for t in (x, experts.gate_up_proj, experts.down_proj))):
        return False
    return experts_kernel.available()  # (None from load_library when the kernels are off)


def _pad_expert_rows(x: torch.Tensor) -> bool:
    """Pad expert groups when their matmuls run in bf16/fp16 on a CPU (see PAD_ROWS)."""
    if not PAD_EXPERT_ROWS or x.device.type != "cpu":
        return False
    low = (torch.bfloat16, torch.float16)
    return x.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low)


def _grouped_mm_ok(xs: torch.Tensor) -> bool:
    return xs.is_cuda and xs.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
