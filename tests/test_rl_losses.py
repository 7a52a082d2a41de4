"""RL losses against values worked out by hand (glm5/rl/losses.py)."""

import math

import pytest
import torch

from glm5.rl.losses import (
    LossConfig,
    group_advantages,
    icepop_mask,
    kl_penalty,
    mismatch_kl,
    policy_loss,
    tis_weight,
    token_entropy,
)

LOG = math.log


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_grpo_advantages_with_and_without_std_normalization():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.70711
    torch.testing.assert_close(group_advantages(rewards, 2, "grpo"), t(0.70711, -0.70711, -0.70711, 0.70711),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, 2, "grpo", std_normalization=False), t(0.5, -0.5, -0.5, 0.5))
    # a group whose rewards are all equal has zero advantage, not a division by zero
    assert group_advantages(torch.tensor([3.0, 3.0]), 2).abs().max() == 0


def test_reinforce_plus_plus_baseline_advantages_normalized_over_the_batch():
    # centered by group: [0.5, -0.5, 0, 0]; batch mean 0, unbiased std sqrt(0.5 / 3) = 0.40825
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, "reinforce++")
    torch.testing.assert_close(got, t(1.22474, -1.22474, 0.0, 0.0), atol=1e-4, rtol=0)


def test_kl_estimators():
    logp, ref = t([LOG(0.5)]), t([LOG(0.25)])
    d = LOG(0.5)  # ref - logp
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-d, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - d - 1, abs=1e-6)  # 0.19315
    # low_var_kl is k3 clamped at 10
    assert kl_penalty(t([0.0]), t([20.0]), "low_var_kl").item() == 10.0
    assert kl_penalty(t([0.0]), t([20.0]), "k3").item() > 1e8


def test_tis_weight_caps_and_icepop_masks():
    old, rollout = t([LOG(0.5), LOG(0.5), LOG(0.5)]), t([LOG(0.2), LOG(0.4), LOG(0.9)])
    # ratios 2.5, 1.25, 0.5556
    torch.testing.assert_close(tis_weight(old, rollout, 2.0), t([2.0, 1.25, 0.55556]), atol=1e-4, rtol=0)
    torch.testing.assert_close(icepop_mask(old, rollout, 0.5, 2.0), t([0.0, 1.0, 1.0]))
    torch.testing.assert_close(icepop_mask(old, rollout, 0.6, 2.0), t([0.0, 1.0, 0.0]))


def test_mismatch_kl_is_zero_for_equal_logprobs_and_k3_otherwise():
    mask = t([1.0, 1.0])
    assert mismatch_kl(t([-1.0, -2.0]), t([-1.0, -2.0]), mask) == 0.0
    # trainer 0.5 vs engine 0.25: r = 2 -> 2 - 1 - log 2; second token masked out
    got = mismatch_kl(t([LOG(0.5), 0.0]), t([LOG(0.25), -5.0]), t([1.0, 0.0]))
    assert got == pytest.approx(1 - LOG(2), abs=1e-6)


def _one_token(logp_value, old_value, adv, config, rollout_value=None):
    logp = torch.tensor([[logp_value]], requires_grad=True)
    rollout = torch.tensor([[old_value if rollout_value is None else rollout_value]])
    out = policy_loss(logp, torch.tensor([[old_value]]), rollout, torch.tensor([adv]), torch.ones(1, 1), config)
    out.loss.backward()
    return out, float(logp.grad)


def test_grpo_clipped_surrogate():
    cfg = LossConfig(algo="grpo", mismatch="none")
    # ratio 1.2 inside [0.8, 1.28]: loss -r A, d/dlogp = -r A
    out, grad = _one_token(LOG(0.6), LOG(0.5), 1.0, cfg)
    assert out.loss.item() == pytest.approx(-1.2, abs=1e-5) and grad == pytest.approx(-1.2, abs=1e-5)
    # ratio 1.5 with A > 0: clipped at 1.28, no gradient
    out, grad = _one_token(LOG(0.75), LOG(0.5), 1.0, cfg)
    assert out.loss.item() == pytest.approx(-1.28, abs=1e-5) and grad == 0.0
    assert out.metrics["clip_frac"] == 1.0
    # ratio 1.5 with A < 0: min picks the unclipped -1.5 * -1 ... loss 1.5, gradient 1.5
    out, grad = _one_token(LOG(0.75), LOG(0.5), -1.0, cfg)
    assert out.loss.item() == pytest.approx(1.5, abs=1e-5) and grad == pytest.approx(1.5, abs=1e-5)


