"""Ternary (1.58-bit) training: BitNet b1.58's straight-through estimator over full-precision shadow weights.

    glm5 train pretrain --data corpus.txt --preset nano --out runs/tern --steps 200 --ternary
    from glm5.train.ternary import make_ternary, finish_ternary
    make_ternary(model)            # every quantizable matrix: forward sees absmean-ternary weights
    finish_ternary(model)          # drop the parametrizations, pack: the model is now glm5-ternary (save_quantized)

Forward (Ma et al., "The Era of 1-bit LLMs", arXiv:2402.17764): each quantizable weight W (the low-bit formats'
set: attention projections, indexer wq_b / wk, dense and shared MLPs, routed experts — not embeddings, heads,
router, indexer weights_proj, MTP eh_proj) is replaced in the forward by scale · clip(round(W / scale), -1, 1),
scale = mean|W| per matrix (gate and up of an expert are two matrices, as on disk); the backward passes the
gradient to W unchanged (straight-through: W + (Q(W) - W).detach()). The optimizer updates W, the shadow.
Activations entering those linears (and the routed experts' input) are fake-quantized to 8 bits per token,
absmax (x · 127 / max|x| rounded), also straight-through, as BitNet b1.58 does. Not the routed experts' down
input: it never leaves the fused expert kernel (glm5.model.moe). Inference in glm5 runs activations in full
precision (the engine's fused paths have no 8-bit activation step), which differs from the trained forward by
at most max|x| / 254 per element; the weights are exactly the trained ternary ones.
Built on torch.nn.utils.parametrize, so the model's code is untouched and `model.weight` reads the ternary view.

Continuing from a ternary model (`glm5 rl --init` a glm5-ternary directory): its weights are s · T, and the
absmean of s · T is s · f (f = the share of nonzero trits), not s, so using them as shadows would shrink every
matrix by f in the first forward. `shadows_from_ternary(model)` sets each shadow to s · T / f instead, whose
absmean-ternary view is s · T exactly: training starts from the model as it was saved.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from glm5.quant.lowbit import absmean_ternary


def ste_ternary(weight: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """weight [..., out, in] -> its absmean-ternary value with an identity gradient. halves: [E, 2I, H] fused
    gate_up, whose gate and up halves are separate matrices with separate scales."""
    w = weight.unflatten(-2, (2, weight.shape[-2] // 2)) if halves else weight
    trits, scale = absmean_ternary(w.detach())
    q = (trits * scale).reshape(weight.shape)
    return weight + (q - weight).detach()


def ste_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """8-bit absmax fake quantization per token (last dimension), identity gradient."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    return x + (torch.round(x.detach() / scale).clamp(-128, 127) * scale - x).detach()


class TernaryWeight(nn.Module):
    """A parametrization: the stored tensor is the shadow weight, the module reads its ternary view."""

    def __init__(self, halves: bool = False):
        super().__init__()
        self.halves = halves

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ste_ternary(weight, self.halves)


def _quantize_input(module, args):
    return (ste_int8_per_token(args[0]), *args[1:])


def make_ternary(model: nn.Module, activations: bool = True) -> int:
    """Put the ternary view on every quantizable weight of `model` (in place); returns how many tensors."""
    matrices = list(_ternary_matrices(model))  # listed first: a parametrized module's type changes
    for module, attr, halves in matrices:
        parametrize.register_parametrization(module, attr, TernaryWeight(halves))
        if activations and not hasattr(module, "_ternary_act_hook"):  # one per module (experts have two matrices)
            module._ternary_act_hook = module.register_forward_pre_hook(_quantize_input)
    return len(matrices)


def is_ternary(model: nn.Module) -> bool:
    return any(isinstance(m, TernaryWeight) for m in model.modules())


def finish_ternary(model: nn.Module) -> nn.Module:
    """Remove the views (keeping the shadow weights) and pack them: the ternary values and scales are the
    trained forward's exactly (the same absmean of the same shadow). Returns the glm5-ternary model."""
    from glm5.quant.lowbit_model import quantize_model_lowbit

    return quantize_model_lowbit(remove_ternary(model), "glm5-ternary")


def remove_ternary(model: nn.Module) -> nn.Module:
    """Undo make_ternary in place: views and activation hooks removed, each weight its shadow again."""
    for module in list(model.modules()):
        hook = getattr(module, "_ternary_act_hook", None)
        if hook is not None:
            hook.remove()
            del module._ternary_act_hook
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    return model


def _ternary_matrices(model: nn.Module):
    """(module, attribute, halves) of every weight make_ternary puts a view on."""
    from glm5.quant.lowbit_model import quant_targets

    for _, module in quant_targets(model):
        if type(module) is nn.Linear:
            yield module, "weight", False
        else:
            yield module, "gate_up_proj", True
            yield module, "down_proj", False


@torch.no_grad()
def shadows_from_ternary(model: nn.Module) -> int:
    """In place, before make_ternary: every quantizable weight of a model loaded from a ternary checkpoint (each
    matrix one magnitude s besides zero) becomes the shadow s · T / f, f = mean|T|, whose absmean-ternary view
    is s · T again. Raises if a matrix is not ternary-valued. -> how many tensors."""
    count = 0
    for module, attr, halves in _ternary_matrices(model):
        weight = getattr(module, attr)
        w = weight.unflatten(-2, (2, weight.shape[-2] // 2)) if halves else weight
        magnitude = w.abs().amax(dim=(-2, -1), keepdim=True)
        trits = torch.where(magnitude > 0, w / magnitude.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))
        if not torch.equal(trits, trits.round()):
            raise ValueError(f"{type(module).__name__}.{attr}: not ternary-valued (more than one magnitude besides "
                             "zero in a matrix); is this a glm5-ternary checkpoint?")
        share = trits.abs().mean(dim=(-2, -1), keepdim=True).clamp(min=1e-8)
        weight.copy_((w / share).reshape(weight.shape))
        count += 1
    return count


def _plain_name(key: str) -> tuple[str, str, str] | None:
    """'a.b.parametrizations.weight.original' -> ('a.b', 'weight', 'a.b.weight'); None for other keys."""
    if ".parametrizations." not in key or not key.endswith(".original"):
        return None
    module, _, rest = key.partition(".parametrizations.")
    attr = rest[: -len(".original")]
    return module, attr, f"{module}.{attr}"


def plain_state_dict(model: nn.Module, view: bool) -> dict[str, torch.Tensor]:
    """A make_ternary model's state under the plain model's names: `view` the ternary weights (what an engine
    runs), else the shadows (what training resumes from). Detached, not copied."""
    out = {}
    for key, value in model.state_dict().items():
        plain = _plain_name(key)
        if plain is None:
            out[key] = value.detach()
        else:
            module, attr, name = plain
            out[name] = getattr(model.get_submodule(module), attr).detach() if view else value.detach()
    return out


def parametrized_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """plain_state_dict(model, view=False)'s layout back to the make_ternary model's own keys (load_state_dict)."""
    out = {}
    for key in model.state_dict():
        plain = _plain_name(key)
        name = key if plain is None else plain[2]
        if name not in state:
            raise KeyError(f"the state has no {name!r}")
        out[key] = state[name]
    return out
