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


def test_log_probs_run_the_lm_head_on_response_positions_only(base_model):
    """sequence_logprobs passes logits_to_keep (the positions that predict response tokens) and reads the right
    rows for each episode, prompts of different lengths included: the log-probs and entropies of full logits."""
    gen = torch.Generator().manual_seed(3)
    eps = []
    for i, (p, n) in enumerate([(3, 7), (9, 2), (5, 0), (6, 5)]):  # one episode without a response
        eps.append(Episode(group=0, index=i, env_seed=0, sample_seed=i,
                           prompt_ids=torch.randint(0, 512, (p,), generator=gen).tolist(),
                           tokens=torch.randint(0, 512, (n,), generator=gen).tolist()))
    with torch.no_grad():
        logp, ent = sequence_logprobs(base_model, eps, with_entropy=True)
        longest = max(len(e.prompt_ids) + len(e.tokens) for e in eps)
        ids = torch.tensor([e.prompt_ids + e.tokens + [0] * (longest - len(e.prompt_ids) - len(e.tokens)) for e in eps])
        full = torch.log_softmax(base_model(ids).logits.float(), dim=-1)
        kept = base_model(ids, logits_to_keep=torch.arange(2, 6)).logits
        assert kept.shape[1] == 4 and torch.allclose(kept, base_model(ids).logits[:, 2:6], atol=1e-5, rtol=0)
        assert torch.allclose(base_model(ids, logits_to_keep=3).logits, base_model(ids).logits[:, -3:], atol=1e-5, rtol=0)
    for i, e in enumerate(eps):
        p, n = len(e.prompt_ids), len(e.tokens)
        want = full[i, p - 1 : p - 1 + n].gather(-1, torch.tensor(e.tokens).view(-1, 1)).squeeze(-1)
        want_ent = -(full[i, p - 1 : p - 1 + n].exp() * full[i, p - 1 : p - 1 + n]).sum(-1)
        # the same products over fewer rows: fp32 rounding of a ~100-term dot product and of log-softmax
        assert torch.allclose(logp[i, :n], want, atol=1e-5, rtol=0), (i, logp[i, :n], want)
        assert torch.allclose(ent[i, :n], want_ent, atol=1e-4, rtol=0)
        assert not logp[i, n:].any()
