"""The sparse path's promises: no T x T tensor for attention, and no indexer at all when T <= index_topk."""

import pytest
import torch
from conftest import randomize_, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from glm5 import GLM5ForCausalLM
from glm5.model.indexer import Indexer


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), func, tuple(t.shape)
        return out


@pytest.mark.slow
def test_sparse_path_never_materializes_a_t_by_t_tensor():
    T = 4096
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=16, max_position_embeddings=T))).eval()
    ids = torch.randint(0, 256, (1, T))
    with torch.no_grad():
        with LargestTensor() as sparse:
            model.set_attn_impl("sparse")(ids)
        with LargestTensor() as reference:
            model.set_attn_impl("reference")(ids)
    assert reference.numel >= T * T, "sanity: the reference path does build T x T scores"
    assert sparse.numel < T * T / 2, f"sparse path built {sparse.shape} in {sparse.op} (T = {T})"


def test_short_sequences_skip_the_indexer(monkeypatch):
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=32))).eval()

    def boom(*args, **kwargs):
        raise AssertionError("indexer ran although every token would be selected")

    monkeypatch.setattr(Indexer, "queries", boom)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 32)))  # T == index_topk
    assert all(t is None for t in out.topk_indices)
    with pytest.raises(AssertionError, match="indexer ran"):
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 33)))