def test_token_mean_over_the_batch_and_mask():
    cfg = LossConfig(algo="grpo", mismatch="none")
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = t([1, 1, 0], [1, 0, 0])
    out = policy_loss(logp, logp.detach(), logp.detach(), t(1.0, -2.0), mask, cfg)
    # ratio 1 everywhere: per token -A: (-1 -1 + 2) / 3 trained tokens
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, t([-1 / 3, -1 / 3, 0], [2 / 3, 0, 0]))


def test_tis_scales_the_token_loss_and_icepop_drops_it():
    # trainer ratio 1 (one update per batch); engine gave 0.2 where the trainer says 0.5: weight min(2.5, 2) = 2
    out, grad = _one_token(LOG(0.5), LOG(0.5), 1.0, LossConfig(mismatch="tis", tis_cap=2.0), rollout_value=LOG(0.2))
    assert out.loss.item() == pytest.approx(-2.0, abs=1e-5) and grad == pytest.approx(-2.0, abs=1e-5)
    assert out.metrics["tis_clip_frac"] == 1.0
    out, grad = _one_token(LOG(0.5), LOG(0.5), 1.0, LossConfig(mismatch="icepop"), rollout_value=LOG(0.2))
    assert out.loss.item() == 0.0 and grad == 0.0 and out.metrics["icepop_masked_frac"] == 1.0
    out, grad = _one_token(LOG(0.5), LOG(0.5), 1.0, LossConfig(mismatch="icepop"), rollout_value=LOG(0.4))
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-5)


def test_gspo_sequence_ratio():
    cfg = LossConfig(algo="gspo", mismatch="none")
    old = torch.zeros(1, 2)
    # log ratios 0.1, 0.3 -> sequence ratio exp(0.2) = 1.2214; A = -1: unclipped branch, loss 1.2214
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    out = policy_loss(logp, old, old, t(-1.0), torch.ones(1, 2), cfg)
    assert out.loss.item() == pytest.approx(math.exp(0.2), abs=1e-5)
    out.loss.backward()
    # d/dlogp_t of s_i * |A| averaged over the sequence: s_i / 2 per token
    torch.testing.assert_close(logp.grad, torch.full((1, 2), math.exp(0.2) / 2))
    # A = +1: clipped at 1 + 4e-4, no gradient
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    out = policy_loss(logp, old, old, t(1.0), torch.ones(1, 2), cfg)
    assert out.loss.item() == pytest.approx(-(1 + 4e-4), abs=1e-6)
    out.loss.backward()
    assert logp.grad.abs().max() == 0


def test_cispo_keeps_a_gradient_on_clipped_tokens():
    # ratio 1.5 > 1.28: weight capped at 1.28 and detached; loss -1.28 * A * logp, gradient -1.28 A
    out, grad = _one_token(LOG(0.75), LOG(0.5), 1.0, LossConfig(algo="cispo", mismatch="none"))
    assert out.loss.item() == pytest.approx(-1.28 * LOG(0.75), abs=1e-5)
    assert grad == pytest.approx(-1.28, abs=1e-5)
    # unclipped ratio 1.2: still a detached weight, the gradient is -1.2 A (not -(1.2 + 1.2 logp) A)
    out, grad = _one_token(LOG(0.6), LOG(0.5), 1.0, LossConfig(algo="cispo", mismatch="none"))
    assert grad == pytest.approx(-1.2, abs=1e-5)


def test_kl_and_entropy_terms_enter_the_loss():
    logits = torch.zeros(1, 1, 4)  # uniform over 4: entropy log 4
    entropy = token_entropy(logits)
    assert entropy.item() == pytest.approx(LOG(4), abs=1e-6)
    logp = torch.tensor([[LOG(0.5)]], requires_grad=True)
    cfg = LossConfig(mismatch="none", kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    out = policy_loss(logp, logp.detach(), logp.detach(), t(0.0), torch.ones(1, 1), cfg,
                      ref_logp=torch.tensor([[LOG(0.25)]]), entropy=entropy)
    # pg 0 (A = 0) + 0.1 * k3 (0.19315) - 0.01 * log 4
    assert out.loss.item() == pytest.approx(0.1 * (0.5 - LOG(0.5) - 1) - 0.01 * LOG(4), abs=1e-6)
    assert out.metrics["kl"] == pytest.approx(0.5 - LOG(0.5) - 1, abs=1e-6)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="algo"):
        LossConfig(algo="ppo2").validate()
    with pytest.raises(ValueError, match="IcePop"):
        LossConfig(icepop_low=1.5).validate()
