"""`glm5 params`: parameter counts of the released config, from the real module tree on the meta device."""

import json
import subprocess
import sys

import pytest

from glm5 import GLM5Config
from glm5.params import count_parameters


def within(value, target, rel=1e-3):
    return abs(value - target) <= rel * target


def test_glm5_744b_counts_match_the_published_figures():
    c = count_parameters(GLM5Config.from_preset("glm5-744b"))
    assert within(c["total_params"], 743.9e9), c["total_params"]
    assert within(c["active_params_excluding_embeddings"], 40.8e9), c["active_params_excluding_embeddings"]
    assert within(c["active_params"], 41.8e9), c["active_params"]
    assert within(c["mtp_params"], 9.95e9), c["mtp_params"]
    assert within(c["routed_expert_params"], 724.8e9), c["routed_expert_params"]


def test_counts_equal_a_materialized_model():
    from glm5 import GLM5ForCausalLM

    cfg = GLM5Config.from_preset("nano")
    model = GLM5ForCausalLM(cfg)
    c = count_parameters(cfg)
    routers = sum(m.e_score_correction_bias.numel() for m in model.modules() if hasattr(m, "e_score_correction_bias"))
    assert routers > 0
    # what a checkpoint holds: every parameter and the routers' bias buffers
    assert c["total_params"] + c["mtp_params"] == sum(p.numel() for p in model.parameters()) + routers


@pytest.mark.parametrize("preset, tied", [("glm5-744b", False), ("glm5.2-744b", False), ("nano", False), ("nano", True)])
def test_plan_and_params_count_the_same_parameters(preset, tied):
    """`glm5 plan --json` and `glm5 params --json` read one count (glm5.params.checkpoint_tensors): the same
    totals, router biases included, a tied lm_head counted once."""
    from glm5.quant.plan import weight_groups

    cfg = GLM5Config.from_preset(preset, tie_word_embeddings=tied)
    counts = count_parameters(cfg)
    main, mtp = weight_groups(cfg)
    assert (main.total, mtp.total, main.routed) == (counts["total_params"], counts["mtp_params"],
                                                    counts["routed_expert_params"])
    if tied:
        untied = count_parameters(GLM5Config.from_preset(preset))
        assert untied["total_params"] - counts["total_params"] == cfg.vocab_size * cfg.hidden_size


def test_plan_and_params_clis_agree():
    def run(*argv):
        return json.loads(subprocess.run([sys.executable, "-m", "glm5.cli", *argv, "--json"], capture_output=True,
                                         text=True, check=True).stdout)

    plan = run("plan", "--preset", "glm5-744b", "--weights", "fp8", "--gpu", "h200")
    params = run("params", "glm5-744b")
    assert plan["params"]["total_params"] == params["total_params"]
    assert plan["params"]["mtp_params"] == params["mtp_params"]


@pytest.mark.parametrize("preset", ["glm5-744b", "nano"])
def test_cli_json_has_the_documented_keys(preset):
    out = subprocess.run([sys.executable, "-m", "glm5.cli", "params", preset, "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    for key in ("total_params", "mtp_params", "active_params", "active_params_excluding_embeddings"):
        assert isinstance(data[key], int) and data[key] > 0, key


def test_cli_unknown_preset_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "glm5.cli", "params", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown preset" in r.stderr and "Traceback" not in r.stderr
