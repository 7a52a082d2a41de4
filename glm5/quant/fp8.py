"""Block-wise FP8 (e4m3) weights, the format of GLM-5-FP8 and DeepSeek-V3, and the modules that run them.

    from glm5.quant.fp8 import quantize_fp8_blockwise, dequantize_fp8_blockwise, quantize_model_fp8
    w_fp8, scale_inv = quantize_fp8_blockwise(w)              # w [out, in] -> fp8 [out, in], fp32 [⌈out/128⌉, ⌈in/128⌉]
    w_again = dequantize_fp8_blockwise(w_fp8, scale_inv)      # fp8 value × the scale of its 128×128 block
    quantize_model_fp8(model)                                 # nn.Linear -> FP8Linear, experts -> FP8Experts, in place
    model = load_fp8_model("out-fp8/")                        # a directory written by `glm5 quantize fp8`
    set_fp8_compute(model, "fp8")                             # real FP8 matmuls (torch scaled_mm) instead of dequant

The format: each quantized weight `X.weight` is float8_e4m3fn [out, in] and `X.weight_scale_inv` is fp32
[⌈out/128⌉, ⌈in/128⌉]; the scale of a block is its max |w| / 448, so the block's largest value lands on e4m3's
largest finite value. A partial block at the edge (576 rows = 4.5 blocks) gets its own scale.

Two ways to run an FP8 weight, chosen per module by `compute`:
- "dequant" (default, any device): expand the weight to the activation dtype and call F.linear. The numbers
  are those of the dequantized model exactly; the memory is the FP8 one between calls.
- "fp8": quantize the activations per token in groups of 128 (dynamic, as the checkpoint's
  `activation_scheme` says) and multiply FP8 by FP8. On Hopper with CUDA >= 12.9 this is one blockwise
  scaled_mm (1×128 activation scales, 128×128 weight scales); elsewhere (CPU, Ada, older CUDA) it is one
  row-wise scaled_mm per 128-wide slice of the inner dimension, summed in fp32 — the same arithmetic, slower.
  The two computes differ only by the activation rounding: relative error under `FP8_COMPUTE_RTOL` (tests/test_fp8.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128
# e4m3 has 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself;
# below 2^-6 (subnormals, step 2^-9) by at most 2^-10 in absolute terms (units of the block scale).
E4M3_REL_ERROR = 2.0**-4
E4M3_SUBNORMAL_ABS_ERROR = 2.0**-10
# "fp8" compute vs "dequant" compute: the activations are rounded to e4m3 too (≈2.6% relative RMS error
# for Gaussian inputs), so ‖y_fp8 − y_dequant‖ / ‖y_dequant‖ stays under this; the tests hold both to it.
FP8_COMPUTE_RTOL = 0.05

# What stays in BF16 (names as transformers matches them: suffix at a module boundary). Why, in README.md:
# embeddings and output heads are lookups / the logits themselves, the router picks experts by small
# score differences, the indexer's weights_proj weighs its heads (transformers keeps it in fp32), eh_proj
# is MTP's small fusion projection. Norms, biases and the router's correction bias are 1-D and never quantized.
MODULES_TO_NOT_CONVERT = [
    "model.embed_tokens",
    "lm_head",
    "mlp.gate",
    "indexer.weights_proj",
    "eh_proj",
    "shared_head.head",
]


def quantization_config(modules_to_not_convert: list[str] | None = None) -> dict:
    """The `quantization_config` entry of config.json, as GLM-5-FP8 and DeepSeek-V3 write it."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert),
    }


def should_quantize(module_name: str, modules_to_not_convert: Iterable[str] = MODULES_TO_NOT_CONVERT) -> bool:
    """True unless a pattern matches the module name as a suffix at a '.' boundary ("mlp.gate" ≠ "mlp.gate_proj")."""
    for pattern in modules_to_not_convert:
        if module_name == pattern or module_name.endswith("." + pattern):
            return False
        if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module_name):
            return False
    return True


# ---------------------------------------------------------------------------------------------- block math
def _block_grid(rows: int, cols: int, block: int) -> tuple[int, int]:
    return math.ceil(rows / block), math.ceil(cols / block)


