"""Calibration for the low-bit formats: input statistics per weight (GPTQ) and the q2 mix's bit allocation.

    from glm5.quant.calibrate import calibration_rows, collect_hessians, allocate_bits
    rows = calibration_rows(tokenizer, rows=16, seq_len=256)        # token ids [16, 256] from the demo corpus
    hessians = collect_hessians(model, rows)                        # unit -> H = Σ x xᵀ over its inputs
    tensor_bits = allocate_bits(tensor_units(model), hessians, avg_bits=2.56)

Calibration text is glm5's own demo corpus (Python's docs and sources + synthetic tool-use chats, training
split; no network). Hessians are taken from the unquantized model in one pass (not layer by layer on the
already-quantized prefix as the GPTQ paper does: one forward instead of one per layer, at some loss of
compensation for the error of earlier layers). Routed experts get one Hessian per expert from the tokens
routed to it (gate_up: the layer input; down: silu(gate)·up of those tokens); an expert no calibration token
chose has H = 0 (GPTQ falls back to round-to-nearest for it). The MTP layer is run too (return_mtp).

The q2 mix: for each unit (a linear, or a layer's routed gate_up / down) and each width b in {2, 3, 4, 8}, the
output error on the calibration inputs, Σ tr(ΔW_b H ΔW_bᵀ) = Σ‖X ΔW_bᵀ‖², with ΔW_b the RTN error at b bits.
Every unit starts at 2 bits; the upgrade that removes the most output error per stored bit it adds (error ×
size is in both terms) is taken while the average stays within the budget, until none fits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5.quant.lowbit import DEFAULT_GROUP_SIZE, bits_per_weight, dequantize, quantize_rtn

Q2_CHOICES = (2, 3, 4, 8)
DEFAULT_AVG_BITS = 2.56  # glm5 plan --avg-bits's default (the published UD-IQ2_XXS build of GLM-5)


def calibration_rows(tokenizer, rows: int = 16, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Token ids [rows, seq_len] from the demo corpus's training split (documents packed end to end): the
    corpus `glm5 demo` builds with its defaults, so nothing the demo holds out is calibrated on."""
    from glm5.train.corpus import build_demo_corpus

    if rows < 1 or seq_len < 2:
        raise ValueError(f"calibration needs rows >= 1 and seq_len >= 2, got {rows} x {seq_len}")
    corpus = build_demo_corpus(stdlib_bytes=2_500_000, conversations=2000, sft_conversations=0, tasks=0, seed=seed)
    ids: list[int] = []
    for text in corpus.train_texts:
        ids.extend(tokenizer.encode(text, allow_special=True))  # rendered chats carry their special tokens
        if len(ids) >= rows * seq_len:
            break
    if len(ids) < rows * seq_len:
        raise ValueError(f"the calibration corpus holds {len(ids)} tokens, fewer than {rows} x {seq_len}")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


