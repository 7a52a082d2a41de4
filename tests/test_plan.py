"""The deployment planner reproduces GLM-5's published figures.

    .venv/bin/python -m pytest -q tests/test_plan.py
"""

from __future__ import annotations

import argparse
import json

import pytest

from glm5.config import GLM5Config
from glm5.quant import plan as planner
from glm5.quant.plan import PlanRequest, kv_bytes_per_token, load_gpu_specs, plan

GB = 1e9


@pytest.fixture(scope="module")
def cfg():
    return GLM5Config.from_preset("glm5-744b")


def _close(value: float, target: float, rel: float, what: str) -> None:
    assert abs(value / target - 1) <= rel, f"{what}: {value / GB:,.1f} GB vs the published {target / GB:,.1f} GB ({value / target - 1:+.2%})"


def test_kv_cache_per_token_matches_the_reference_layouts(cfg):
    assert kv_bytes_per_token(cfg, "bf16") == 109_824
    assert kv_bytes_per_token(cfg, "fp8") == 61_464
    assert planner.kv_bytes_per_token_expanded(cfg) == 78 * 64 * (256 + 256) * 2  # 5.11 MB
    # IndexShare (GLM-5.2): only layers with their own indexer store an indexer key
    cfg52 = GLM5Config.from_preset("glm5.2-744b")
    indexed = sum(cfg52.has_indexer(i) for i in range(78))
    assert indexed < 78
    assert kv_bytes_per_token(cfg52, "bf16") == 78 * 1152 + indexed * 256


def test_bf16_weights_are_1490_gb_and_the_checkpoint_with_mtp_1508_gb(cfg):
    p = plan(cfg, PlanRequest(weights="bf16", gpu="h200"))
    _close(p.weights_bytes, 1_490 * GB, 0.005, "BF16 weights")
    _close(p.checkpoint_bytes, 1_508 * GB, 0.001, "BF16 checkpoint incl. MTP")
    assert abs(p.checkpoint_bytes / (1_650 * GB) - 1) > 0.08, "1.65 TB should NOT reproduce (see README)"
    assert p.params["total_params"] == pytest.approx(743.9e9, rel=1e-3)
    assert p.params["mtp_params"] == pytest.approx(9.95e9, rel=2e-3)
    assert p.gpus_needed == 16, "SGLang serves BF16 GLM-5 on H200 with tp 16"


def test_fp8_fits_8_h200_not_8_h100(cfg):
    h200 = plan(cfg, PlanRequest(weights="fp8", gpu="h200", gpus=8))
    h100 = plan(cfg, PlanRequest(weights="fp8", gpu="h100", gpus=8))
    _close(h200.checkpoint_bytes, 755 * GB, 0.003, "FP8 checkpoint (754-756 GB)")
    assert h200.fits and h200.gpus_needed == 8
    assert not h100.fits and h100.max_kv_tokens == 0, f"8×H100 leaves {h100.max_kv_tokens} KV tokens"
    assert h100.gpus_needed == 16
    assert h200.layout["tensor_parallel"] == 8 and h200.layout["routed_experts_per_gpu"] == 32
    # ≈3M FP8 KV tokens of room at 0.85 memory utilization (with the MTP layer loaded, as SGLang serves it)
    fp8_kv = plan(cfg, PlanRequest(weights="fp8", gpu="h200", gpus=8, kv_dtype="fp8", mtp=True))
    assert 2.9e6 < fp8_kv.max_kv_tokens < 3.5e6, f"{fp8_kv.max_kv_tokens:,} FP8 KV tokens"


def test_two_bit_mix_is_241_gb_and_avg_bits_is_settable(cfg):
    q2 = plan(cfg, PlanRequest(weights="q2", gpu="h200"))
    _close(q2.checkpoint_bytes, 241 * GB, 0.005, "UD-IQ2_XXS at 2.56 bits/param")
    q2_k_xl = plan(cfg, PlanRequest(weights="q2", gpu="h200", avg_bits=2.98))
    _close(q2_k_xl.checkpoint_bytes, 281 * GB, 0.01, "UD-Q2_K_XL (281 GB) at 2.98 bits/param")
    with pytest.raises(ValueError, match="--avg-bits applies to --weights q2"):
        plan(cfg, PlanRequest(weights="fp8", avg_bits=3.0))


def test_more_concurrency_needs_more_gpus_and_tp_attention_replicates_the_latent(cfg):
    small = plan(cfg, PlanRequest(weights="fp8", gpu="h200", context=200_000, concurrency=1))
    big = plan(cfg, PlanRequest(weights="fp8", gpu="h200", context=200_000, concurrency=64))
    assert big.kv_bytes_total == 64 * small.kv_bytes_total
    assert big.gpus_needed > small.gpus_needed, f"{big.gpus_needed} vs {small.gpus_needed}"
    dp = plan(cfg, PlanRequest(weights="fp8", gpu="h200", gpus=8, attention="dp"))
    tp = plan(cfg, PlanRequest(weights="fp8", gpu="h200", gpus=8, attention="tp"))
    assert tp.max_kv_tokens == pytest.approx(dp.max_kv_tokens / 8, abs=1)


