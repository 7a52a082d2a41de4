"""Low-bit formats: packing, RTN bounds, GPTQ vs RTN, the q2 allocation, ternary, checkpoints, engine, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_, tiny_config

from glm5.quant.calibrate import allocate_bits, average_bits, collect_hessians, output_error
from glm5.quant.lowbit import (
    TERNARY,
    absmean_ternary,
    bits_per_weight,
    dequantize,
    pack_bits,
    pack_ternary,
    quantize_gptq,
    quantize_rtn,
    quantize_ternary,
    unpack_bits,
    unpack_ternary,
)
from glm5.quant.lowbit_model import (
    QuantExperts,
    QuantLinear,
    dequantize_model,
    load_quantized_model,
    quantize_model_lowbit,
    save_quantized,
    tensor_units,
)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_bits_is_exact(bits):
    codes = torch.randint(0, 2**bits, (3, 4, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 5 * bits  # ceil(37/8) words of `bits` bytes
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


def test_pack_unpack_ternary_is_exact_at_five_per_byte():
    trits = torch.randint(0, 3, (6, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_ternary(trits)
    assert packed.shape == (6, 5)
    assert torch.equal(unpack_ternary(packed, 23), trits)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_moves_each_weight_by_at_most_half_its_group_scale(bits, symmetric):
    w = torch.randn(32, 300, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.01, 3, 300)
    qw = quantize_rtn(w, bits, 128, symmetric)
    scale = qw.scales.float().repeat_interleave(128, dim=-1)[:, :300]
    err = (w - dequantize(qw)).abs()
    # q·s with q an integer < 256 and s an fp16 value is exact in fp32; only w/s rounds (|w|·2^-23)
    bound = scale / 2 + w.abs() * 2.0**-22
    assert (err <= bound).all(), f"max excess {float((err - bound).max())}"
    # and the bound is tight: a uniform spread of values uses it
    assert float((err / scale).max()) > 0.45
    if bits == 4:
        assert qw.qweight.shape == (32, 304 // 2)  # two codes per byte (300 padded to 304)


def test_gptq_output_error_on_calibration_data_is_below_rtn():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    x = torch.randn(1024, 256, generator=gen) @ (torch.randn(256, 256, generator=gen) * 0.2)  # correlated inputs
    h = x.T @ x
    for bits in (3, 4):
        rtn = ((x @ (w - dequantize(quantize_rtn(w, bits))).T) ** 2).sum()
        gptq = ((x @ (w - dequantize(quantize_gptq(w, h, bits))).T) ** 2).sum()
        assert gptq < 0.8 * rtn, f"{bits} bits: GPTQ {float(gptq):.4g} vs RTN {float(rtn):.4g}"


def test_ternary_is_absmean_scaled_trits():
    w = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(1))  # three matrices (fused experts)
    qw = quantize_ternary(w)
    dense = dequantize(qw)
    for e in range(3):
        scale = w[e].abs().mean()
        values = set((dense[e] / scale).round().unique().tolist())
        assert values <= {-1.0, 0.0, 1.0} and len(values) == 3
        assert torch.allclose(dense[e], torch.clamp(torch.round(w[e] / scale), -1, 1) * scale)
    trits, scale = absmean_ternary(w)
    assert torch.allclose(scale.flatten(), w.abs().mean(dim=(1, 2)))
    assert qw.qweight.shape == (3, 16, 8) and qw.bits == TERNARY


def test_q2_allocation_hits_the_budget_and_favours_sensitive_tensors():
    gen = torch.Generator().manual_seed(2)
    units = {f"u{i}": (torch.randn(64, 128, generator=gen),) for i in range(8)}
    hessians = {}
    for i, name in enumerate(units):
        x = torch.randn(256, 128, generator=gen)
        hessians[name] = (x.T @ x).double() * (10.0**i)  # u7's outputs are 10^7 times as sensitive as u0's
    for target in (2.4, 2.56, 3.5):  # 2.1875 stored bits at 2 bits; one 2 -> 3 upgrade adds 0.125
        bits = allocate_bits(units, hessians, target)
        achieved = average_bits(bits, units)
        # within one upgrade of one unit (all the same size here) below the budget, never above
        step = (bits_per_weight(8) - bits_per_weight(4)) / len(units)
        assert target - step <= achieved <= target + 1e-9, (target, achieved, bits)
        order = [bits[f"u{i}"] for i in range(8)]
        assert order == sorted(order), f"bits should not fall as sensitivity rises: {order}"
        assert order[-1] > order[0]
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_bits(units, hessians, 2.0)
    assert output_error(units["u0"], hessians["u0"], 8) < output_error(units["u0"], hessians["u0"], 2)


@pytest.fixture(scope="module")
def tiny():
    from glm5 import GLM5ForCausalLM

    torch.manual_seed(0)
    return randomize_(GLM5ForCausalLM(tiny_config(hidden_size=160)).eval(), std=0.08)


@pytest.fixture(scope="module")
def calib(tiny):
    rows = torch.randint(0, tiny.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    return rows, collect_hessians(tiny, rows)


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.slow
def test_gptq_model_is_closer_than_rtn_on_the_calibration_rows(tiny, calib):
    rows, hessians = calib
    with torch.no_grad():
        ref = tiny(rows).logits
        rtn = quantize_model_lowbit(_copy(tiny), "glm5-int4", method="rtn")(rows).logits
        gptq = quantize_model_lowbit(_copy(tiny), "glm5-int4", method="gptq", hessians=hessians)(rows).logits
    assert (gptq - ref).pow(2).mean() < (rtn - ref).pow(2).mean()


@pytest.mark.parametrize("fmt", ["glm5-int4", "glm5-q2mix", "glm5-ternary"])
def test_quantize_save_load_engine_greedy_equals_the_dequantized_model(tiny, calib, tmp_path, fmt):
    from glm5.engine import LLM, SamplingParams
    from glm5.quant.load import load_any_checkpoint

    rows, hessians = calib
    model = _copy(tiny)
    tensor_bits = allocate_bits(tensor_units(model), hessians, 2.56) if fmt == "glm5-q2mix" else None
    quantize_model_lowbit(model, fmt, method="rtn", tensor_bits=tensor_bits)
    assert any(isinstance(m, QuantExperts) for m in model.modules())
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    save_quantized(model, tmp_path / "q")
    qcfg = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qcfg["quant_method"] == fmt
    if fmt == "glm5-q2mix":
        assert abs(qcfg["avg_bits"] - 2.56) < 0.2 and len(set(qcfg["tensor_bits"].values())) > 1
    loaded = load_any_checkpoint(str(tmp_path / "q"))
    ids = rows[:1, :12]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)  # the same packed numbers, the same math
    dense = dequantize_model(load_quantized_model(str(tmp_path / "q")))
    assert not any(isinstance(m, QuantLinear | QuantExperts) for m in dense.modules())
    # greedy of the dequantized model, token by token with full forwards
    seq = ids[0].tolist()
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(dense(torch.tensor([seq])).logits[0, -1].argmax()))
    for graphs in (False, True):  # True on a CPU: the sync-free static forward (moe_static), uncaptured
        engine = LLM.from_pretrained(str(tmp_path / "q"), cuda_graphs=graphs)
        out = engine.generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=8))
        assert out[0].token_ids == seq[12:], f"cuda_graphs={graphs}"


def test_ternary_checkpoint_is_exactly_ternary_on_disk(tiny, tmp_path):
    from safetensors.torch import load_file

    save_quantized(quantize_model_lowbit(_copy(tiny), "glm5-ternary"), tmp_path / "t")
    tensors = load_file(str(tmp_path / "t" / "model.safetensors"))
    packed = [k for k in tensors if k.endswith(".qweight")]
    assert packed and all(tensors[k].dtype == torch.uint8 for k in packed)
    assert all(int(tensors[k].max()) < 243 for k in packed)  # five trits per byte: 3^5 codes
    assert "model.layers.1.mlp.experts.0.gate_proj.qweight" in tensors


def test_quantize_cli_errors_are_one_line(tiny, tmp_path, capsys):
    from glm5.cli import main

    src = tmp_path / "src"
    tiny.save_pretrained(src)
    assert main(["quantize", "int4", str(tmp_path / "nope"), str(tmp_path / "out")]) != 0
    assert main(["quantize", "q2", str(src), str(tmp_path / "out"), "--avg-bits", "1.0"]) != 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["quantize", "ternary", str(src), str(tmp_path / "full")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("Traceback" not in line for line in err), err
    assert "no config.json" in err[0] and "below the smallest" in err[1] and "not an empty directory" in err[2]
    assert (tmp_path / "full" / "x").read_text() == "keep" and not (tmp_path / "out").exists()
    assert main(["quantize", "ternary", str(src), str(tmp_path / "tern")]) == 0
    assert os.path.exists(tmp_path / "tern" / "model.safetensors")
    assert main(["quantize", "int4", str(tmp_path / "tern"), str(tmp_path / "again")]) != 0
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["glm5-int4", "glm5-ternary"])
def test_cuda_engine_greedy_on_low_bit_weights_equals_the_dequantized_model(tiny, tmp_path, fmt):
    from glm5.engine import LLM, SamplingParams

    save_quantized(quantize_model_lowbit(_copy(tiny), fmt), tmp_path / "q")
    loaded = load_quantized_model(str(tmp_path / "q"), device="cuda")
    dense = dequantize_model(load_quantized_model(str(tmp_path / "q"), device="cuda"))
    prompt = list(range(5, 17))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(dense(torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
    for graphs in (False, True):
        out = LLM(loaded, cuda_graphs=graphs).generate([prompt], SamplingParams(temperature=0, max_tokens=8))
        assert out[0].token_ids == seq[12:], f"cuda_graphs={graphs}"
