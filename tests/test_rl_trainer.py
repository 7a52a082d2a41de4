"""The RL trainer step on hand-made episodes: every algorithm updates the policy; masks (off-policy, over-long)
remove the tokens they should (glm5/rl/trainer.py)."""

import math

import pytest
import torch
from conftest import tiny_config

from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.losses import ALGOS, LossConfig
from glm5.rl.rollout import Episode
from glm5.rl.trainer import RLTrainer, TrainerConfig, sequence_logprobs


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return GLM5ForCausalLM(tiny_config(vocab_size=512))


def _group(model, rewards, versions=None, truncated=False):
    gen = torch.Generator().manual_seed(1)
    eps = []
    for i, r in enumerate(rewards):
        ep = Episode(group=0, index=i, env_seed=0, sample_seed=i,
                     prompt_ids=torch.randint(0, 512, (5,), generator=gen).tolist(),
                     tokens=torch.randint(0, 512, (4,), generator=gen).tolist())
        ep.loss_mask = [1, 1, 0, 1]  # the third token is an observation
        ep.versions = list(versions or [0, 0, -1, 0])
        ep.rewards = [r]
        ep.truncated = truncated and i == 0
        eps.append(ep)
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, eps)
    for ep, row in zip(eps, logp):
        ep.logprobs = row.tolist()
    return eps


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_moves_the_policy_toward_the_better_response(base_model, algo):
    import copy

    model = copy.deepcopy(base_model)
    group = _group(model, [1.0, 0.0])
    trainer = RLTrainer(model, TrainerConfig(loss=LossConfig(algo=algo, mismatch="tis"), lr=1e-3), group_size=2)
    before, _ = sequence_logprobs(model, group)
    metrics = trainer.train_step([group])
    after, _ = sequence_logprobs(model, group)
    assert trainer.version == 1 and math.isfinite(metrics["pg_loss"]) and metrics["trained_tokens"] == 6
    mask = torch.tensor([[1.0, 1, 0, 1]] * 2)
    gain = ((after - before) * mask).sum(-1)
    assert gain[0] > gain[1], f"{algo}: rewarded response {gain[0]:.4f} vs the other {gain[1]:.4f}"
    assert metrics["mismatch_kl"] < 1e-6  # the episodes' log-probs are this model's


def test_offpolicy_and_overlong_masks(base_model):
    import copy

    model = copy.deepcopy(base_model)
    trainer = RLTrainer(model, TrainerConfig(mask_offpolicy=True), group_size=2)
    trainer.version = 3
    group = _group(model, [1.0, 0.0], versions=[2, 3, -1, 3])
    assert trainer.train_step([group])["trained_tokens"] == 4  # version-2 tokens dropped
    trainer = RLTrainer(copy.deepcopy(base_model), TrainerConfig(overlong="mask"), group_size=2)
    metrics = trainer.train_step([_group(model, [1.0, 0.0], truncated=True)])
    assert metrics["trained_tokens"] == 3  # the truncated response trains nothing
    trainer = RLTrainer(copy.deepcopy(base_model), TrainerConfig(overlong="penalty", overlong_penalty=0.5), group_size=2)
    assert trainer._rewards(_group(model, [1.0, 0.0], truncated=True)).tolist() == [0.5, 0.0]


def test_staleness_is_reported_per_trained_token(base_model):
    import copy

    trainer = RLTrainer(copy.deepcopy(base_model), TrainerConfig(), group_size=2)
    trainer.version = 2
    metrics = trainer.train_step([_group(base_model, [1.0, 0.0], versions=[0, 1, -1, 2])])
    assert metrics["staleness_max"] == 2 and metrics["staleness_mean"] == pytest.approx(1.0)


def test_grad_clip_zero_means_no_clipping(base_model):
    import copy

    model = copy.deepcopy(base_model)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = RLTrainer(model, TrainerConfig(grad_clip=0.0, lr=1e-3), group_size=2)
    metrics = trainer.train_step([_group(model, [1.0, 0.0])])
    assert metrics["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "grad_clip 0 zeroed the update"
    with pytest.raises(ValueError, match="grad clip -1"):
        TrainerConfig(grad_clip=-1.0).validate()