def test_expert_offload_moves_routed_experts_to_cpu_ram(cfg):
    full = plan(cfg, PlanRequest(weights="int4", gpu="h100", gpus=1))
    offload = plan(cfg, PlanRequest(weights="int4", gpu="h100", gpus=1, gpu_experts=16, context=8192))
    assert not full.fits and offload.fits
    assert offload.weights_bytes + offload.cpu_offload_bytes == full.weights_bytes
    assert offload.cpu_offload_bytes > 300 * GB
    assert offload.decode["cpu_bytes_per_step"] > 0
    on_gpu = plan(cfg, PlanRequest(weights="int4", gpu="h100", gpus=8, context=8192))
    assert offload.decode["tokens_per_s_upper_bound"] < on_gpu.decode["tokens_per_s_upper_bound"]


def test_decode_bound_follows_bandwidth_and_active_parameters(cfg):
    h100 = plan(cfg, PlanRequest(weights="fp8", gpu="h100", gpus=16, context=4096))
    h200 = plan(cfg, PlanRequest(weights="fp8", gpu="h200", gpus=16, context=4096))
    d100, d200 = h100.decode, h200.decode
    assert d100["bound_by"] == "memory bandwidth"
    assert d200["tokens_per_s_upper_bound"] / d100["tokens_per_s_upper_bound"] == pytest.approx(4800 / 3350, rel=1e-6)
    assert d100["active_params_per_token"] == pytest.approx(40.8e9, rel=0.005), "active excluding embeddings"
    batch = plan(cfg, PlanRequest(weights="fp8", gpu="h200", gpus=16, context=4096, concurrency=256))
    speedup = batch.decode["tokens_per_s_upper_bound"] / h200.decode["tokens_per_s_upper_bound"]
    assert 10 < speedup < 256, f"batch 256 decodes {speedup:.1f}× the tokens/s of batch 1"
    assert 200 < batch.decode["experts_touched_per_layer"] <= 256


def test_planner_agrees_with_glm5_params(cfg):
    params = pytest.importorskip("glm5.params")
    counts = params.count_parameters(cfg)
    p = plan(cfg, PlanRequest(weights="bf16"))
    # one count (glm5.params.checkpoint_tensors): router-bias buffers included on both sides
    assert p.params["total_params"] == counts["total_params"]
    assert p.params["mtp_params"] == counts["mtp_params"]
    assert p.params["routed_expert_params"] == counts["routed_expert_params"]
    active = p.decode["active_params_per_token"]
    assert active == pytest.approx(counts["active_params_excluding_embeddings"], abs=1)


def test_gpu_specs_name_their_source():
    specs = load_gpu_specs()
    assert {"h100", "h200", "b200", "a100", "mi300x", "cpu"} <= set(specs)
    for name, spec in specs.items():
        for key in ("memory_gb", "bandwidth_gb_s", "bf16_tflops", "fp8_tflops", "source"):
            assert key in spec, f"{name} lacks {key}"
        assert len(spec["source"]) > 20, f"{name}: source too thin"
    assert specs["h200"]["memory_gb"] * 8 == 1128


def _cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="glm5")
    sub = parser.add_subparsers(dest="command")
    planner.register(sub)
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_json_has_the_promised_keys(capsys):
    out = json.loads(_cli(["plan", "--preset", "glm5-744b", "--weights", "fp8", "--gpu", "h100", "--json"], capsys))
    for key in ("weights_bytes", "kv_bytes_per_token", "kv_bytes_total", "gpus_needed", "fits", "max_kv_tokens",
                "layout", "decode"):
        assert key in out, f"--json lacks {key}"
    assert out["gpus_needed"] == 16 and out["layout"]["tensor_parallel"] == 16
    assert out["decode"]["tokens_per_s_upper_bound"] > 0


def test_cli_table_and_config_file(tmp_path, capsys):
    GLM5Config.from_preset("nano").save_pretrained(str(tmp_path))
    table = _cli(["plan", "--config", str(tmp_path), "--weights", "bf16", "--gpu", "cpu"], capsys)
    assert "fits" in table and "KV cache per token" in table and "decode upper bound" in table


def test_bad_input_is_a_value_error(cfg):
    with pytest.raises(ValueError, match="--gpu 'tpu'"):
        plan(cfg, PlanRequest(gpu="tpu"))
    with pytest.raises(ValueError, match="--gpu-experts 300"):
        plan(cfg, PlanRequest(gpu="h100", gpu_experts=300))
    with pytest.raises(ValueError, match="--concurrency 0"):
        plan(cfg, PlanRequest(concurrency=0))
