"""The RL trainer as a group of ranks (glm5/rl/actors.py's TrainerGroup: Ray actors in one gloo process group,
the model under glm5/train/parallel.py's DDP or FSDP2): its update is the single trainer's on the same batch,
and `glm5 rl --trainer-workers 2` runs, checkpoints and resumes (glm5/rl/trainer.py, run.py, cli.py)."""

import copy
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from glm5.cli import main
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.rollout import Episode
from glm5.rl.run import RLConfig
from glm5.rl.trainer import sequence_logprobs

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]

# The group and the single trainer sum the same per-token gradients in another order and with other padding
# (each rank's micro-batches are shorter, which changes the matmul blocking), and DDP / FSDP2 add the two
# ranks' halves in one more rounding. Every element is a float32 sum over ~100 tokens and a few layers, so
# it differs by a few dozen units of rounding (u = 2^-24 = 6e-8) of the summed magnitudes: 1e-5 relative (~170 u)
# is far above that and far below a normalization error, which moves the gradient by a factor (1/2 for a
# missing world-size factor, the ratio of the ranks' token counts (24 vs 10 here) for per-rank means).
TOL = 1e-5


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        # the actors import this checkout's glm5 and tests/rl_helpers.py (the run's reward)
        path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
        ray.init(include_dashboard=False, num_cpus=2, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path, **{k: os.environ[k] for k in ("ASAN_OPTIONS", "CC", "GLM5_CACHE") if k in os.environ}, "LD_PRELOAD": os.environ.get("LD_PRELOAD_X", "")}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return GLM5ForCausalLM(tiny_config(vocab_size=512))


def _batch(model):
    """4 groups of 2 with different response lengths, an observation token inside the longer responses, and
    engine log-probs off the trainer's (so the TIS weights vary). The last group's responses are all
    observation (nothing to train: a micro-batch the single trainer skips and rank 1 must still run), so rank
    0's two groups hold 24 trained tokens in 4 sequences, rank 1's 10 in 2 (GRPO's per-token and GSPO's
    per-sequence means differ from per-rank means)."""
    gen = torch.Generator().manual_seed(1)
    lengths, rewards = [4, 9, 6, 2], [[1.0, 0.0], [0.2, 0.9], [0.0, 0.5], [1.0, 0.3]]
    groups = []
    for g, (n, rs) in enumerate(zip(lengths, rewards)):
        group = []
        for i, r in enumerate(rs):
            ep = Episode(group=g, index=i, env_seed=g, sample_seed=i,
                         prompt_ids=torch.randint(0, 512, (3 + g,), generator=gen).tolist(),
                         tokens=torch.randint(0, 512, (n,), generator=gen).tolist())
            ep.loss_mask = [0 if (t == 2 and n > 4) or g == 3 else 1 for t in range(n)]
            ep.versions = [0 if m else -1 for m in ep.loss_mask]
            ep.rewards = [r]
            group.append(ep)
        groups.append(group)
    episodes = [e for g in groups for e in g]
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, episodes)
    for ep, row in zip(episodes, logp):
        ep.logprobs = [x + 0.05 * ((j % 3) - 1) for j, x in enumerate(row[: len(ep.tokens)].tolist())]
    return groups


def _flat(tensors: dict, keys) -> torch.Tensor:
    return torch.cat([tensors[k].float().flatten() for k in keys])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode,algo,kl", [("ddp", "grpo", 0.05), ("fsdp", "grpo", 0.0), ("ddp", "gspo", 0.0),
                                          ("fsdp", "gspo", 0.05)])
