"""Ternary training (`glm5 train --ternary`): the straight-through forward/backward, and a short run whose loss
falls and whose saved model is exactly ternary and loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, train_cli_setup
from torch import nn

from glm5.train.ternary import TernaryWeight, finish_ternary, make_ternary, ste_int8_per_token

ROOT = Path(__file__).resolve().parents[1]


def test_forward_sees_ternary_weights_and_gradients_reach_the_shadow():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(24, 8, bias=False))
    shadow = model.proj.weight.detach().clone()
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(model.proj, "weight", TernaryWeight())
    scale = shadow.abs().mean()
    view = model.proj.weight
    assert torch.equal(view, torch.clamp(torch.round(shadow / scale), -1, 1) * scale)
    x = torch.randn(5, 24, requires_grad=True)
    model.proj(x).pow(2).sum().backward()
    # straight-through: the shadow gets the gradient the ternary weight would get
    expected = (2 * (x.detach() @ view.detach().T)).T @ x.detach()
    assert torch.allclose(model.proj.parametrizations.weight.original.grad, expected, rtol=1e-5, atol=1e-6)
    y = torch.randn(3, 40) * 3
    q = ste_int8_per_token(y)
    step = y.abs().amax(-1, keepdim=True) / 127
    assert (q - y).abs().le(step / 2 + 1e-6).all() and torch.allclose(torch.round(q / step), q / step, atol=1e-4)


def test_finish_ternary_packs_the_forward_weights_exactly():
    from glm5 import GLM5ForCausalLM
    from glm5.quant.lowbit_model import QuantExperts

    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config()).eval()
    make_ternary(model, activations=False)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        trained = model(ids).logits
        packed = finish_ternary(model)(ids).logits
    assert any(isinstance(m, QuantExperts) for m in model.modules())
    assert torch.allclose(trained, packed, atol=1e-5), float((trained - packed).abs().max())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return train_cli_setup(tmp_path_factory.mktemp("ternary"))


def test_ternary_run_loss_falls_and_the_saved_model_is_exactly_ternary(setup, tmp_path):
    from glm5.engine import LLM, SamplingParams
    from glm5.quant.load import load_any_checkpoint
    from glm5.quant.lowbit_model import QuantExperts, QuantLinear, dequantize_model

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "glm5.cli", "train", "pretrain", "--data", str(setup / "data.jsonl"),
           "--config", str(setup / "cfg" / "config.json"), "--tokenizer", str(setup / "tok"), "--out", str(out),
           "--steps", "30", "--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--no-progress",
           "--threads", "1", "--ternary"]
    proc = subprocess.run(cmd, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    qcfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "glm5-ternary"
    model = load_any_checkpoint(str(out / "model"))
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            weights = [module.dequantized_weight(torch.float32)]
        elif isinstance(module, QuantExperts):
            gate_up, down = module.dequantized_stack(torch.float32)
            inter = module.intermediate_dim
            weights = [w for e in range(module.num_experts) for w in (gate_up[e, :inter], gate_up[e, inter:], down[e])]
        elif name.endswith("kv_b_proj"):  # kept dense for MLA's absorption, holding its ternary values
            weights = [module.weight.detach()]
        else:
            continue
        for w in weights:
            magnitudes = w.abs().unique()
            # {0, s} or {s}: one magnitude besides zero, so w / s is in {-1, 0, 1}
            assert len(magnitudes) == 1 or (len(magnitudes) == 2 and float(magnitudes[0]) == 0), (name, magnitudes)
            checked += 1
    assert checked > 20
    out_ids = LLM(model).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0].token_ids
    assert len(out_ids) == 4
    dense = dequantize_model(load_any_checkpoint(str(out / "model")))  # what RL or further training starts from
    assert all(p.requires_grad for p in dense.parameters())


def test_continuing_a_ternary_model_starts_from_its_saved_weights(setup, tmp_path):
    """`glm5 train --init TERNARY --ternary`: the shadows start at s · T / f (glm5.train.ternary.
    shadows_from_ternary), so a step that cannot move them (lr 1e-20) saves the init's trits and scales again;
    the dequantized weights as shadows would save every matrix at scale s · f."""
    from glm5 import GLM5ForCausalLM
    from glm5.config import GLM5Config
    from glm5.quant.load import load_any_checkpoint
    from glm5.quant.lowbit_model import quantize_model_lowbit, save_quantized
    from glm5.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_pretrained(setup / "cfg"))
    init = tmp_path / "tern"
    save_quantized(quantize_model_lowbit(model, "glm5-ternary"), str(init))
    Tokenizer.from_file(setup / "tok").save(init)
    out = tmp_path / "again"
    cmd = [sys.executable, "-m", "glm5.cli", "train", "pretrain", "--data", str(setup / "data.jsonl"),
           "--init", str(init), "--out", str(out), "--steps", "1", "--batch-size", "2", "--seq-len", "32",
           "--warmup", "0", "--lr", "1e-20", "--no-progress", "--threads", "1", "--ternary"]
    proc = subprocess.run(cmd, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = load_any_checkpoint(str(init)).state_dict(), load_any_checkpoint(str(out / "model")).state_dict()
    packed = [k for k in before if k.endswith("scales")]
    assert packed
    for key in packed:
        assert torch.allclose(after[key].float(), before[key].float(), rtol=1e-2, atol=0), key
    for key in (k for k in before if k.endswith("qweight")):
        assert torch.equal(after[key], before[key]), key
