"""Low-bit checkpoints (int4, the q2 mix, ternary) as modules of the model, on disk and back.

    from glm5.quant.lowbit_model import quantize_model_lowbit, save_quantized, load_quantized_model
    quantize_model_lowbit(model, "glm5-int4", method="gptq", hessians=hessians)   # in place: QuantLinear / QuantExperts
    save_quantized(model, "out-int4/")
    model = load_quantized_model("out-int4/")        # packed weights in memory, dequantized per matmul

Formats (`quantization_config.quant_method`, our own names; transformers has no loader for them):
    glm5-int4     4-bit groups of 128 inputs (asymmetric by default, `symmetric` says), RTN or GPTQ (`method`)
    glm5-q2mix    per-tensor bits from {2, 3, 4, 8} chosen on calibration data under an average-bits budget
                  (`tensor_bits` lists each module's bits; `avg_bits` the achieved average)
    glm5-ternary  {-1, 0, +1} × one absmean scale per matrix (BitNet b1.58), trits packed five per byte
On disk, a quantized `X.weight` becomes `X.qweight` (uint8, packed along the input dimension), `X.scales`
([out, groups], float16; float32 for ternary) and, if asymmetric, `X.qzeros` (uint8 [out, groups]); routed
experts keep transformers' per-expert names (`mlp.experts.E.gate_proj.qweight`, …). What stays unquantized is
FP8's list (`glm5.quant.fp8.MODULES_TO_NOT_CONVERT`: embeddings, heads, router, indexer weights_proj, MTP
eh_proj, norms) for the same reasons. `self_attn.kv_b_proj` is quantized but kept as a dense weight holding its
quantized values (in memory and as written by `save_quantized`), because MLA's absorbed attention takes its weight
apart; the loader also accepts it packed (qweight / scales), and then expands it once.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from glm5.quant.fp8 import (
    DEQUANTIZE_ON_LOAD,
    MODULES_TO_NOT_CONVERT,
    _hub_module_name,
    _is_fused_experts,
    _KeepsStorageDtypes,
    should_quantize,
)
from glm5.quant.load import METHODS  # one list of the low-bit quant_method names
from glm5.quant.lowbit import (
    DEFAULT_GROUP_SIZE,
    TERNARY,
    QuantizedWeight,
    bits_per_weight,
    dequantize,
    dequantize_parts,
    quantize_gptq,
    quantize_rtn,
    quantize_ternary,
)

PARTS = ("qweight", "scales", "qzeros")
_FUSED_PART = re.compile(r"^(.*\.mlp\.experts\.)(gate_up|down)_(qweight|scales|qzeros)$")
_EXPERT_PART = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.(qweight|scales|qzeros)$")


def _packed_width(bits: int, in_features: int) -> int:
    return -(-in_features // 5) if bits == TERNARY else -(-in_features // 8) * bits


def _groups(bits: int, in_features: int, group_size: int) -> int:
    return 1 if bits == TERNARY else -(-in_features // group_size)


class QuantLinear(_KeepsStorageDtypes):
    """A linear layer holding a packed low-bit weight (buffers qweight, scales[, qzeros]); dequantized per call."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 symmetric: bool = False, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == TERNARY else group_size
        groups = _groups(bits, in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(out_features, _packed_width(bits, in_features), dtype=torch.uint8, device=device))
        scale_dtype = torch.float32 if bits == TERNARY else torch.float16
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        has_zeros = not symmetric and bits != TERNARY
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device) if has_zeros else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        out = qw.qweight.shape[0]
        module = cls(qw.in_features, out, qw.bits, qw.group_size, qw.symmetric, bias is not None, qw.qweight.device)
        module.qweight, module.scales, module.qzeros = qw.qweight, qw.scales, qw.qzeros
        if bias is not None:
            module.bias.data = bias.detach().clone()
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes (uint8, no grad), for code that asks a linear's weight for its device or grad;
        the numbers are `dequantized_weight(dtype)`."""
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_parts(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "ternary" if self.bits == TERNARY else f"int{self.bits} group {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


class QuantExperts(_KeepsStorageDtypes):
    """Routed experts with packed weights, fused like the model's (gate rows then up rows, [E, 2I, H]; down
    [E, H, I]): buffers gate_up_{qweight,scales,qzeros} and down_{…}. Groups run along each row's inputs, so
    gate and up rows stack without sharing a group. forward(hidden [T, H], top_k_index, top_k_weights) -> [T, H],
    the model's experts contract; only experts some token picked are dequantized."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gate_up_bits: int, down_bits: int,
                 group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False, act_fn=F.silu, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        self.bits = {"gate_up": gate_up_bits, "down": down_bits}
        self.group_sizes = {}
        self.act_fn = act_fn
        for proj, rows, cols in (("gate_up", 2 * intermediate_size, hidden_size), ("down", hidden_size, intermediate_size)):
            bits = self.bits[proj]
            group = cols if bits == TERNARY else group_size
            self.group_sizes[proj] = group
            groups = _groups(bits, cols, group)
            scale_dtype = torch.float32 if bits == TERNARY else torch.float16
            self.register_buffer(f"{proj}_qweight", torch.zeros(num_experts, rows, _packed_width(bits, cols), dtype=torch.uint8, device=device))
            self.register_buffer(f"{proj}_scales", torch.ones(num_experts, rows, groups, dtype=scale_dtype, device=device))
            zeros = None if symmetric or bits == TERNARY else torch.zeros(num_experts, rows, groups, dtype=torch.uint8, device=device)
            self.register_buffer(f"{proj}_qzeros", zeros)

    def set_projection(self, proj: str, e: int, rows: slice, qw: QuantizedWeight) -> None:
        getattr(self, f"{proj}_qweight")[e, rows] = qw.qweight
        getattr(self, f"{proj}_scales")[e, rows] = qw.scales
        if qw.qzeros is not None:
            getattr(self, f"{proj}_qzeros")[e, rows] = qw.qzeros

    def _dequant(self, proj: str, index, dtype: torch.dtype) -> torch.Tensor:
        zeros = getattr(self, f"{proj}_qzeros")
        cols = self.hidden_dim if proj == "gate_up" else self.intermediate_dim
        return dequantize_parts(getattr(self, f"{proj}_qweight")[index], getattr(self, f"{proj}_scales")[index],
                                None if zeros is None else zeros[index], self.bits[proj], self.group_sizes[proj], cols, dtype)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e dequantized: gate_up [2I, H], down [H, I]."""
        return self._dequant("gate_up", e, dtype), self._dequant("down", e, dtype)

    def dequantized_stack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert dequantized: gate_up [E, 2I, H], down [E, H, I] (the engine's sync-free MoE)."""
        return self._dequant("gate_up", slice(None), dtype), self._dequant("down", slice(None), dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            gate_up, down = self.expert_weights(e, x.dtype)
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, down) * top_k_weights[token_idx, slot, None].to(x.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, bits={self.bits}"


# ---------------------------------------------------------------------------------------------- conversion
def quant_targets(model: nn.Module, skip: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear and fused experts module a low-bit format quantizes."""
    skip = MODULES_TO_NOT_CONVERT if skip is None else skip
    return [(name, m) for name, m in model.named_modules()
            if name and should_quantize(name, skip) and (type(m) is nn.Linear or _is_fused_experts(m))]


def tensor_units(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    """The units that get one bit width each: a linear's weight, or all of a layer's routed gate_up / down
    (unit name -> weights: one [out, in] matrix, or E of them)."""
    units = {}
    for name, module in quant_targets(model):
        if type(module) is nn.Linear:
            units[name] = (module.weight.detach(),)
        else:
            units[f"{name}.gate_up"] = tuple(module.gate_up_proj.detach().unbind(0))
            units[f"{name}.down"] = tuple(module.down_proj.detach().unbind(0))
    return units


def _quantize_matrix(w: torch.Tensor, bits: int, method: str, hessian: torch.Tensor | None, group_size: int,
                     symmetric: bool) -> QuantizedWeight:
    if bits == TERNARY:
        return quantize_ternary(w)
    if method == "gptq" and hessian is not None and torch.diag(hessian).sum() > 0:
        return quantize_gptq(w, hessian, bits, group_size, symmetric)
    return quantize_rtn(w, bits, group_size, symmetric)  # rtn, or no calibration input reached this matrix


def quantize_model_lowbit(model: nn.Module, quant_method: str, *, method: str = "rtn", bits: int = 4,
                          tensor_bits: dict[str, int] | None = None, hessians: dict | None = None,
                          group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False, log=None) -> nn.Module:
    """Replace, in place, the quantizable modules by QuantLinear / QuantExperts.

    quant_method "glm5-int4" (`bits`, `method` rtn | gptq with `hessians` from glm5.quant.calibrate),
    "glm5-q2mix" (`tensor_bits`: unit -> bits, see `tensor_units`; GPTQ when hessians are given), or
    "glm5-ternary". DEQUANTIZE_ON_LOAD modules stay nn.Linear holding their quantized-then-dequantized weight,
    so the numbers equal those of the checkpoint loaded back.
    """
    if quant_method not in METHODS:
        raise ValueError(f"quant_method {quant_method!r}: expected one of {METHODS}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method {method!r}: expected rtn or gptq")
    if method == "gptq" and not hessians:
        raise ValueError("method gptq needs calibration hessians (glm5.quant.calibrate.collect_hessians)")
    hessians = hessians or {}

    def bits_of(unit: str) -> int:
        if quant_method == "glm5-ternary":
            return TERNARY
        if quant_method == "glm5-q2mix":
            if tensor_bits is None or unit not in tensor_bits:
                raise ValueError(f"glm5-q2mix: no bit width for {unit}")
            return tensor_bits[unit]
        return bits

    chosen: dict[str, int] = {}
    sizes = {unit: sum(w.numel() for w in ws) for unit, ws in tensor_units(model).items()}
    targets = quant_targets(model)
    for i, (name, module) in enumerate(targets):
        if type(module) is nn.Linear:
            b = chosen[name] = bits_of(name)
            qw = _quantize_matrix(module.weight.detach().float(), b, method, hessians.get(name), group_size, symmetric)
            if not should_quantize(name, DEQUANTIZE_ON_LOAD):
                with torch.no_grad():
                    module.weight.copy_(dequantize(qw, module.weight.dtype))
            else:
                model.set_submodule(name, QuantLinear.from_quantized(qw, module.bias))
        else:
            b_gu, b_down = chosen[f"{name}.gate_up"], chosen[f"{name}.down"] = bits_of(f"{name}.gate_up"), bits_of(f"{name}.down")
            num_experts, two_i, hidden = module.gate_up_proj.shape
            inter = two_i // 2
            new = QuantExperts(num_experts, hidden, inter, b_gu, b_down, group_size, symmetric,
                               act_fn=getattr(module, "act_fn", F.silu), device=module.gate_up_proj.device)
            h_gu, h_down = hessians.get(f"{name}.gate_up"), hessians.get(f"{name}.down")
            for e in range(num_experts):
                gate_up = module.gate_up_proj[e].detach().float()
                he = None if h_gu is None else h_gu[e]
                # gate and up are separate matrices on disk (and for ternary each has its own absmean)
                new.set_projection("gate_up", e, slice(0, inter), _quantize_matrix(gate_up[:inter], b_gu, method, he, group_size, symmetric))
                new.set_projection("gate_up", e, slice(inter, two_i), _quantize_matrix(gate_up[inter:], b_gu, method, he, group_size, symmetric))
                new.set_projection("down", e, slice(None), _quantize_matrix(
                    module.down_proj[e].detach().float(), b_down, method, None if h_down is None else h_down[e], group_size, symmetric))
            model.set_submodule(name, new)
        if log:
            log(f"  [{i + 1}/{len(targets)}] {name}")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra"):
        config.extra["quantization_config"] = quantization_config(model, quant_method, method, chosen, group_size, symmetric, sizes)
    return model


def quantization_config(model: nn.Module, quant_method: str, method: str, unit_bits: dict[str, int], group_size: int,
                        symmetric: bool, sizes: dict[str, int]) -> dict:
    """config.json's entry: how to read the packed tensors back, and the bits the format achieved (stored bits,
    scales and zero points included, per quantized weight)."""
    cfg = model.config
    stored = sum(bits_per_weight(unit_bits[u], group_size, symmetric) * n for u, n in sizes.items())
    total = sum(sizes.values()) or 1
    return {
        "quant_method": quant_method,
        "method": "absmean" if quant_method == "glm5-ternary" else method,
        "group_size": group_size,
        "symmetric": symmetric or quant_method == "glm5-ternary",
        "bits": "1.58" if quant_method == "glm5-ternary" else (max(unit_bits.values()) if quant_method == "glm5-int4" else "mixed"),
        "avg_bits": round(stored / total, 4),
        "tensor_bits": {_hub_module_name(u, cfg): b for u, b in sorted(unit_bits.items())},
        "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT),
    }


# ---------------------------------------------------------------------------------------------- save / load
def quantized_hub_items(model: nn.Module):
    """(hub key, tensor) of a quantized model: fused packed experts split into transformers' per-expert names."""
    from glm5.checkpoint import hub_state_items

    inter = model.config.moe_intermediate_size
    for key, tensor in hub_state_items(model):
        m = _FUSED_PART.match(key)
        if not m:
            yield key, tensor
            continue
        base, proj, part = m.groups()
        for e in range(tensor.shape[0]):
            if proj == "gate_up":
                yield f"{base}{e}.gate_proj.{part}", tensor[e, :inter]
                yield f"{base}{e}.up_proj.{part}", tensor[e, inter:]
            else:
                yield f"{base}{e}.down_proj.{part}", tensor[e]


def save_quantized(model: nn.Module, directory: str) -> str:
    """config.json (with quantization_config) + safetensors of packed weights, written atomically."""
    from glm5.checkpoint import save_pretrained

    if "quantization_config" not in model.config.extra:
        raise ValueError("save_quantized: the model has no quantization_config (quantize it first)")
    return save_pretrained(model, directory, items=quantized_hub_items(model))


def _route_part(key: str, cfg) -> tuple[str, tuple | None]:
    """A packed part's hub key -> (our buffer name, (expert, proj) or None)."""
    L = cfg.num_hidden_layers

    def ours(hub: str) -> str:
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", hub)
        if m and int(m.group(1)) >= L:
            return f"mtp.{int(m.group(1)) - L}.{m.group(2)}"
        return hub

    m = _EXPERT_PART.match(key)
    if m:
        base, expert, proj, part = m.groups()
        fused = "down" if proj == "down_proj" else "gate_up"
        return f"{ours(base)}{fused}_{part}", (int(expert), proj)
    return ours(key), None


def load_quantized_model(directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         attn_impl: str = "sparse") -> nn.Module:
    """A GLM5ForCausalLM from a low-bit directory (`glm5 quantize int4|q2|ternary` or a ternary-trained model):
    QuantLinear / QuantExperts hold the packed weights; DEQUANTIZE_ON_LOAD modules are expanded once."""
    from glm5.checkpoint import CheckpointError, empty_model_for, iter_checkpoint_tensors, route_hub_key
    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM

    qcfg = GLM5Config.from_pretrained(directory).extra.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"{directory}: config.json's quantization_config is not a low-bit one ({METHODS}); got {method!r}")
    group_size, symmetric = int(qcfg.get("group_size", DEFAULT_GROUP_SIZE)), bool(qcfg.get("symmetric", False))
    hub_bits = {k: int(v) for k, v in (qcfg.get("tensor_bits") or {}).items()}

    def swap_in(model: nn.Module, keys: list[str]) -> None:
        for name, module in list(model.named_modules()):
            hub = _hub_module_name(name, model.config)
            if type(module) is nn.Linear and hub in hub_bits:
                if should_quantize(name, DEQUANTIZE_ON_LOAD):
                    model.set_submodule(name, QuantLinear(module.in_features, module.out_features, hub_bits[hub],
                                                          group_size, symmetric, bias=module.bias is not None))
            elif _is_fused_experts(module) and f"{hub}.gate_up" in hub_bits:
                experts, two_i, hidden = module.gate_up_proj.shape
                model.set_submodule(name, QuantExperts(experts, hidden, two_i // 2, hub_bits[f"{hub}.gate_up"],
                                                       hub_bits[f"{hub}.down"], group_size, symmetric))

    model, _ = empty_model_for(directory, GLM5ForCausalLM, device=device, dtype=dtype, attn_impl=attn_impl, prepare=swap_in)
    cfg = model.config
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    filled: dict[str, int] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # DEQUANTIZE_ON_LOAD modules: all parts, then expand
    for key, tensor in iter_checkpoint_tensors(directory):
        part = key.rpartition(".")[2]
        if part in PARTS:
            name, spec = _route_part(key, cfg)
            if spec is None and name not in targets:
                module_name = name.rpartition(".")[0]
                weight = module_name + ".weight"
                if weight not in targets:
                    raise CheckpointError(f"{directory}: tensor {key!r} has no place in the model")
                parts = pending.setdefault(module_name, {})
                parts[part] = tensor
                needed = 2 + (not symmetric and hub_bits.get(_hub_module_name(module_name, cfg)) != TERNARY)
                if len(parts) < needed:
                    continue
                linear = model.get_submodule(module_name)
                bits = hub_bits[_hub_module_name(module_name, cfg)]
                tensor = dequantize_parts(parts["qweight"], parts["scales"], parts.get("qzeros"), bits,
                                          linear.in_features if bits == TERNARY else group_size, linear.in_features,
                                          targets[weight].dtype)
                del pending[module_name]
                name, target = weight, targets[weight]
            elif name not in targets:
                raise CheckpointError(f"{directory}: tensor {key!r} has no place in the model")
            else:
                target = targets[name]
                if spec is not None:
                    expert, proj = spec
                    target = target[expert]
                    if proj != "down_proj":
                        half = target.shape[0] // 2
                        target = target[:half] if proj == "gate_proj" else target[half:]
        else:
            routed = route_hub_key(key, cfg)
            if routed is None:
                continue
            name, spec = routed
            if name not in targets:
                raise CheckpointError(f"{directory}: tensor {key!r} has no place in the model")
            target = targets[name]
            if spec is not None:
                raise CheckpointError(f"{directory}: {key!r} is unquantized but its experts module is quantized")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} does not match the model's {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor if not target.is_floating_point() or part in PARTS else tensor.to(target.dtype))
        filled[name] = filled.get(name, 0) + target.numel()
    if pending:
        raise CheckpointError(f"{directory}: packed weight without all its parts: {sorted(pending)[:4]}")
    missing = [n for n, t in targets.items() if t is not None and not n.endswith("inv_freq") and filled.get(n, 0) != t.numel()
               and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensors missing from the checkpoint: {', '.join(missing[:8])}")
    return model.eval()


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every QuantLinear / QuantExperts by plain modules with the dequantized weights (a
    model RL or further training can update; drops quantization_config)."""
    from glm5.model.moe import Experts

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.qweight.device)
            dtype = model.model.embed_tokens.weight.dtype
            linear = linear.to(dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
        elif isinstance(module, QuantExperts):
            dtype = model.model.embed_tokens.weight.dtype
            with torch.device("meta"):
                experts = Experts(model.config)
            gate_up, down = module.dequantized_stack(dtype)
            experts.gate_up_proj = nn.Parameter(gate_up.clone())
            experts.down_proj = nn.Parameter(down.clone())
            model.set_submodule(name, experts)
    model.config.extra.pop("quantization_config", None)
    return model
