"""`glm5 rl` end to end: input checks, the output contract, kill -9 + --resume, the Ray placement
(glm5/rl/run.py, cli.py, actors.py, buffer.py)."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glm5.cli import main
from glm5.rl.run import METRIC_KEYS, RLConfig, load_policy, run_rl

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--env", "countdown", "--algo", "grpo", "--steps", "2", "--rollout-batch", "2", "--group-size", "2",
         "--max-new-tokens", "6", "--rollout-workers", "0", "--no-progress"]


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    return err


def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    args = ["rl", "--preset", "nano", "--out", str(out), "--mode", "sync"]
    assert "unknown; shipped" in _error(capsys, args + [a if a != "countdown" else "nope" for a in SMALL])
    small_g1 = [a if a != "--group-size" else "--group-size" for a in SMALL]
    small_g1[small_g1.index("--group-size") + 1] = "1"
    assert "--group-size 1 with --algo grpo" in _error(capsys, args + small_g1)
    (tmp_path / "plugin_rl_bad.py").write_text("def score(messages, env):\n    raise KeyError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "raised KeyError" in _error(capsys, args + SMALL + ["--reward", "plugin_rl_bad:score"])
    assert "--overlap is april's" in _error(capsys, args + SMALL + ["--overlap"])
    april = ["rl", "--preset", "nano", "--out", str(out), "--mode", "april"]
    assert "--max-staleness must be >= 1" in _error(capsys, april + SMALL + ["--overlap", "--max-staleness", "0"])
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    err = _error(capsys, ["rl", "--init", str(model_dir), "--out", str(out)] + SMALL)
    assert "has no tokenizer" in err
    assert not out.exists(), "nothing may be written for bad input"


def test_run_writes_metrics_model_and_report(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    summary = run_rl(RLConfig(out=str(out), preset="nano", env="calculator", mode="april", steps=2, rollout_batch=2,
                              group_size=2, max_new_tokens=6, over_sample=2.0, progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(METRIC_KEYS) <= set(r), f"missing {set(METRIC_KEYS) - set(r)}"
        assert r["worker_versions"] == [r["policy_version"]]
        assert r["staleness_max"] <= 1
    assert records[-1]["policy_version"] == 2 == summary["policy_version"]
    from glm5.engine import LLM
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import Tokenizer

    model = GLM5ForCausalLM.from_pretrained(out / "model")
    Tokenizer.from_file(out / "model")
    llm = LLM.from_pretrained(out / "model")
    assert llm.generate([[1, 2, 3]])[0].token_ids
    assert model.config.vocab_size > 0
    report = (out / "report.md").read_text()
    for name in ("rl_reward.png", "rl_staleness.png", "rl_mismatch.png", "rl_throughput.png", "rl_response_length.png"):
        assert name in report and (out / "plots" / name).is_file()


def _cli(out, steps, *extra):
    # bench/rl.py's task: most answers 4-12 tokens, one prompt in ten up to 24 (GLM5_BENCH_RL_LONGEST), so APRIL
    # aborts long answers and the checkpoints hold partial episodes
    return [sys.executable, "-m", "glm5.cli", "rl", "--preset", "nano", "--env", "bench.rl:LongTailEnv", "--algo", "grpo",
            "--mode", "april", "--steps", str(steps), "--rollout-batch", "2", "--group-size", "2",
            "--max-new-tokens", "24", "--over-sample", "2", "--max-staleness", "2", "--rollout-workers", "0",
            "--lr", "1e-3", "--no-progress", "--out", str(out), *extra]


def test_april_with_kept_kv_caches_continues_partials_on_them(tmp_path, monkeypatch, capsys):
    """--keep-partial-kv: the worker suspends APRIL's aborted episodes and resumes them on their KV caches
    (`partial_kv_kept` counts them); the staleness bound and the metrics contract hold as without it."""
    torch.set_num_threads(1)
    monkeypatch.setenv("GLM5_BENCH_RL_LONGEST", "24")  # bench/rl.py's long tail (see _cli)
    out = tmp_path / "kv"
    argv = _cli(out, 3, "--keep-partial-kv", "--save-every", "0")[3:]  # after `python -m glm5.cli`
    assert main(argv) == 0
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sum(r["partial_kv_kept"] for r in records) > 0, "no partial episode continued on its kept KV cache"
    assert sum(r["partial_kv_kept"] for r in records) <= sum(r["aborted"] for r in records)
    assert max(r["staleness_max"] for r in records) <= 2
    assert all(key in records[0] for key in METRIC_KEYS)


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLM5_BENCH_RL_LONGEST": "24"}
    steps = 5
    whole = tmp_path / "whole"
    subprocess.run(_cli(whole, steps), env=env, check=True, capture_output=True, timeout=900)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline:  # kill -9 once two steps are logged (a checkpoint each step)
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(metrics.read_text().splitlines())
    assert 2 <= logged < steps, "the run should have been killed mid-way"
    buffers = [torch.load(p, weights_only=True)["data"]["buffer"] for p in (killed / "checkpoints").glob("step_*.pt")]
    assert any(b["partial"] for b in buffers), "the checkpoints should hold APRIL's partial episodes"
    # the same command without --resume refuses to overwrite
    refused = subprocess.run(_cli(killed, steps), env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    subprocess.run(_cli(killed, steps, "--resume"), env=env, check=True, capture_output=True, timeout=900)
    assert sum(r["partial_resumed"] for r in map(json.loads, metrics.read_text().splitlines())) > 0
    a = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):  # the same prompts, samples, partial episodes and updates as the uninterrupted run
        for key in ("reward_mean", "response_len_mean", "staleness_mean", "partial_resumed", "policy_version"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
    from safetensors.torch import load_file

    wa = load_file(next((whole / "model").glob("*.safetensors")))
    wb = load_file(next((killed / "model").glob("*.safetensors")))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.slow
def test_ray_two_rollout_actors_and_a_slow_trainer_keep_the_staleness_bound(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    torch.set_num_threads(1)
    # the actors (on the local Ray each run starts) import this checkout, bench/rl.py's env and its setting
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLM5_BENCH_RL_LONGEST", "24")  # bench/rl.py's long tail (see _cli)
    out = tmp_path / "ray"
    summary = run_rl(RLConfig(out=str(out), preset="nano", env="countdown", mode="async", steps=3, rollout_batch=2,
                              group_size=2, max_new_tokens=6, max_staleness=1, rollout_workers=2, ray_num_cpus=2,
                              slow_trainer_seconds=1.0, progress=False), save_model=False)
    records = _records(out)
    assert [r["policy_version"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["worker_versions"] == [r["policy_version"]] * 2, "a worker kept old weights"
        assert r["staleness_max"] <= 1
    # after the first step every trained token came from the previous version: generation overlapped training
    assert [r["staleness_max"] for r in records[1:]] == [1, 1]
    _assert_ray_actors(summary["placement"], 2)

    # APRIL: a run in this process for 2 steps; the same run resumed from its step-1 checkpoint on Ray (its
    # buffer, partial episodes included, loaded into the buffer actor) trains step 2 the same way and
    # checkpoints the same buffer through the actor
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    model, tokenizer = load_policy(RLConfig(preset="nano"))  # in memory, left holding the trained weights
    resumed = copy.deepcopy(model)  # (its weights come from the checkpoint)
    config = dict(env="bench.rl:LongTailEnv", mode="april", rollout_batch=2, group_size=2, max_new_tokens=24,
                  over_sample=2.0, max_staleness=2, lr=1e-3, keep_last=2, ray_num_cpus=2, progress=False)
    summary = run_rl(RLConfig(out=str(whole), steps=2, rollout_workers=0, **config), model, tokenizer,
                     save_model=False)
    assert not summary["placement"]["buffer"]["ray_actor"]
    shutil.copytree(whole, cut)  # as if killed after step 1: its step-1 checkpoint is the last
    (cut / "checkpoints" / "step_000002.pt").unlink()
    assert _buffer(cut, 1)["partial"], "the checkpoint should hold APRIL's partial episodes"
    summary = run_rl(RLConfig(out=str(cut), steps=2, rollout_workers=1, resume=True, **config), resumed, tokenizer,
                     save_model=False)
    _assert_ray_actors(summary["placement"], 1)
    a, b = _records(whole), _records(cut)
    assert [r["step"] for r in b] == [1, 2]
    assert a[1]["partial_resumed"] > 0, "step 2 should continue step 1's partial episodes"
    assert max(r["staleness_max"] for r in a + b) <= 2
    for key in ("reward_mean", "response_len_mean", "staleness_mean", "staleness_max", "partial_resumed",
                "policy_version"):
        assert a[1][key] == pytest.approx(b[1][key], abs=1e-6), f"resumed step 2 {key}: {a[1][key]} vs {b[1][key]}"
    kept, from_actor = _buffer(whole, 2), _buffer(cut, 2)
    assert from_actor["partial"], "the buffer actor's checkpoint should hold the partial episodes"
    assert _episodes(kept) == _episodes(from_actor) and kept["next_group"] == from_actor["next_group"]
    worst = max(float((p - q).abs().max()) for p, q in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert worst < 1e-5, f"resumed run's weights differ by {worst:.2e}"


def test_packed_weights_are_the_state_dict_exactly():
    """The trainer's weights travel to the workers as PackedWeights (one byte array): every tensor comes back
    bit for bit, whatever its dtype, shape or size, and loads into a model."""
    from glm5.rl.actors import PackedWeights

    torch.manual_seed(0)
    state = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5),
             "d": torch.empty(0, 4), "e": torch.randn(2, 3, 4)[:, 1], "f": torch.tensor(2.5, dtype=torch.float64)}
    back = PackedWeights(state).unpack()
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    model, _ = load_policy(RLConfig(preset="nano"))
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.data.zero_()
    twin.load_state_dict(PackedWeights(model.state_dict()).unpack())
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.slow
def test_april_overlap_on_ray_generates_while_the_trainer_trains(tmp_path, monkeypatch):
    """--mode april --overlap on Ray: the next step's round runs during the update and, with a slow trainer,
    goes on past APRIL's stop until the update is done (so it aborts nothing); weights reach the worker tagged
    with the trainer's version; every trained token is within the staleness bound, and after the first step
    at least one version old."""
    pytest.importorskip("ray")
    torch.set_num_threads(1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLM5_BENCH_RL_LONGEST", "24")
    out = tmp_path / "overlap"
    summary = run_rl(RLConfig(out=str(out), preset="nano", env="bench.rl:LongTailEnv", mode="april", overlap=True,
                              keep_partial_kv=True, steps=3, rollout_batch=2, group_size=2, max_new_tokens=24,
                              over_sample=2.0, max_staleness=3, rollout_workers=1, ray_num_cpus=2,
                              slow_trainer_seconds=3.0, progress=False), save_model=False)
    records = _records(out)
    assert [r["policy_version"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["worker_versions"] == [r["policy_version"]], "the worker kept old weights"
        assert r["staleness_max"] <= 3
    assert all(r["staleness_max"] >= 1 for r in records[1:]), "generation should have overlapped the update"
    # steps 2 and 3 train what was generated during the 3-second updates: nothing left to abort
    assert [r["aborted"] for r in records[1:]] == [0, 0], [r["aborted"] for r in records]
    _assert_ray_actors(summary["placement"], 1)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _buffer(out, step):
    return torch.load(out / "checkpoints" / f"step_{step:06d}.pt", weights_only=True)["data"]["buffer"]


def _episodes(buffer):
    """The buffer's episodes as (where, uid, status, tokens, versions)."""
    eps = [("partial", e) for e in buffer["partial"]] + [("waiting", e) for e in buffer["waiting"]]
    eps += [("done", e) for group in buffer["done"] for e in group]
    return sorted((where, e["group"], e["index"], e["status"], e["tokens"], e["versions"]) for where, e in eps)


def _assert_ray_actors(placement, workers):
    """The buffer, the trainer and each rollout worker ran as a Ray actor, each in a process of its own."""
    roles = [placement["buffer"], placement["trainer"], *placement["workers"]]
    assert [r["class"] for r in roles] == ["RolloutBuffer", "TrainerActor"] + ["RolloutActor"] * workers
    assert all(r["ray_actor"] for r in roles), f"not all Ray actors: {roles}"
    pids = [r["pid"] for r in roles]
    assert os.getpid() not in pids and len(set(pids)) == len(pids), pids
