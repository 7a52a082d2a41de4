"""GGUF export: llama.cpp's block formats, the glm-dsa layout, and the CLI's refusals (no llama.cpp needed).

The comparisons with llama.cpp itself are in tests/test_gguf_llamacpp.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from glm5 import GLM5Config, GLM5ForCausalLM  # noqa: E402
from glm5.checkpoint import iter_checkpoint_tensors  # noqa: E402
from glm5.quant.gguf import GGUFExportError, check_exportable, export_gguf, read_gguf_state_dict  # noqa: E402
from glm5.quant.kquants import quantize_q2_k, quantize_q4_k  # noqa: E402
from glm5.tokenizer import default_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType


def _exact_k_quant_weights(rng, blocks: int, sub: int, n: int, levels: int, scale_bits: int) -> np.ndarray:
    """Weights a K-quant represents exactly: d * sc * q - dmin * m with every sub-block using q = 0 and q = levels
    (so its min and max fix its scale) and the largest sc and m at the format's top (so they fix d and dmin)."""
    top = (1 << scale_bits) - 1
    d = rng.uniform(0.01, 0.05, blocks).astype(np.float16).astype(np.float32)
    dmin = rng.uniform(0.01, 0.05, blocks).astype(np.float16).astype(np.float32)
    sc = rng.integers(1, top + 1, (blocks, sub))
    m = rng.integers(1, top + 1, (blocks, sub))
    sc[:, 0], m[:, 1] = top, top
    q = rng.integers(0, levels + 1, (blocks, sub, n))
    q[:, :, 0], q[:, :, 1] = 0, levels
    x = (d[:, None] * sc).astype(np.float32)[..., None] * q - (dmin[:, None] * m).astype(np.float32)[..., None]
    return x.astype(np.float32).reshape(blocks, sub * n)


@pytest.mark.parametrize("fmt", ["q4_k", "q2_k"])
def test_k_quants_are_llama_cpp_blocks(fmt):
    """Our Q4_K / Q2_K bytes dequantize (by gguf-py, llama.cpp's layout) to exactly the weights they can represent,
    and to Gaussian weights within the format's resolution."""
    rng = np.random.default_rng(0)
    quantize, qtype, sub, n, levels, bits, bound = {
        "q4_k": (quantize_q4_k, Q.Q4_K, 8, 32, 15, 6, 0.10),
        "q2_k": (quantize_q2_k, Q.Q2_K, 16, 16, 3, 4, 0.40),
    }[fmt]
    exact = _exact_k_quant_weights(rng, 6, sub, n, levels, bits)
    back = gguf.quants.dequantize(quantize(exact), qtype)
    np.testing.assert_allclose(back, exact, rtol=1e-5, atol=1e-6, err_msg=f"{fmt}: representable weights moved")
    # Gaussian rows: relative RMS error of a uniform grid of levels+1 points over each sub-block's range
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    back = gguf.quants.dequantize(quantize(x), qtype)
    rel = float(np.sqrt(((back - x) ** 2).mean() / (x**2).mean()))
    assert rel < bound, f"{fmt}: relative RMS error {rel:.3f} >= {bound}"
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 100), np.float32))


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = default_tokenizer()
    cfg = GLM5Config.from_preset("nano", vocab_size=tok.vocab_size)
    model = GLM5ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("nano")
    model.save_pretrained(out)
    tok.save(out)
    return out


def test_f32_export_reads_back_to_the_same_checkpoint(nano_dir, tmp_path):
    path = export_gguf(nano_dir, tmp_path / "m.gguf")
    state, meta = read_gguf_state_dict(path)
    original = dict(iter_checkpoint_tensors(nano_dir))
    assert set(state) == set(original), set(state) ^ set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor.float()), key
    cfg = GLM5Config.from_pretrained(nano_dir)
    assert meta["general.architecture"] == "glm-dsa"
    assert meta["glm-dsa.block_count"] == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert meta["glm-dsa.nextn_predict_layers"] == 1  # the MTP layer travels
    assert meta["glm-dsa.attention.indexer.top_k"] == cfg.index_topk
    assert meta["glm-dsa.attention.indexer.types"] == [True] * cfg.num_hidden_layers
    assert meta["glm-dsa.leading_dense_block_count"] == cfg.first_k_dense_replace
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    for name in ("blk.1.ffn_gate_exps.weight", "blk.0.attn_k_b.weight", "blk.0.indexer.attn_q_b.weight",
                 "blk.4.nextn.eh_proj.weight", "blk.1.exp_probs_b.bias", "output.weight"):
        assert name in names, name
    assert not (tmp_path / "m.gguf.tmp").exists() and len(list(tmp_path.iterdir())) == 1  # no temporary left


@pytest.mark.parametrize("out_type, rel_bound", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 8e-3), ("q4_k", 0.1),
                                                  ("q2_k", 0.45)])
def test_quantized_exports_stay_near_the_weights(nano_dir, tmp_path, out_type, rel_bound):
    """Each matrix comes back within its format's resolution; 1-D tensors and the router stay exact (f32)."""
    state, _ = read_gguf_state_dict(export_gguf(nano_dir, tmp_path / "m.gguf", out_type=out_type))
    for key, tensor in iter_checkpoint_tensors(nano_dir):
        tensor = tensor.float()
        if tensor.dim() == 1 or key.endswith(("mlp.gate.weight", "weights_proj.weight", "indexer.wk.weight")):
            assert torch.equal(state[key], tensor), f"{key} should stay f32"
            continue
        rel = ((state[key] - tensor).norm() / tensor.norm()).item()
        assert rel < rel_bound, f"{out_type} {key}: relative error {rel:.4f} >= {rel_bound}"


def test_configs_llama_cpp_cannot_run_are_refused_by_field():
    base = GLM5Config.from_preset("nano")
    check_exportable(base)
    for overrides, field in [(dict(n_group=4, topk_group=2), "n_group"),
                             (dict(mlp_layer_types=["dense", "sparse", "dense", "sparse"]), "mlp_layer_types"),
                             (dict(index_head_dim=48), "index_head_dim"),
                             (dict(index_head_dim=32), "index_head_dim")]:
        with pytest.raises(GGUFExportError, match=rf"config\.{field}"):
            check_exportable(base.replace(**overrides))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glm5.cli", "export", "gguf", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_and_refuses_with_one_line_errors(nano_dir, tmp_path):
    out = tmp_path / "m.gguf"
    done = _cli(nano_dir, out, "--type", "q8_0")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "q8_0" in done.stdout
    again = _cli(nano_dir, out)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    # no tokenizer to embed
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in nano_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).write_bytes(f.read_bytes())
    done = _cli(bare, tmp_path / "b.gguf")
    assert done.returncode == 2 and "tokenizer.json" in done.stderr and "Traceback" not in done.stderr
    # a truncated safetensors file
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in nano_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    done = _cli(broken, tmp_path / "c.gguf")
    assert done.returncode == 2 and "corrupt" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "c.gguf").exists()
    # a config.json that is not JSON
    (broken / "config.json").write_text("{not json")
    done = _cli(broken, tmp_path / "d.gguf")
    assert done.returncode == 2 and "config.json" in done.stderr and "Traceback" not in done.stderr
    json.loads((nano_dir / "config.json").read_text())  # the original is untouched
