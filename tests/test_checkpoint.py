"""Hugging Face checkpoints: both directions with transformers, both expert layouts, and every documented error."""

import json
import os

import pytest
import torch
from conftest import randomize_, tiny_config

from glm5 import GLM5ForCausalLM
from glm5.checkpoint import CheckpointError, to_transformers_config

IDS = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ours():
    torch.manual_seed(0)
    return randomize_(GLM5ForCausalLM(tiny_config(index_topk=8))).eval()


@pytest.fixture
def hf_dir(tmp_path):
    """A sharded directory written by transformers' own save_pretrained (per-expert keys + index)."""
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(1)
    twin = randomize_(GlmMoeDsaForCausalLM(to_transformers_config(tiny_config(index_topk=8), "eager")).eval(), seed=1)
    path = tmp_path / "hf"
    twin.save_pretrained(path, max_shard_size="50KB")
    return path, twin


def test_load_a_directory_written_by_transformers(hf_dir):
    path, twin = hf_dir
    assert (path / "model.safetensors.index.json").exists()
    with open(path / "model.safetensors.index.json") as fh:
        keys = json.load(fh)["weight_map"]
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in keys), "expected per-expert hub keys"
    with pytest.warns(UserWarning, match="no MTP layer"):
        model = GLM5ForCausalLM.from_pretrained(path)  # transformers writes no MTP layer
    assert len(model.mtp) == 0 and model.config.num_nextn_predict_layers == 0
    with torch.no_grad():
        err = (model(IDS).logits - twin(IDS).logits).abs().max().item()
    assert err < 1e-4, f"max |ours - transformers| = {err:.2e}"


def test_partly_missing_mtp_layer_is_an_error(ours, tmp_path):
    ours.save_pretrained(tmp_path / "p")
    L = ours.config.num_hidden_layers
    _rewrite(tmp_path / "p", lambda s: s.pop(f"model.layers.{L}.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*mtp\.0\.eh_proj\.weight"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "p")


def test_save_is_loaded_by_transformers_with_only_the_mtp_layer_unexpected(ours, tmp_path):
    from transformers import GlmMoeDsaForCausalLM

    ours.save_pretrained(tmp_path / "out", max_shard_size=40_000)
    twin, info = GlmMoeDsaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    L = ours.config.num_hidden_layers
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])
    assert f"model.layers.{L}.shared_head.head.weight" in info["unexpected_keys"]
    assert f"model.layers.{L}.eh_proj.weight" in info["unexpected_keys"]
    with torch.no_grad():
        err = (twin.eval()(IDS).logits - ours(IDS).logits).abs().max().item()
    assert err < 1e-4, f"max |transformers - ours| = {err:.2e}"


def test_save_load_round_trip_is_exact_including_mtp(ours, tmp_path):
    ours.save_pretrained(tmp_path / "rt")
    assert (tmp_path / "rt" / "model.safetensors").exists()
    back = GLM5ForCausalLM.from_pretrained(tmp_path / "rt")
    saved, loaded = ours.state_dict(), back.state_dict()
    assert saved.keys() == loaded.keys(), f"names differ: {sorted(saved.keys() ^ loaded.keys())}"
    for name, a in saved.items():
        # a copy of the same bytes: exact on any CPU
        assert a.dtype == loaded[name].dtype and torch.equal(a, loaded[name]), name
    with torch.no_grad():
        assert torch.equal(back(IDS, return_mtp=True).mtp_logits[0], ours(IDS, return_mtp=True).mtp_logits[0])


def test_fused_expert_keys_load_too(ours, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "fused"
    ours.config.save_pretrained(path)
    L = ours.config.num_hidden_layers
    state = {}
    for k, v in ours.state_dict().items():
        if k.startswith("mtp."):
            depth, rest = k[4:].split(".", 1)
            k = f"model.layers.{L + int(depth)}.{rest}"
        state[k] = v.contiguous().clone()
    save_file(state, str(path / "model.safetensors"))
    back = GLM5ForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, ours(IDS).logits)


def test_bf16_save_and_dtype_on_load(ours, tmp_path):
    ours.to(torch.bfloat16).save_pretrained(tmp_path / "bf")
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    back = GLM5ForCausalLM.from_pretrained(tmp_path / "bf")
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert back.model.layers[1].mlp.gate.weight.dtype == torch.float32
    back32 = GLM5ForCausalLM.from_pretrained(tmp_path / "bf", dtype=torch.float32)
    assert back32.lm_head.weight.dtype == torch.float32


