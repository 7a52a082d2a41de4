"""GLM5Config: released values, validation errors that name the field, config.json round trips."""

import json

import pytest

from glm5 import GLM5Config
from glm5.config import PRESETS, indexer_pattern


def test_glm5_744b_preset_is_the_released_config():
    c = GLM5Config.from_preset("glm5-744b")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (154880, 6144, 78, 64)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (2048, 512, 192, 64, 256)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.first_k_dense_replace) == (256, 8, 1, 3)
    assert (c.index_topk, c.index_n_heads, c.index_head_dim) == (2048, 32, 128)
    assert c.rope_theta == 1e6 and c.max_position_embeddings == 202752 and c.rms_norm_eps == 1e-5
    assert c.pad_token_id == 154820 and c.eos_token_id == [154820, 154827, 154829]
    assert c.num_nextn_predict_layers == 1 and c.routed_scaling_factor == 2.5 and c.norm_topk_prob
    assert c.indexer_types == ["full"] * 78
    assert c.mlp_layer_types == ["dense"] * 3 + ["sparse"] * 75


def test_glm52_indexshare_pattern_matches_transformers():
    from transformers import GlmMoeDsaConfig

    ours = GLM5Config.from_preset("glm5.2-744b").indexer_types
    theirs = GlmMoeDsaConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3).indexer_types
    assert ours == theirs
    assert ours.count("full") < 78 / 3, "IndexShare should leave most layers without an indexer"
    assert indexer_pattern(8, 1, 2) == ["full"] * 8


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_validates(name):
    cfg = GLM5Config.from_preset(name)
    assert GLM5Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "changes, field, rule",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads", "divisible"),
        (dict(num_experts_per_tok=300), "num_experts_per_tok", "<= n_routed_experts"),
        (dict(index_topk=0), "index_topk", ">= 1"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope_scaling", "unknown rope type"),
        (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling", "factor"),
        (dict(n_group=3), "n_group", "divide"),
        (dict(n_group=8, topk_group=9), "topk_group", "<= n_group"),
        (dict(qk_rope_head_dim=63), "qk_rope_head_dim", "even"),
        (dict(hidden_size=0), "hidden_size", "positive"),
        (dict(hidden_act="gelu"), "hidden_act", "one of"),
        (dict(first_k_dense_replace=100), "first_k_dense_replace", "num_hidden_layers"),
        (dict(indexer_types=["shared"] + ["full"] * 77), "indexer_types", "layer 0"),
        (dict(pad_token_id=10**6), "pad_token_id", "vocab_size"),
        (dict(eos_token_id=[1, -5]), "eos_token_id", "vocab_size"),
        (dict(eos_token_id=True), "eos_token_id", "vocab_size"),
        (dict(index_topk=True), "index_topk", "integer"),
        (dict(num_hidden_layers="4"), "num_hidden_layers", "integer"),
        (dict(indexer_types=5), "indexer_types", "list"),
        (dict(rope_theta="1e6"), "rope_theta", "a number"),
        (dict(rms_norm_eps="1e-5"), "rms_norm_eps", "a number"),
        (dict(attention_dropout="0.1"), "attention_dropout", "a number"),
        (dict(routed_scaling_factor=-1), "routed_scaling_factor", "> 0"),
        (dict(routed_scaling_factor="2.5"), "routed_scaling_factor", "a number"),
        (dict(initializer_range=-1), "initializer_range", ">= 0"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}),
         "rope_scaling", "original_max_position_embeddings"),
    ],
)
def test_bad_config_raises_value_error_naming_field_and_rule(changes, field, rule):
    with pytest.raises(ValueError) as err:
        GLM5Config(**changes)
    assert field in str(err.value) and rule in str(err.value), str(err.value)


def test_config_json_round_trip_keeps_unknown_keys(tmp_path):
    cfg = GLM5Config.from_preset("glm5-744b")
    data = cfg.to_dict()
    data["some_future_key"] = {"a": 1}
    data["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = GLM5Config.from_pretrained(tmp_path)
    assert loaded.extra["some_future_key"] == {"a": 1}
    out = tmp_path / "out"
    loaded.save_pretrained(out)
    written = json.loads((out / "config.json").read_text())
    assert written["some_future_key"] == {"a": 1} and written["quantization_config"] == {"quant_method": "fp8"}
    assert written["model_type"] == "glm_moe_dsa"
    assert GLM5Config.from_pretrained(out) == loaded


def test_reads_old_style_rope_keys_and_transformers_rope_parameters():
    base = GLM5Config.from_preset("nano").to_dict()
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    old["rope_theta"] = 5e5
    old["rope_scaling"] = None
    assert GLM5Config.from_dict(old).rope_theta == 5e5
    new = dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                      "original_max_position_embeddings": 1024})
    new.pop("rope_theta", None)
    c = GLM5Config.from_dict(new)
    assert c.rope_theta == 1e6 and c.rope_type == "yarn" and c.rope_scaling["factor"] == 4.0


def test_wrong_model_type_and_bad_json_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        GLM5Config.from_dict({"model_type": "llama"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GLM5Config.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        GLM5Config.from_pretrained(tmp_path / "nowhere")


def test_from_depth_is_one_size_knob():
    small, big = GLM5Config.from_depth(4), GLM5Config.from_depth(8)
    assert big.hidden_size == 2 * small.hidden_size and big.num_hidden_layers == 8
    with pytest.raises(ValueError, match="depth"):
        GLM5Config.from_depth(0)
    with pytest.raises(ValueError, match="unknown preset"):
        GLM5Config.from_preset("gpt-5")


@pytest.mark.parametrize("field, value", [("mlp_bias", True), ("indexer_rope_interleave", False)])
def test_variants_the_model_does_not_build_are_refused(field, value, tmp_path):
    """A config.json field the model would otherwise read and ignore: refused with the field named, both when
    built in code and when loaded from a file; the released value is accepted."""
    with pytest.raises(ValueError, match=field):
        GLM5Config.from_preset("nano", **{field: value})
    released = GLM5Config.from_preset("nano").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**released, field: value}))
    with pytest.raises(ValueError, match=field):
        GLM5Config.from_pretrained(tmp_path)
    assert getattr(GLM5Config.from_preset("glm5-744b"), field) == (not value)
