"""bench/peer.py's explanation of a greedy difference: a near tie in a discrete choice before the logits."""

from __future__ import annotations

import os
import sys

import torch
from conftest import randomize_, tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from peer import discrete_near_ties  # noqa: E402

from glm5 import GLM5ForCausalLM  # noqa: E402
from glm5.model.moe import Router  # noqa: E402


def test_discrete_near_ties_finds_a_router_tie_made_at_one_position():
    """A router's bias moved so that at one position its k-th and (k+1)-th experts score 1e-7 apart: found there,
    as the nearest; with the bias as it was, no tie that near anywhere in the forward."""
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config())).eval()
    tokens = torch.randint(1, model.config.vocab_size, (40,)).tolist()
    router = next(m for m in model.modules() if isinstance(m, Router))
    seen = {}

    def keep_input(module, args, out):
        seen.setdefault("x", args[0].float())

    hook = router.register_forward_hook(keep_input)
    with torch.no_grad():
        model(torch.tensor([tokens]))
    hook.remove()
    assert not discrete_near_ties(model, tokens, rel=1e-6)
    position, k = 23, router.top_k
    choice = (torch.nn.functional.linear(seen["x"][position], router.weight).sigmoid()
              + router.e_score_correction_bias)
    values, experts = choice.sort(descending=True)
    with torch.no_grad():  # the (k+1)-th expert raised to 1e-7 below the k-th
        router.e_score_correction_bias[experts[k]] += (values[k - 1] - values[k]) - 1e-7
    ties = discrete_near_ties(model, tokens, rel=1e-6)
    assert ties and ties[0]["choice"] == "router" and ties[0]["layer"] == 0 and ties[0]["position"] == position
    assert 0 < ties[0]["gap"] < 1e-6


def test_discrete_near_ties_reads_every_router_and_indexer_choice():
    """With any gap counted as near, the choices found are each router's rows and each indexer call's query rows
    that have more visible keys than index_topk, at their own positions."""
    torch.manual_seed(1)
    cfg = tiny_config(index_topk=8)
    model = randomize_(GLM5ForCausalLM(cfg)).eval()
    tokens = torch.randint(1, cfg.vocab_size, (30,)).tolist()
    found = discrete_near_ties(model, tokens, rel=1.0, limit=10_000)
    routers = {(f["layer"], f["position"]) for f in found if f["choice"] == "router"}
    indexer = {(f["layer"], f["position"]) for f in found if f["choice"] == "indexer"}
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    # every row but exact ties (none among sigmoid scores of random weights)
    assert routers == {(r, p) for r in range(moe_layers) for p in range(30)}
    assert indexer and {p for _, p in indexer} <= set(range(cfg.index_topk, 30))
    assert all(f["gap"] > 0 and f["relative"] <= 1.0 for f in found)