def test_resave_removes_stale_shards(ours, tmp_path):
    ours.save_pretrained(tmp_path / "d", max_shard_size=20_000)
    assert len([f for f in os.listdir(tmp_path / "d") if f.endswith(".safetensors")]) > 1
    ours.save_pretrained(tmp_path / "d")
    files = sorted(os.listdir(tmp_path / "d"))
    assert files == ["config.json", "model.safetensors"], files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".glm5-save-")], "temporary folder left behind"


# ------------------------------------------------------------------------------------------ errors
def _rewrite(path, mutate):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    mutate(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_names_the_key_and_shape(ours, tmp_path):
    ours.save_pretrained(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda s: s.pop("model.layers.0.self_attn.q_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_b_proj\.weight \(96, 48\)"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "m")


def test_misshaped_tensor_names_the_key_and_both_shapes(ours, tmp_path):
    ours.save_pretrained(tmp_path / "s")

    def mutate(s):
        s["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 63)

    _rewrite(tmp_path / "s", mutate)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight: checkpoint shape \(64, 63\) does not match the model's \(64, 64\)"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "s")


def test_unexpected_tensor_is_an_error_unless_not_strict(ours, tmp_path):
    ours.save_pretrained(tmp_path / "u")
    _rewrite(tmp_path / "u", lambda s: s.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="extra.weight"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "u")
    GLM5ForCausalLM.from_pretrained(tmp_path / "u", strict=False)


def test_truncated_file_is_a_clear_error(ours, tmp_path):
    ours.save_pretrained(tmp_path / "t")
    f = tmp_path / "t" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "t")


def test_garbage_file_is_a_clear_error(ours, tmp_path):
    ours.save_pretrained(tmp_path / "g")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "g")


def test_index_pointing_at_a_missing_shard(ours, tmp_path):
    ours.save_pretrained(tmp_path / "i", max_shard_size=20_000)
    shard = sorted(f for f in os.listdir(tmp_path / "i") if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / "i" / shard)
    with pytest.raises(CheckpointError, match=f"lists {shard}, which is missing"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "i")


def test_empty_or_absent_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        GLM5ForCausalLM.from_pretrained(tmp_path / "nothing")
    tiny_config().save_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "empty")


def test_loading_streams_without_a_second_copy(ours, tmp_path, monkeypatch):
    """The model is allocated once (meta -> to_empty) and tensors are copied in one at a time."""
    import glm5.checkpoint as ck

    ours.save_pretrained(tmp_path / "x")
    seen_live = []
    real = ck.iter_checkpoint_tensors

    def spy(directory):
        for key, tensor in real(directory):
            seen_live.append(tensor.numel())
            yield key, tensor

    monkeypatch.setattr(ck, "iter_checkpoint_tensors", spy)
    GLM5ForCausalLM.from_pretrained(tmp_path / "x")
    total = sum(p.numel() for p in ours.parameters())
    assert max(seen_live) < total / 4, "one tensor at a time, never the whole state dict"


def test_tied_embeddings_load_tied(tmp_path):
    """A tied checkpoint has no lm_head.weight: the loaded head must be the embedding, not empty memory."""
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(1)
    cfg = tiny_config(index_topk=8, tie_word_embeddings=True)
    twin = randomize_(GlmMoeDsaForCausalLM(to_transformers_config(cfg, "eager")).eval(), seed=1)
    twin.save_pretrained(tmp_path / "hf")
    model = GLM5ForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert (model(IDS).logits - twin(IDS).logits).abs().max() < 1e-4
    torch.manual_seed(2)  # and our own tied model's round trip, MTP included
    model = randomize_(GLM5ForCausalLM(cfg), seed=2).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "ours")
    again = GLM5ForCausalLM.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        a, b = model(IDS, return_mtp=True), again(IDS, return_mtp=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_an_index_whose_weight_map_is_not_a_mapping_is_a_clear_error(ours, tmp_path):
    ours.save_pretrained(tmp_path, max_shard_size=50_000)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = sorted(set(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="weight_map"):
        GLM5ForCausalLM.from_pretrained(tmp_path)
