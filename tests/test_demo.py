"""`glm5 demo` end to end at toy size: every output is written, each stage's fixed probe rows are scored at its
start and end (summary.json, report.md) and fall in every stage, runs/latest points at the run, and the model
directory loads through the README's path.

    python -m pytest tests/test_demo.py -q -m slow
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_writes_probe_rows_per_stage_and_a_loadable_model(tmp_path):
    cmd = [sys.executable, "-m", "glm5.cli", "demo", "--out", str(tmp_path), "--name", "toy", "--threads", "1",
           "--pretrain-steps", "30", "--warmup-steps", "10", "--sparse-steps", "10", "--sft-steps", "10",
           "--stdlib-bytes", "900000", "--conversations", "200", "--tasks", "2", "--heldout-rows", "4",
           "--probe-rows", "6", "--max-new-tokens", "4", "--vocab-size", "1024", "--seq-len", "256", "--sft-seq-len", "512",
           "--rl-steps", "2", "--rl-batch", "1", "--rl-group-size", "2",
           # the probe rows are 2/3 stdlib text: pretrain on it too, so every stage trains what its probe scores
           # (by default the demo pretrains on the chats alone, and a toy-sized stage can then raise the stdlib rows)
           "--pretrain-code"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "toy"
    summary = json.loads((run / "summary.json").read_text())
    stages = {row["stage"]: row for row in summary["stages"]}
    assert list(stages) == ["pretrain", "dsa-warmup", "dsa-sparse", "sft"]
    for name, row in stages.items():
        assert row["probe_rows"] == 6 and row["probe_start"] > 0 and row["probe_end"] > 0, name
        # each stage's training lowers its own objective on the fixed held-out probe rows (the warm-up's is
        # the indexer KL): what the README's per-stage figures claim, here at toy size
        assert row["probe_end"] < row["probe_start"], f"{name}: probe loss {row['probe_start']:.4f} -> {row['probe_end']:.4f}"
    assert summary["wall_minutes"] > 0
    assert stages["dsa-warmup"]["probe_start"] == stages["dsa-warmup"]["probe_kl_start"]
    assert stages["pretrain"]["probe_kl_start"] is None and stages["dsa-sparse"]["probe_kl_start"] is not None
    # the warm-up trains only the indexers: the dense LM loss on the probe rows does not move
    assert stages["dsa-warmup"]["probe_lm_end"] == pytest.approx(stages["dsa-warmup"]["probe_lm_start"], abs=1e-5)
    assert "fixed probe rows: start → end" in (run / "report.md").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == set(stages) and all("loss" in r and "step" in r for r in records)
    assert (run / "plots" / "loss.png").is_file()
    assert "Sample chat" in done.stdout
    # the RL stage: before / after on the held-out requests, its plots in the report
    assert set(summary["rl"]) == {"exact_call_before", "exact_call_after", "tool_validity_after", "steps"}
    assert summary["rl"]["steps"] == 2
    assert (run / "plots" / "rl_reward.png").is_file() and "rl_reward.png" in (run / "report.md").read_text()

    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import Tokenizer

    model = GLM5ForCausalLM.from_pretrained(run / "model")
    assert Tokenizer.from_file(run / "model").vocab_size == model.config.vocab_size
    latest = tmp_path / "latest"
    assert latest.is_symlink() and latest.resolve() == run.resolve()
    assert f"latest:  {latest} -> toy" in done.stdout
    from glm5.engine import LLM

    assert LLM.from_pretrained(str(latest / "model")).generate([[1, 2, 3]])[0].token_ids


def test_latest_is_swapped_atomically_and_never_replaces_a_real_folder(tmp_path):
    from glm5.demo import point_latest_at

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert point_latest_at(tmp_path / "a").resolve() == (tmp_path / "a").resolve()
    assert point_latest_at(tmp_path / "b").resolve() == (tmp_path / "b").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]  # no temporary link left behind
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()
    with pytest.raises(ValueError, match="not a symlink"):
        point_latest_at(tmp_path / "a")
