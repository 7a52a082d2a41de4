"""The GLM-5 mixture of experts: sigmoid router with a selection-only bias, routed experts, one shared expert.

Router (as transformers and DeepSeek-V3 "noaux_tc"): s = sigmoid(x W^T) in fp32; experts are chosen by
s + e_score_correction_bias (group-limited when n_group > 1: a group scores by the sum of its 2 best biased
scores, only the best topk_group groups stay eligible); the combine weights are the unbiased s of the chosen
experts, normalized to sum 1 (norm_topk_prob) and times routed_scaling_factor.

Routed experts are fused 3-D parameters, gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].
The forward groups tokens by expert (one sort) and runs one matmul per expert that has tokens, or a single
grouped matmul where torch has one (`torch._grouped_mm`, CUDA); `moe_forward_loop` is the plain per-expert
loop kept as the test reference. On a CPU in bf16/fp16 each expert's rows are padded (weight-0 rows) to a
few recurring sizes: oneDNN compiles a kernel per matmul shape, and unpadded counts are new every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels import swiglu, swiglu_runs
from glm5.kernels.elementwise import moe_combine, moe_combine_backward, swiglu_backward_into, swiglu_into
from glm5.model.layers import MLP, no_autograd

# Use torch._grouped_mm when available on this device/dtype (switch for benchmarks and debugging).
USE_GROUPED_MM = True
# CPU fp32: the experts through `_CPUExperts` (C kernels, written-out backward) when the kernels are built.
USE_CPU_EXPERTS = True
# CPU bf16/fp16 only: round each expert's row count up (see _padded_counts and Experts.forward).
PAD_EXPERT_ROWS = True
PAD_ROWS = 128


class Router(nn.Module):
    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, cfg.hidden_size, dtype=torch.float32))
        # Load balancing without an auxiliary loss: the trainer nudges this bias; it only affects selection.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The router stays in fp32 whatever dtype the model is cast to (as in the released checkpoints).
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> scores [N, E] (sigmoid, fp32), weights [N, k] (fp32), indices [N, k]."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, groups]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.n_group, dim=1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.routed_scaling_factor, indices


class Experts(nn.Module):
    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.intermediate = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size, self.intermediate))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices / weights [N, k] -> sum_k weights * expert_k(x), [N, H]."""
        N, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // k
        # rows per expert, counted without a host sync (CUDA's bincount reads the max back), so the grouped
        # path below is one a CUDA graph can capture (glm5.engine.runner.moe_static calls it)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        row_weights = weights.reshape(-1)[order]
        if _pad_expert_rows(x):
            # oneDNN JIT-compiles a bf16 kernel per new matmul shape (~3 ms each, measured), and per-expert
            # row counts change every step; rounding each group up to PAD_ROWS keeps the shapes few and
            # cached. Padding rows read token 0 and carry weight 0, so they add exact zeros everywhere.
            counts_padded = _padded_counts(counts)
            starts = counts.cumsum(0) - counts
            dest = (counts_padded.cumsum(0) - counts_padded - starts).repeat_interleave(counts) + torch.arange(
                N * k, device=x.device)
            total = int(counts_padded.sum())
            token_of = token_of.new_zeros(total).index_copy_(0, dest, token_of)
            row_weights = row_weights.new_zeros(total).index_copy_(0, dest, row_weights)
            counts = counts_padded
        if _cpu_experts_kernel(x, self.gate_up_proj, self.down_proj, row_weights):
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            return _CPUExperts.apply(x, self.gate_up_proj, self.down_proj, token_of, row_weights,
                                     inverse.view(N, k), counts.tolist())
        xs = x.index_select(0, token_of)  # [N*k, H] grouped by expert (backward: index_add, not an index_put)
        if USE_GROUPED_MM and _grouped_mm_ok(xs):
            offsets = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets)
            gate, up = h.chunk(2, dim=-1)
            ys = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        else:
            # split / unbind rather than slicing and indexing: their backward is one cat / stack, where each
            # slice's or index's backward would allocate and zero a full-size gradient (per expert)
            pieces = []
            counts_list = counts.tolist()
            gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
            in_place = no_autograd(xs, self.gate_up_proj, self.down_proj)
            for e, chunk in enumerate(xs.split(counts_list)):
                if counts_list[e] == 0:
                    continue
                h = F.linear(chunk, gate_up[e])
                # training on a CPU in fp32: the SwiGLU kernel, whose gradient needs no cat (else None);
                # inference: in place below
                hidden = None if in_place else swiglu(h)
                if hidden is None:
                    gate, up = h.chunk(2, dim=-1)
                    hidden = F.silu(gate, inplace=True).mul_(up) if in_place else F.silu(gate) * up
                pieces.append(F.linear(hidden, down[e]))
            ys = torch.cat(pieces, dim=0)
        if no_autograd(ys, row_weights) and ys.dtype == torch.float32:
            ys = ys.mul_(row_weights.unsqueeze(-1))
        else:
            ys = ys * row_weights.unsqueeze(-1)  # fp32 weights, as transformers multiplies
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))