def quantize_fp8_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., rows, cols] (any float dtype) -> (fp8 [..., rows, cols], fp32 scale_inv [..., ⌈rows/b⌉, ⌈cols/b⌉]).

    Leading dimensions (fused experts [E, rows, cols]) are independent matrices. An all-zero block gets scale 1.
    """
    if weight.ndim < 2:
        raise ValueError(f"quantize_fp8_blockwise: need a matrix [..., rows, cols], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"quantize_fp8_blockwise: need a float tensor, got {weight.dtype}")
    *lead, rows, cols = weight.shape
    grid_rows, grid_cols = _block_grid(rows, cols, block)
    padded = F.pad(weight.float(), (0, grid_cols * block - cols, 0, grid_rows * block - rows))
    tiles = padded.reshape(*lead, grid_rows, block, grid_cols, block)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., grid_rows, grid_cols]
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_fp8_blockwise: the weight holds inf or NaN")
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = tiles / scale_inv[..., :, None, :, None]
    weight_fp8 = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # cast rounds to nearest; clamp keeps 448·(1+ε) finite
    weight_fp8 = weight_fp8.reshape(*lead, grid_rows * block, grid_cols * block)[..., :rows, :cols].contiguous()
    return weight_fp8, scale_inv.contiguous()


def dequantize_fp8_blockwise(
    weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """fp8 [..., rows, cols] × the fp32 scale of each 128×128 block -> `dtype` [..., rows, cols]."""
    *lead, rows, cols = weight_fp8.shape
    expected = (*lead, *_block_grid(rows, cols, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_fp8_blockwise: weight {tuple(weight_fp8.shape)} with block {block} needs scale_inv "
            f"{expected}, got {tuple(scale_inv.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :rows, :cols]
    return (weight_fp8.float() * scale).to(dtype)


def quantize_fp8_per_token_group(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [..., K] -> (fp8 [..., K], fp32 scales [..., ⌈K/group⌉]), one per token and group."""
    *lead, k = x.shape
    n_groups = math.ceil(k / group)
    padded = F.pad(x.float(), (0, n_groups * group - k)).reshape(*lead, n_groups, group)
    amax = padded.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x_fp8 = (padded / scales[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8.reshape(*lead, n_groups * group)[..., :k].contiguous(), scales.contiguous()


# ---------------------------------------------------------------------------------------------- FP8 matmul
def fp8_matmul_supported(out_features: int, in_features: int, block: int = BLOCK) -> bool:
    """Shapes the scaled_mm paths take: whole 128-blocks along K (scales line up) and N a multiple of 16."""
    return block == BLOCK and in_features % block == 0 and out_features % 16 == 0


_blockwise_scaled_mm_failed: dict[torch.device, str] = {}  # device -> why the one-call blockwise path is off


def _blockwise_scaled_mm_available(device: torch.device) -> bool:
    if device.type != "cuda" or device in _blockwise_scaled_mm_failed:
        return False
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return major == 9 and cuda >= (12, 9)  # cuBLASLt's 1x128 / 128x128 block scaling is Hopper-only


def last_fp8_matmul_path() -> str:
    """Which path the last fp8_matmul call took ("blockwise" or "rowwise-loop"): for tests and reports."""
    return _last_path[0]


_last_path = ["none"]


def fp8_matmul(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x [..., K] (float) @ weight [N, K]ᵀ with weight in block-wise FP8 -> [..., N], activations quantized per token group."""
    n, k = weight_fp8.shape
    if not fp8_matmul_supported(n, k):
        raise ValueError(f"fp8_matmul: weight [{n}, {k}] needs K % {BLOCK} == 0 and N % 16 == 0")
    out_dtype = out_dtype or (x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros(*lead, n, dtype=out_dtype)
    # cuBLASLt's FP8 GEMMs refuse some row counts (seen on H200: one token, 33 tokens); zero rows padded to a
    # multiple of 16 cost nothing in the result and are sliced off below
    m_padded = 16 * math.ceil(m / 16)
    if m_padded != m:
        x2 = F.pad(x2, (0, 0, 0, m_padded - m))
    x_fp8, x_scales = quantize_fp8_per_token_group(x2)  # [M, K], [M, K/128]
    k_blocks = k // BLOCK
    if _blockwise_scaled_mm_available(x2.device) and n % BLOCK == 0:
        try:
            # cuBLASLt layout: scale_a [M, K/128] column-major; scale_b [L4, N/128] column-major, L4 = K/128 rounded up to 4
            l4 = 4 * math.ceil(k_blocks / 4)
            scale_a = x_scales.t().contiguous().t()
            scale_b = F.pad(weight_scale_inv.float(), (0, l4 - k_blocks)).contiguous().t()
            out = F.scaled_mm(
                x_fp8, weight_fp8.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, F.ScalingType.BlockWise128x128,
                F.SwizzleType.NO_SWIZZLE, F.SwizzleType.NO_SWIZZLE, output_dtype=torch.bfloat16,
            )
            _last_path[0] = "blockwise"
            return out[:m].to(out_dtype).reshape(*lead, n)
        except (RuntimeError, ValueError, NotImplementedError) as err:  # an older cuBLASLt: use the loop from now on
            _blockwise_scaled_mm_failed[x2.device] = f"{type(err).__name__}: {err}"
    # One row-wise scaled_mm per 128-wide K slice: scale_a = the tokens' group scales, scale_b = each output
    # row's block scale for that slice. Partial sums in bf16 (scaled_mm's row-wise output), accumulated in fp32.
    row_scales = weight_scale_inv.float().repeat_interleave(BLOCK, dim=0)[:n]  # [N, K/128]
    out = torch.zeros(m_padded, n, dtype=torch.float32, device=x2.device)
    for kb in range(k_blocks):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        part = torch._scaled_mm(
            x_fp8[:, cols].contiguous(),
            weight_fp8[:, cols].contiguous().t(),
            scale_a=x_scales[:, kb : kb + 1].contiguous(),
            scale_b=row_scales[:, kb].contiguous().reshape(1, n),
            out_dtype=torch.bfloat16,
        )
        out += part.float()
    _last_path[0] = "rowwise-loop"
    return out[:m].to(out_dtype).reshape(*lead, n)


# ---------------------------------------------------------------------------------------------- modules
COMPUTE_MODES = ("dequant", "fp8")
# Modules whose weight the model reads directly rather than calling them: MLA's absorbed attention takes
# kv_b_proj.weight apart into W_UK / W_UV. They are FP8 on disk and dequantized once on load (BF16 in memory).
DEQUANTIZE_ON_LOAD = ["self_attn.kv_b_proj"]


class _KeepsStorageDtypes(nn.Module):
    """model.to(torch.bfloat16) moves an FP8 module's tensors but must not cast its fp8 weights or fp32 scales."""

    def _apply(self, fn, recurse=True):
        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(move_only, recurse)


class FP8Linear(_KeepsStorageDtypes):
    """A bias-free or biased linear layer whose weight is block-wise FP8; state_dict keys `weight`, `weight_scale_inv`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, compute: str = "dequant"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        grid = _block_grid(out_features, in_features, BLOCK)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.ones(grid, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.compute = compute

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        weight_fp8, scale_inv = quantize_fp8_blockwise(linear.weight.detach())
        module.weight.data, module.weight_scale_inv.data = weight_fp8, scale_inv
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "fp8" and fp8_matmul_supported(self.out_features, self.in_features):
            out = fp8_matmul(x, self.weight, self.weight_scale_inv, out_dtype=x.dtype)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 block {BLOCK}, compute={self.compute}"


class FP8Experts(_KeepsStorageDtypes):
    """Routed experts with FP8 weights, fused like the model's: gate_up_proj [E, 2I, H], down_proj [E, H, I].

    Scales keep the checkpoint's per-projection grids: gate_up_proj_scale_inv is the gate grid [E, ⌈I/128⌉, ⌈H/128⌉]
    stacked over the up grid, so a block never straddles gate and up even when I is not a multiple of 128.
    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], the model's experts contract;
    only the experts some token picked are dequantized (or multiplied in FP8), one at a time.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_fn=F.silu, device=None,
                 compute: str = "dequant"):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        gate_rows, h_cols = _block_grid(intermediate_size, hidden_size, BLOCK)
        down_grid = _block_grid(hidden_size, intermediate_size, BLOCK)
        self.gate_up_proj = nn.Parameter(
            torch.zeros(num_experts, 2 * intermediate_size, hidden_size, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(
            torch.ones(num_experts, 2 * gate_rows, h_cols, dtype=torch.float32, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.zeros(num_experts, hidden_size, intermediate_size, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(
            torch.ones(num_experts, *down_grid, dtype=torch.float32, device=device), requires_grad=False)
        self.act_fn = act_fn
        self.compute = compute

    @classmethod
    def from_experts(cls, experts: nn.Module) -> FP8Experts:
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        num_experts, two_i, hidden = gate_up.shape
        inter = two_i // 2
        module = cls(num_experts, hidden, inter, act_fn=getattr(experts, "act_fn", F.silu), device=gate_up.device)
        for e in range(num_experts):  # one expert at a time: no fp32 copy of the whole stack
            module.set_expert(e, gate_up[e, :inter], gate_up[e, inter:], down[e])
        return module

    def set_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantize one expert's gate [I, H], up [I, H], down [H, I] into slot e."""
        inter = self.intermediate_dim
        gate_rows = self.gate_up_proj_scale_inv.shape[1] // 2
        for rows, scale_rows, w in ((slice(0, inter), slice(0, gate_rows), gate),
                                    (slice(inter, 2 * inter), slice(gate_rows, 2 * gate_rows), up)):
            q, s = quantize_fp8_blockwise(w)
            self.gate_up_proj.data[e, rows], self.gate_up_proj_scale_inv.data[e, scale_rows] = q, s
        q, s = quantize_fp8_blockwise(down)
        self.down_proj.data[e], self.down_proj_scale_inv.data[e] = q, s

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e dequantized: gate_up [2I, H], down [H, I]."""
        inter, gate_rows = self.intermediate_dim, self.gate_up_proj_scale_inv.shape[1] // 2
        w, s = self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]
        gate_up = torch.cat([dequantize_fp8_blockwise(w[:inter], s[:gate_rows], dtype=dtype),
                             dequantize_fp8_blockwise(w[inter:], s[gate_rows:], dtype=dtype)])
        return gate_up, dequantize_fp8_blockwise(self.down_proj[e], self.down_proj_scale_inv[e], dtype=dtype)

    def _fp8_ok(self) -> bool:
        # the fused gate_up grid is one matrix's grid only when I is whole blocks
        return (self.compute == "fp8" and self.intermediate_dim % BLOCK == 0
                and fp8_matmul_supported(2 * self.intermediate_dim, self.hidden_dim)
                and fp8_matmul_supported(self.hidden_dim, self.intermediate_dim))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        use_fp8 = self._fp8_ok()
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            if use_fp8:
                gate, up = fp8_matmul(x, self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]).chunk(2, dim=-1)
                y = fp8_matmul(self.act_fn(gate) * up, self.down_proj[e], self.down_proj_scale_inv[e])
            else:
                gate_up, down = self.expert_weights(e, x.dtype)
                gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, down)
            y = y * top_k_weights[token_idx, slot, None].to(y.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"fp8 e4m3 block {BLOCK}, compute={self.compute}")


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == 3 and down.ndim == 3


def quantize_model_fp8(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> nn.Module:
    """Replace, in place, every nn.Linear by FP8Linear and every fused experts module by FP8Experts, except
    modules matched by `modules_to_not_convert` (default MODULES_TO_NOT_CONVERT). DEQUANTIZE_ON_LOAD modules stay
    nn.Linear holding their weight rounded through FP8, so the numbers equal those of the FP8 checkpoint loaded."""
    skip = MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert
    targets = []
    for name, module in model.named_modules():
        if not name or not should_quantize(name, skip):
            continue
        if type(module) is nn.Linear or _is_fused_experts(module):
            targets.append((name, module))
    for name, module in targets:
        if isinstance(module, nn.Linear) and not should_quantize(name, DEQUANTIZE_ON_LOAD):
            with torch.no_grad():
                module.weight.copy_(dequantize_fp8_blockwise(*quantize_fp8_blockwise(module.weight), dtype=module.weight.dtype))
            continue
        new = FP8Linear.from_linear(module) if isinstance(module, nn.Linear) else FP8Experts.from_experts(module)
        model.set_submodule(name, new)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra"):
        config.extra["quantization_config"] = quantization_config(list(skip))
    return model


def load_fp8_model(directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   compute: str = "dequant", attn_impl: str = "sparse", dequantize: bool = False) -> nn.Module:
    """A GLM5ForCausalLM from an FP8 directory (`glm5 quantize fp8` output, or a GLM-5-FP8-style checkpoint).

    Which modules are FP8 is read from the file (a `weight_scale_inv` beside the weight), not assumed. The
    model is built on the meta device and allocated once; weights stream in tensor by tensor. With
    `dequantize=True` every FP8 weight is dequantized into a plain `dtype` model as it streams in (what the
    engine serves: its runner fuses and absorbs the attention weights itself).
    """
    from glm5.checkpoint import CheckpointError, empty_model_for, iter_checkpoint_tensors, route_hub_key
    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM

    qcfg = GLM5Config.from_pretrained(directory).extra.get("quantization_config") or {}
    if qcfg.get("quant_method") != "fp8" or list(qcfg.get("weight_block_size", [])) != [BLOCK, BLOCK]:
        raise ValueError(f"{directory}: config.json has no block-wise FP8 quantization_config "
                         f"(quant_method 'fp8', weight_block_size [128, 128]); got {qcfg or None}")

    def swap_in_fp8_modules(model: nn.Module, keys: list[str]) -> None:
        # which modules are FP8 is read from the file (a weight_scale_inv beside the weight), not assumed
        if dequantize:
            return
        scaled = {k.removesuffix(".weight_scale_inv") for k in keys if k.endswith(".weight_scale_inv")}
        for name, module in list(model.named_modules()):
            hub = _hub_module_name(name, model.config)
            if type(module) is nn.Linear and hub in scaled and should_quantize(name, DEQUANTIZE_ON_LOAD):
                model.set_submodule(name, FP8Linear(module.in_features, module.out_features, bias=module.bias is not None))
            elif _is_fused_experts(module) and f"{hub}.0.gate_proj" in scaled:
                experts, two_i, hidden = module.gate_up_proj.shape
                model.set_submodule(name, FP8Experts(experts, hidden, two_i // 2))

    model, _ = empty_model_for(directory, GLM5ForCausalLM, device=device, dtype=dtype, attn_impl=attn_impl,
                               prepare=swap_in_fp8_modules)
    cfg = model.config

    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    filled: dict[str, int] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # DEQUANTIZE_ON_LOAD: weight and scale may come apart
    for key, tensor in iter_checkpoint_tensors(directory):
        is_scale = key.endswith(".weight_scale_inv")
        routed = route_hub_key(key.removesuffix("_scale_inv") if is_scale else key, cfg)
        if routed is None:
            continue
        name, spec = routed
        if spec is not None:  # one expert's gate / up / down of a fused experts module
            expert, proj = spec
            if name in params and params[name].dtype != FP8_DTYPE and (is_scale or tensor.dtype == FP8_DTYPE):
                # plain experts (dequantize=True): wait for the weight and its scale, then dequantize
                parts = pending.setdefault(f"{name}[{expert}].{proj}", {})
                parts["scale" if is_scale else "weight"] = tensor
                if len(parts) < 2:
                    continue
                tensor = dequantize_fp8_blockwise(parts["weight"], parts["scale"], dtype=params[name].dtype)
                del pending[f"{name}[{expert}].{proj}"]
                is_scale = False
            target_name = name + "_scale_inv" if is_scale else name
            if target_name not in params:
                raise CheckpointError(f"{key}: the model has no {target_name}")
            target = params[target_name][expert]
            if proj != "down_proj":
                half = target.shape[0] // 2
                target = target[:half] if proj == "gate_proj" else target[half:]
            if not is_scale and tensor.dtype != FP8_DTYPE and target.dtype == FP8_DTYPE:
                raise CheckpointError(f"{key}: expected FP8 like the other experts, got {tensor.dtype}")
        elif is_scale and name.removesuffix(".weight") + ".weight_scale_inv" in params:
            target_name = name.removesuffix(".weight") + ".weight_scale_inv"
            target = params[target_name]
        elif name in params and params[name].dtype != FP8_DTYPE and (is_scale or tensor.dtype == FP8_DTYPE):
            # a DEQUANTIZE_ON_LOAD weight: wait for both halves, then dequantize into the BF16 module
            parts = pending.setdefault(name, {})
            parts["scale" if is_scale else "weight"] = tensor
            if len(parts) < 2:
                continue
            tensor = dequantize_fp8_blockwise(parts["weight"], parts["scale"], dtype=params[name].dtype)
            del pending[name]
            target_name, target = name, params[name]
        else:
            if name not in params:
                raise CheckpointError(f"{directory}: tensor {key!r} has no place in the model")
            target_name, target = name, params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} does not match the model's {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor if target.dtype == FP8_DTYPE else tensor.to(target.dtype))
        filled[target_name] = filled.get(target_name, 0) + target.numel()
    if pending:
        raise CheckpointError(f"{directory}: FP8 weight without its scale (or scale without weight): {sorted(pending)[:4]}")
    missing = [n for n, t in params.items() if not n.endswith("inv_freq") and filled.get(n, 0) != t.numel()
               and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensors missing from the checkpoint: {', '.join(missing[:8])}")
    set_fp8_compute(model, compute)
    return model.eval()


def _hub_module_name(name: str, cfg) -> str:
    """The checkpoint's name for an in-memory module: MTP depth d (`mtp.d.…`) is layer num_hidden_layers + d."""
    if name.startswith("mtp."):
        depth, _, rest = name[4:].partition(".")
        return f"model.layers.{cfg.num_hidden_layers + int(depth)}" + (f".{rest}" if rest else "")
    return name


def set_fp8_compute(model: nn.Module, compute: str) -> int:
    """Switch every FP8 module of `model` to "dequant" or "fp8" compute; returns how many modules it switched."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute={compute!r}: expected one of {COMPUTE_MODES}")
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear | FP8Experts):
            module.compute = compute
            count += 1
    return count


def fp8_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as held (fp8 weights count 1 byte each)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
