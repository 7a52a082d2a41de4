"""EngineConfig: one dataclass for the engine's knobs, read from `glm5 serve`'s flags by field name."""

from __future__ import annotations

import dataclasses

import pytest

from glm5.cli import build_parser
from glm5.engine.config import EngineConfig


def test_serve_flags_land_in_the_engine_config_by_field_name():
    args = build_parser().parse_args([
        "serve", "--preset", "nano", "--block-size", "8", "--kv-cache-tokens", "1000", "--max-num-seqs", "3",
        "--max-num-batched-tokens", "64", "--max-model-len", "200", "--speculative-tokens", "2", "--threads", "1",
        "--dtype", "bfloat16", "--device", "cpu", "--enforce-eager"])
    config = EngineConfig.from_args(args)
    assert config == EngineConfig(block_size=8, kv_cache_tokens=1000, max_num_seqs=3, max_num_batched_tokens=64,
                                  max_model_len=200, num_speculative_tokens=2, threads=1, dtype="bfloat16",
                                  device="cpu", cuda_graphs=False)
    assert config.num_blocks == 125
    defaults = EngineConfig.from_args(build_parser().parse_args(["serve"]))
    assert defaults == EngineConfig(), "a flag's default differs from the dataclass default"


def test_every_knob_but_the_ones_set_in_code_has_a_flag():
    args = build_parser().parse_args(["serve"])
    in_code = {"eos_token_ids", "cuda_graph_max_tokens"}  # from the tokenizer / a tuning constant
    missing = {f.name for f in dataclasses.fields(EngineConfig)} - set(vars(args)) - in_code
    assert not missing, f"EngineConfig fields without a glm5 serve flag: {missing}"


def test_keyword_arguments_still_work_and_override_the_config():
    from glm5.engine import LLM

    llm = LLM.from_preset("nano", EngineConfig(kv_cache_tokens=64, block_size=8), max_num_seqs=2)
    assert llm.engine_config.kv_cache_tokens == 64 and llm.engine_config.max_num_seqs == 2
    assert llm.block_manager.num_blocks == 8 and llm.scheduler.max_num_seqs == 2
    with pytest.raises(TypeError, match="kv_cache_size"):
        LLM(llm.model, kv_cache_size=64)


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(kv_cache_tokens=-1), dict(num_speculative_tokens=-1),
                                 dict(dtype="float8"), dict(max_model_len=1), dict(threads=0)])
def test_bad_values_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)
