"""RL on a ternary model (glm5 rl --init a glm5-ternary directory, or --ternary): the trainer's forward is the
saved ternary model's, the workers generate with ternary weights, the result is glm5-ternary again, and a
resumed run continues from the shadows (glm5/train/ternary.py, glm5/rl/trainer.py, glm5/rl/run.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from glm5.cli import main
from glm5.quant.load import load_any_checkpoint
from glm5.quant.lowbit_model import QuantExperts, QuantLinear, quantize_model_lowbit, save_quantized
from glm5.rl.run import RLConfig, load_policy, run_rl
from glm5.train.ternary import make_ternary, parametrized_state, plain_state_dict, shadows_from_ternary

ARGS = ["--env", "countdown", "--algo", "grpo", "--mode", "sync", "--rollout-batch", "2", "--group-size", "2",
        "--max-new-tokens", "6", "--rollout-workers", "0", "--no-progress", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def ternary_dir(tmp_path_factory):
    """The nano preset's random weights, quantized to glm5-ternary, with the default tokenizer."""
    model, tokenizer = load_policy(RLConfig(preset="nano", seed=3))
    directory = tmp_path_factory.mktemp("tern") / "model"
    save_quantized(quantize_model_lowbit(model, "glm5-ternary"), str(directory))
    tokenizer.save(directory)
    return directory


def _ternary_matrices(model):
    """Every packed matrix of a loaded glm5-ternary model (and kv_b_proj, kept dense holding ternary values)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module.dequantized_weight(torch.float32)
        elif isinstance(module, QuantExperts):
            gate_up, down = module.dequantized_stack(torch.float32)
            inter = module.intermediate_dim
            for e in range(module.num_experts):
                yield f"{name}.{e}.gate", gate_up[e, :inter]
                yield f"{name}.{e}.up", gate_up[e, inter:]
                yield f"{name}.{e}.down", down[e]
        elif name.endswith("kv_b_proj"):
            yield name, module.weight.detach().float()


def test_shadows_start_rl_from_the_saved_ternary_model(ternary_dir):
    """load_policy on a glm5-ternary directory: the trainer's ternary views are the saved weights and give the
    saved model's logits; the dequantized weights themselves as shadows would not (their absmean is s · f,
    not s). The plain-name state round-trips."""
    from glm5.quant.lowbit_model import dequantize_model

    torch.manual_seed(0)
    config = RLConfig(init=str(ternary_dir))
    model, _ = load_policy(config)
    assert config.ternary
    saved = load_any_checkpoint(str(ternary_dir)).float()
    dense = dequantize_model(load_any_checkpoint(str(ternary_dir))).float()
    view_model = copy.deepcopy(model)
    make_ternary(view_model, activations=False)
    naive = copy.deepcopy(dense)
    make_ternary(naive, activations=False)
    ids = torch.randint(0, 4000, (1, 24))
    with torch.no_grad():
        want, got, shrunk = saved(ids).logits, view_model(ids).logits, naive(ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale, float((got - want).abs().max())
    assert float((shrunk - want).abs().max()) > 1e-2 * scale, "the test needs the naive shadows to differ"
    views = plain_state_dict(view_model, view=True)
    assert set(views) == set(dense.state_dict())
    for name, w in dense.state_dict().items():
        assert torch.allclose(views[name], w, rtol=1e-6, atol=0), name
    shadows = plain_state_dict(view_model, view=False)
    assert any(not torch.equal(shadows[n], views[n]) for n in views), "shadows are rescaled, not the views"
    twin = copy.deepcopy(dense)
    make_ternary(twin, activations=False)
    twin.load_state_dict(parametrized_state(twin, shadows))
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), view_model.state_dict().values()))
    with pytest.raises(ValueError, match="not ternary-valued"):
        shadows_from_ternary(load_policy(RLConfig(preset="nano"))[0])


def test_rl_on_a_ternary_init_stays_ternary_and_resumes(ternary_dir, tmp_path, capsys):
    """`glm5 rl --init TERNARY`: step 1's engine and trainer log-probs agree (both run the saved ternary
    weights), the weights move, OUT/model is glm5-ternary with one magnitude per matrix; 2 steps + --resume of
    a third equal 3 steps in one go."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["rl", "--init", str(ternary_dir), "--out", str(whole), "--steps", "3", "--kl-coef", "0.1", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "model:" in printed
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    # sync: step 1's tokens were sampled by the weights the trainer starts from; any scale error shows here
    assert records[0]["mismatch_kl"] < 1e-6, records[0]["mismatch_kl"]
    config = json.loads((whole / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "glm5-ternary"
    trained, start = load_any_checkpoint(str(whole / "model")), load_any_checkpoint(str(ternary_dir))
    checked = moved = 0
    start_mats = dict(_ternary_matrices(start))
    for name, w in _ternary_matrices(trained):
        magnitudes = w.abs().unique()
        assert len(magnitudes) == 1 or (len(magnitudes) == 2 and float(magnitudes[0]) == 0), (name, magnitudes)
        moved += not torch.equal(w, start_mats[name])
        checked += 1
    assert checked > 20 and moved > 0, (checked, moved)
    from glm5.model.transformer import GLM5ForCausalLM

    again = GLM5ForCausalLM.from_pretrained(whole / "model")  # the contract for OUT/model
    ids = torch.randint(0, 4000, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained(ids).logits)

    assert main(["rl", "--init", str(ternary_dir), "--out", str(cut), "--steps", "2", "--kl-coef", "0.1", *ARGS]) == 0
    assert main(["rl", "--init", str(ternary_dir), "--out", str(cut), "--steps", "3", "--kl-coef", "0.1", "--resume",
                 *ARGS]) == 0
    capsys.readouterr()
    resumed = dict(_ternary_matrices(load_any_checkpoint(str(cut / "model"))))
    for name, w in _ternary_matrices(trained):
        assert torch.allclose(w, resumed[name], rtol=1e-5, atol=1e-7), name


def test_ternary_flag_on_a_full_precision_model(tmp_path):
    """--ternary from random full-precision weights: they are the shadows, the result is glm5-ternary."""
    out = tmp_path / "fp"
    run_rl(RLConfig(out=str(out), preset="nano", env="countdown", mode="sync", steps=1, rollout_batch=2,
                    group_size=2, max_new_tokens=4, ternary=True, progress=False))
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == "glm5-ternary"
    assert any(isinstance(m, QuantLinear) for m in load_any_checkpoint(str(out / "model")).modules())


@pytest.mark.slow
def test_a_ternary_model_learns_with_rl(tmp_path, monkeypatch):
    """1.58-bit RL on a CPU: from the nano preset's random weights under --ternary, bench/rl.py's task (reward:
    the share of digits in the answer) rises from ~0.01 to most of the answer within 60 sync steps, with the
    engine and the trainer computing the same log-probs throughout (both run the ternary weights)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("GLM5_BENCH_RL_LONGEST", "24")  # bench/rl.py's long tail, short (as tests/test_rl_run.py)
    torch.set_num_threads(1)
    out = tmp_path / "learn"
    run_rl(RLConfig(out=str(out), preset="nano", env="bench.rl:LongTailEnv", mode="sync", steps=60, rollout_batch=4,
                    group_size=4, max_new_tokens=24, lr=1e-3, ternary=True, save_every=0, progress=False),
           save_model=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (records[:10], records[-10:]))
    assert first < 0.1 and last > 0.5, (first, last, os.environ["GLM5_BENCH_RL_LONGEST"])
    assert max(r["mismatch_kl"] for r in records) < 1e-6
