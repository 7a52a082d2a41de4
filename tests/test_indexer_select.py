"""The indexer's top-k selection (glm5.model.indexer): every path keeps the same keys for the same scores (the
model's kernel, blockwise and reference paths, the engine's cached and sync-free cached paths), the dispatcher
picks the path its table says, and the model and the engine both select through it."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

import glm5.model.indexer as indexer_module
from glm5 import GLM5ForCausalLM
from glm5.kernels import use_cpu_kernels
from glm5.model.indexer import SELECT_PATHS, causal_key_mask, index_scores, select_path, select_topk


def _keys(sel: torch.Tensor, positions: torch.Tensor) -> list[list[set[int]]]:
    """Selected positions per query, the visible ones only (`reference` may list future keys)."""
    return [[{int(i) for i in row if 0 <= i <= int(p)} for row, p in zip(batch, pos)] for batch, pos in zip(sel, positions)]


def _inputs(B, S, T, H, D, seed, integer):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: exact ties at the k-th score, which the one tie rule must settle alike
        return (torch.randint(-2, 3, (B, S, H, D), generator=g).float(), torch.randint(-3, 4, (B, S, H), generator=g).float(),
                torch.randint(-2, 3, (B, T, D), generator=g).float())
    return torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, generator=g), torch.randn(B, T, D, generator=g)


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("B,S,T,topk,first", [(1, 40, 40, 8, 0), (2, 9, 70, 16, 61), (1, 5, 5, 16, 0)])
def test_every_path_selects_the_same_keys(B, S, T, topk, first, integer):
    H, D = 4, 16
    q, w, k = _inputs(B, S, T, H, D, seed=S + T, integer=integer)
    pos = torch.arange(first, first + S).view(1, S).expand(B, S)
    visible = causal_key_mask(pos, T)  # what the engine builds from its block tables
    want = _keys(select_topk(q, w, k, topk, q_positions=pos, path="reference"), pos)
    for path in SELECT_PATHS:
        if path == "kernel" and not integer:
            continue  # the C kernel sums in another order: keys within rounding of the k-th may swap (see its docs)
        kwargs = {"visible": visible} if path.startswith("cached") else {"q_positions": pos}
        got = select_topk(q, w, k, topk, path=path, **kwargs)
        assert _keys(got, pos) == want, f"{path} selects other keys than the reference"
        assert got.shape[-1] == (min(topk, T) if path != "blockwise" and path != "kernel" else topk)
        if path != "reference":  # empty slots are -1, never an invisible key
            assert ((got < 0) | (got <= pos.unsqueeze(-1))).all()


def test_selection_can_tell_a_wrong_score():
    """The comparison above can fail: one head weight flipped changes the selection."""
    q, w, k = _inputs(1, 40, 40, 4, 16, seed=3, integer=False)
    pos = torch.arange(40).view(1, 40)
    want = _keys(select_topk(q, w, k, 8, q_positions=pos, path="blockwise"), pos)
    w2 = w.clone()
    w2[..., 0] *= -1
    assert _keys(select_topk(q, w2, k, 8, q_positions=pos, path="blockwise"), pos) != want


def test_index_scores_is_the_written_out_sum():
    q, w, k = _inputs(2, 3, 7, 4, 8, seed=1, integer=False)
    want = torch.einsum("bsh,bsht->bst", w, torch.relu(torch.einsum("bshd,btd->bsht", q, k)))
    torch.testing.assert_close(index_scores(q, w, k), want, rtol=1e-5, atol=1e-5)


def test_dispatcher_follows_the_table():
    q = torch.zeros(1, 2, 4, 16)
    visible = torch.ones(1, 2, 5, dtype=torch.bool)
    assert select_path(q) == "kernel"  # the model on a CPU (falls back to blockwise without a compiler)
    assert select_path(q, visible) == "cached"
    assert select_path(q, visible, static=True) == "cached_static"
    assert select_path(q.to("meta")) == "blockwise"  # any other device
    with pytest.raises(ValueError, match="expected one of"):
        select_topk(q, torch.zeros(1, 2, 4), torch.zeros(1, 5, 16), 2, q_positions=torch.arange(2).view(1, 2),
                    path="fastest")
    with pytest.raises(ValueError, match="needs `visible`"):
        select_topk(q, torch.zeros(1, 2, 4), torch.zeros(1, 5, 16), 2, path="cached")


def test_kernel_path_falls_back_to_blockwise_when_kernels_are_off():
    q, w, k = _inputs(1, 30, 30, 4, 16, seed=5, integer=True)
    pos = torch.arange(30).view(1, 30)
    with use_cpu_kernels(False):
        assert torch.equal(select_topk(q, w, k, 8, q_positions=pos, path="kernel"),
                           select_topk(q, w, k, 8, q_positions=pos, path="blockwise"))


def test_model_and_engine_select_through_the_dispatcher(monkeypatch):
    from glm5.engine import LLM, SamplingParams

    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=4)), std=0.05)
    seen = []
    original = indexer_module.select_path
    monkeypatch.setattr(indexer_module, "select_path", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 12)))
    assert set(seen) == {"kernel"}, seen
    for graphs, want in ((False, {"cached"}), (True, {"cached_static"})):
        seen.clear()
        LLM(model, cuda_graphs=graphs).generate([list(range(1, 12))], SamplingParams(temperature=0, max_tokens=3,
                                                                                     ignore_eos=True))
        assert set(seen) == want, f"cuda_graphs={graphs}: {sorted(set(seen))}"