@torch.no_grad()
def collect_hessians(model: nn.Module, rows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """unit -> H [in, in] (fp64) for every quantizable linear; "<experts>.gate_up" / ".down" -> [E, in, in]."""
    from glm5.quant.lowbit_model import quant_targets

    hessians: dict[str, torch.Tensor] = {}
    handles = []

    def add(key: str, x: torch.Tensor, expert: int | None = None, experts: int = 0) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        h = x.T @ x
        if expert is None:
            hessians[key] = hessians.get(key, 0) + h
        else:
            if key not in hessians:
                hessians[key] = torch.zeros(experts, *h.shape, dtype=torch.float64, device=h.device)
            hessians[key][expert] += h

    for name, module in quant_targets(model):
        if type(module) is nn.Linear:
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: add(name, args[0])))
        else:
            def experts_hook(m, args, name=name):
                hidden, index = args[0], args[1]
                inter = m.gate_up_proj.shape[1] // 2
                for e in range(m.gate_up_proj.shape[0]):
                    tokens = (index == e).any(-1)
                    x = hidden[tokens]
                    add(f"{name}.gate_up", x, e, m.gate_up_proj.shape[0])
                    gate, up = F.linear(x, m.gate_up_proj[e]).split(inter, dim=-1)
                    add(f"{name}.down", F.silu(gate) * up, e, m.gate_up_proj.shape[0])
            handles.append(module.register_forward_pre_hook(experts_hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, rows.shape[0], batch_size):
            model(rows[start : start + batch_size].to(next(model.parameters()).device), return_mtp=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return hessians


def output_error(weights: tuple[torch.Tensor, ...], hessian: torch.Tensor | None, bits: int,
                 group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False) -> float:
    """Σ over the unit's matrices of ‖X ΔWᵀ‖² = tr(ΔW H ΔWᵀ) at `bits` (RTN); no hessian: ‖ΔW‖² (H = I)."""
    total = 0.0
    for i, w in enumerate(weights):
        delta = (w.float() - dequantize(quantize_rtn(w.float(), bits, group_size, symmetric))).double()
        if hessian is None:
            total += float((delta * delta).sum())
            continue
        h = hessian[i] if hessian.ndim == 3 else hessian
        if h.shape[0] != delta.shape[1]:
            raise ValueError(f"hessian {tuple(h.shape)} does not match a weight of {delta.shape[1]} inputs")
        total += float(torch.einsum("oi,ij,oj->", delta, h.to(delta.device), delta))
    return total


def allocate_bits(units: dict[str, tuple[torch.Tensor, ...]], hessians: dict[str, torch.Tensor], avg_bits: float,
                  choices: tuple[int, ...] = Q2_CHOICES, group_size: int = DEFAULT_GROUP_SIZE,
                  symmetric: bool = False) -> dict[str, int]:
    """unit -> bits with Σ bits_per_weight · size <= avg_bits · Σ size, greedily by output error removed per bit."""
    choices = tuple(sorted(choices))
    lowest, highest = bits_per_weight(choices[0], group_size, symmetric), bits_per_weight(choices[-1], group_size, symmetric)
    if not lowest <= avg_bits:
        raise ValueError(f"--avg-bits {avg_bits}: below the smallest width's {lowest:.4f} stored bits per weight "
                         f"({choices[0]} bits + scales)")
    sizes = {u: sum(w.numel() for w in ws) for u, ws in units.items()}
    total = sum(sizes.values())
    if avg_bits >= highest:
        return {u: choices[-1] for u in units}
    errors = {u: {b: output_error(ws, hessians.get(u), b, group_size, symmetric) for b in choices}
              for u, ws in units.items()}
    bits = {u: choices[0] for u in units}
    spent = lowest * total
    budget = avg_bits * total
    while True:
        best, best_gain = None, -1.0
        for u in units:
            i = choices.index(bits[u])
            if i + 1 == len(choices):
                continue
            nxt = choices[i + 1]
            cost = (bits_per_weight(nxt, group_size, symmetric) - bits_per_weight(bits[u], group_size, symmetric)) * sizes[u]
            if spent + cost > budget + 1e-9:
                continue
            gain = (errors[u][bits[u]] - errors[u][nxt]) / cost
            if gain > best_gain:
                best, best_gain = u, gain
        if best is None:
            return bits
        nxt = choices[choices.index(bits[best]) + 1]
        spent += (bits_per_weight(nxt, group_size, symmetric) - bits_per_weight(bits[best], group_size, symmetric)) * sizes[best]
        bits[best] = nxt


def average_bits(tensor_bits: dict[str, int], units: dict[str, tuple[torch.Tensor, ...]],
                 group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False) -> float:
    """Stored bits per weight of an allocation, scales and zero points included."""
    sizes = {u: sum(w.numel() for w in ws) for u, ws in units.items()}
    return sum(bits_per_weight(tensor_bits[u], group_size, symmetric) * n for u, n in sizes.items()) / sum(sizes.values())