def test_two_ranks_make_the_single_trainer_update(local_ray, base_model, mode, algo, kl):
    from glm5.rl.actors import TrainerActor, TrainerGroup

    config = RLConfig(algo=algo, group_size=2, rollout_batch=4, lr=1e-3, grad_clip=0.05, micro_batch=2,
                      kl_coef=kl, rollout_workers=1, trainer_workers=2, trainer_parallel=mode, threads=1)
    batch = _batch(base_model)
    start = {k: v.clone() for k, v in base_model.state_dict().items()}
    single = TrainerActor(copy.deepcopy(base_model), replace(config, trainer_workers=1))
    one = single.train_step(copy.deepcopy(batch))
    one_state = single.state_dict()
    group = TrainerGroup(local_ray, base_model, config)
    try:
        two = group.train_step(batch)
        two_state = group.state_dict()
        again = group.weights()
    finally:
        group.kill()

    assert two["policy_version"] == one["policy_version"] == 1
    assert two["trained_tokens"] == one["trained_tokens"] == 34  # both ranks' tokens counted
    assert two["staleness_max"] == one["staleness_max"] == 0
    # the global gradient norm, before clipping: a missing world-size factor halves it
    assert one["grad_norm"] > config.grad_clip, "the test wants clipping active (the global norm matters)"
    assert abs(two["grad_norm"] - one["grad_norm"]) <= TOL * one["grad_norm"], (two["grad_norm"], one["grad_norm"])
    for key in ("pg_loss", "entropy", "mismatch_kl", *(["kl"] if kl else [])):
        assert abs(two[key] - one[key]) <= TOL * max(abs(one[key]), 1e-3), (key, two[key], one[key])
    # the full state on rank 0 whatever the mode, in the same layout as the single trainer's
    assert set(two_state["model"]) == set(one_state["model"]) == set(again)
    keys = sorted(one_state["model"])
    w1, w2, w0 = _flat(one_state["model"], keys), _flat(two_state["model"], keys), _flat(start, keys)
    assert torch.equal(_flat(again, keys), w2)
    # AdamW's first moment after one step is 0.1 x the clipped gradient: the update's direction and size
    s1, s2 = one_state["optimizer"]["optimizers"][0]["state"], two_state["optimizer"]["optimizers"][0]["state"]
    assert sorted(s1) == sorted(s2)
    m1 = torch.cat([s1[i]["exp_avg"].flatten() for i in sorted(s1)])
    m2 = torch.cat([s2[i]["exp_avg"].flatten() for i in sorted(s1)])
    assert _rel(m2, m1) < TOL, f"{mode} {algo}: first moments differ by {_rel(m2, m1):.2e} relative"
    # the weights: AdamW's first step is lr * g / (|g| + eps), which turns a gradient difference d into at most
    # lr * d / eps (for |g| ~ eps): bound each element's weight difference by that, plus a few roundings of w
    # and of the update (whose size is at most ~lr)
    optimizer = single.trainer.optimizer.optimizers[0]
    names = {id(p): n for n, p in single.trainer.inner.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    for i in sorted(s1):
        name = order[i]
        g1, g2 = s1[i]["exp_avg"] / 0.1, s2[i]["exp_avg"] / 0.1
        dw = (two_state["model"][name] - one_state["model"][name]).abs()
        bound = config.lr * (g2 - g1).abs() / 1e-8 + 4 * 2.0**-24 * (one_state["model"][name].abs() + config.lr)
        assert bool((dw <= bound).all()), f"{mode} {algo} {name}: off by {float((dw - bound).max()):.2e} beyond the bound"
    for name in set(order) - {order[i] for i in s1}:  # no gradient (the MTP layer): unchanged on both
        assert torch.equal(two_state["model"][name], start[name]) and torch.equal(one_state["model"][name], start[name])
    delta1, delta2 = w1 - w0, w2 - w0
    print(f"{mode} {algo}: grad_norm {abs(two['grad_norm'] / one['grad_norm'] - 1):.1e}, first moment "
          f"{_rel(m2, m1):.1e}, update {_rel(delta2, delta1):.1e} relative")
    assert _rel(delta2, delta1) < TOL, f"{mode} {algo}: update differs by {_rel(delta2, delta1):.2e} relative"


def test_bad_trainer_flags_are_one_line_errors(tmp_path, capsys):
    base = ["rl", "--preset", "nano", "--env", "countdown", "--steps", "1", "--group-size", "2",
            "--max-new-tokens", "4", "--no-progress", "--out", str(tmp_path / "o")]
    for extra, message in [(["--rollout-batch", "2", "--rollout-workers", "0", "--trainer-workers", "2"],
                            "needs --rollout-workers >= 1"),
                           (["--rollout-batch", "3", "--rollout-workers", "1", "--trainer-workers", "2"],
                            "--rollout-batch 3 must be a multiple of --trainer-workers 2")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    with pytest.raises(SystemExit):
        main(base + ["--rollout-batch", "2", "--trainer-parallel", "tp"])
    with pytest.raises(ValueError, match="trainer-workers 0"):
        RLConfig(preset="nano", trainer_workers=0).validate()
    assert not (tmp_path / "o").exists()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_with_two_trainer_ranks_checkpoints_and_resumes(local_ray, tmp_path, capsys):
    """FSDP2 over 2 ranks for 2 steps; the same run stopped after 1 and resumed (its checkpoint from the
    FSDP2 group) with DDP ranks: the same metrics and, to AdamW kernel rounding (the fused kernel on plain
    tensors, the loop on DTensors: ~1e-7 a step), the same weights."""
    torch.set_num_threads(1)
    # a reward that spreads a random model's answers (tests/rl_helpers.py): every step updates the weights
    common = ["rl", "--preset", "nano", "--env", "countdown", "--reward", "rl_helpers:hash_reward", "--algo", "grpo",
              "--mode", "sync",
              "--rollout-batch", "2", "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-3",
              "--rollout-workers", "1", "--trainer-workers", "2", "--no-progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(common + ["--steps", "2", "--trainer-parallel", "fsdp", "--out", str(whole)]) == 0
    assert "placement: 1 rollout worker(s), trainer (2 rank(s)) and buffer: Ray actors" in capsys.readouterr().out
    records = _records(whole)
    assert [r["policy_version"] for r in records] == [1, 2]
    for r in records:
        assert r["worker_versions"] == [r["policy_version"]]
        assert r["trained_tokens"] > 0 and r["grad_norm"] > 0 and r["reward_std"] > 0
    model = GLM5ForCausalLM.from_pretrained(whole / "model")
    assert (whole / "report.md").is_file()

    assert main(common + ["--steps", "1", "--trainer-parallel", "fsdp", "--out", str(cut)]) == 0
    assert main(common + ["--steps", "2", "--trainer-parallel", "ddp", "--resume", "--out", str(cut)]) == 0
    resumed = _records(cut)
    assert [r["step"] for r in resumed] == [1, 2]
    for a, b in zip(records, resumed):
        for key in ("reward_mean", "response_len_mean", "trained_tokens", "policy_version"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key, a[key], b[key])
    other = GLM5ForCausalLM.from_pretrained(cut / "model")
    worst = max(float((p - q).abs().max()) for p, q in zip(model.state_dict().values(), other.state_dict().values()))
    assert worst < 1e-5, f"resumed run's weights differ by {worst:.2e}"


def test_a_killed_rank_fails_the_call_instead_of_hanging(local_ray, base_model):
    from glm5.rl.actors import TrainerGroup

    config = RLConfig(group_size=2, rollout_batch=4, rollout_workers=1, trainer_workers=2, threads=1)
    group = TrainerGroup(local_ray, base_model, config)
    try:
        local_ray.kill(group.ranks[1])
        with pytest.raises(ray.exceptions.RayActorError):
            group.train_step(_batch(base_model))
    finally:
        group.kill()