def _cpu_experts_kernel(x, gate_up, down, row_weights) -> bool:
    """Training in fp32 on a CPU with the kernels of glm5.kernels built, no autocast: `_CPUExperts` runs the
    experts. Inference keeps the loop: with nothing to save for a backward, its per-expert temporaries are
    cheaper than `_CPUExperts`' whole-batch buffers (fresh pages: 215 vs 155 ms of an 8K forward)."""
    return (USE_CPU_EXPERTS and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not no_autograd(x, gate_up, down, row_weights)
            and all(t.dtype == torch.float32 for t in (x, gate_up, down, row_weights)) and swiglu_runs(x))


class _CPUExperts(torch.autograd.Function):
    """The routed experts in fp32 on a CPU with a written-out backward. Each expert's three matmuls write into
    slices of one buffer (no per-expert outputs to concatenate, no `chunk` / `split` / `unbind` whose
    backwards are cats and stacks), SwiGLU and the weighted combine are C kernels (glm5.kernels), and the
    combine gathers each token's k rows (`inverse`) instead of scattering. Same math as the loop in
    `Experts.forward`, which is the reference in tests/test_kernels.py."""

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


def _padded_counts(counts: torch.Tensor) -> torch.Tensor:
    """Row counts rounded up to a power of two below PAD_ROWS, to a multiple of PAD_ROWS above (0 stays 0):
    few distinct shapes, and small decode batches are not blown up to PAD_ROWS rows per expert."""
    pow2 = torch.exp2(torch.ceil(torch.log2(counts.clamp(min=1).double()))).long()
    rounded = (counts + PAD_ROWS - 1) // PAD_ROWS * PAD_ROWS
    return torch.where(counts == 0, 0, torch.where(counts <= PAD_ROWS, pow2, rounded))


def _pad_expert_rows(x: torch.Tensor) -> bool:
    """Pad expert groups when their matmuls run in bf16/fp16 on a CPU (see PAD_ROWS)."""
    if not PAD_EXPERT_ROWS or x.device.type != "cpu":
        return False
    low = (torch.bfloat16, torch.float16)
    return x.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low)


def _grouped_mm_ok(xs: torch.Tensor) -> bool:
    return xs.is_cuda and xs.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def moe_forward_loop(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
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


class MoE(nn.Module):
    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        # The trainer turns this on to read each step's routing (expert load, scores for the aux loss).
        self.record_routing = False
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, weights, indices = self.gate(flat)
        if self.record_routing:
            self.last_routing = (scores, indices)
        routed = self.experts(flat, indices, weights).view(shape)
        shared = self.shared_experts(x)
        return routed.add_(shared) if no_autograd(routed, shared) else routed + shared
