"""topk_grouped (the sparse path's top-k) = torch.topk: same values, same positions when values are distinct."""

import pytest
import torch

from glm5.model.indexer import topk_grouped


@pytest.mark.parametrize("T,n", [(100, 8), (1000, 8), (1003, 8), (4096, 64), (9000, 64), (512, 64)])
def test_same_as_torch_topk(T, n):
    g = torch.Generator().manual_seed(T)
    scores = torch.randn(2, 33, T, generator=g)
    scores[0, :5, 40:] = float("-inf")  # causal-style rows with few visible keys
    scores[1, 3] = float("-inf")
    values, idx = topk_grouped(scores, n)
    ref_values, ref_idx = scores.topk(n, dim=-1)
    assert torch.equal(values.sort(-1, descending=True).values, ref_values)
    assert torch.equal(scores.gather(-1, idx), values)
    finite = torch.isfinite(ref_values).all(-1)  # rows whose top-n is all finite: distinct values, same set
    assert torch.equal(idx.sort(-1).values[finite], ref_idx.sort(-1).values[finite])


def test_ties_keep_the_values():
    scores = torch.zeros(1, 4, 2048)
    scores[..., ::7] = 1.0  # 293 ones: the top 64 is all ones, which positions is free
    values, idx = topk_grouped(scores, 64)
    assert (values == 1).all() and (scores.gather(-1, idx) == 1).all()
    assert all(len(set(row.tolist())) == 64 for row in idx[0])  # 64 distinct positions per row
