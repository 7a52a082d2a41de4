"""What makes transformers' GlmMoeDsaForCausalLM comparable with glm5 in a benchmark's correctness check.

    from peer import lowest_position_topk
    with lowest_position_topk():          # untimed: transformers' DSA top-k under glm5's tie rule
        reference = twin(ids).logits
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def lowest_position_topk():
    """Within the block, Tensor.topk keeps the lowest positions among exact ties (a stable descending sort), the
    rule glm5 applies in every path. DSA's indexer scores tie exactly and often at random init (a key whose every
    head's ReLU term is 0 scores exactly 0; with tiny-bench's 4 indexer heads that is 1 key in 16), and stock
    torch.topk keeps an arbitrary subset of such ties, so transformers' outputs can only be compared with glm5's
    under the same rule. Slower than torch.topk: for checks, never inside a timed region."""
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original


@contextlib.contextmanager
def shared_selection(impl: str, path: str):
    """glm5 ("glm5"): save every DSA selection of the forward (each `select_topk` call, in layer order) to `path`.
    transformers: each GlmMoeDsaIndexer still computes its own top-k, which is compared with glm5's saved one
    (rows whose key sets differ, and the largest score gap between a key only one side chose and the row's k-th
    score, relative), then glm5's is returned, so the two forwards attend to the same keys. Yields a dict filled
    with {"rows", "rows_differing", "max_relative_gap"} (transformers) when the block exits."""
    report = {"rows": 0, "rows_differing": 0, "max_relative_gap": 0.0}
    if impl == "glm5":
        import glm5.model.mla as mla

        original, saved = mla.select_topk, []

        def recording(*args, **kwargs):
            out = original(*args, **kwargs)
            saved.append(out.detach().cpu())
            return out

        mla.select_topk = recording
        try:
            yield report
        finally:
            mla.select_topk = original
        torch.save(saved, path)
        report["rows"] = sum(t.shape[0] * t.shape[1] for t in saved)
        return
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf

    theirs = torch.load(path)
    original, calls = hf.GlmMoeDsaIndexer.forward, [0]

    def replaced(self, *args, **kwargs):
        captured, current = {}, torch.Tensor.topk

        def capture(scores, k, dim=-1, largest=True, sorted=True):  # the masked scores its top-k ranks
            captured["scores"] = scores
            return current(scores, k, dim=dim, largest=largest, sorted=sorted)

        torch.Tensor.topk = capture
        try:
            own = original(self, *args, **kwargs).long()
        finally:
            torch.Tensor.topk = current
        ours = theirs[calls[0]].to(own.device)
        calls[0] += 1
        S = own.shape[1]
        queries = torch.arange(S, device=own.device).view(1, S, 1)
        # glm5 marks empty slots (a query with fewer than k visible keys) -1: the query's own position instead,
        # already selected (transformers fills them with masked future keys; causality drops either)
        ours = torch.where(ours < 0, queries.expand_as(ours), ours)
        visible = torch.arange(S, device=own.device).view(1, 1, S) <= queries
        chosen_own = torch.zeros(own.shape[0], S, S, dtype=torch.bool, device=own.device).scatter_(-1, own, True) & visible
        chosen_ours = torch.zeros_like(chosen_own).scatter_(-1, ours, True) & visible
        differ = (chosen_own != chosen_ours).any(-1)
        report["rows"] += differ.numel()
        report["rows_differing"] += int(differ.sum())
        if differ.any():
            scores = captured["scores"]
            kth = scores.gather(-1, own).min(-1).values  # each row's k-th score
            swapped = (chosen_own ^ chosen_ours) & differ.unsqueeze(-1)
            gap = ((scores - kth.unsqueeze(-1)).abs() / kth.abs().clamp_min(1e-30).unsqueeze(-1))[swapped]
            report["max_relative_gap"] = max(report["max_relative_gap"], float(gap.max()))
        return ours.to(torch.int32)

    hf.GlmMoeDsaIndexer.forward = replaced
    try:
        yield report
    finally:
        hf.GlmMoeDsaIndexer.forward = original



@torch.no_grad()
def discrete_near_ties(model, tokens: list[int], rel: float = 1e-5, limit: int = 3) -> list[dict]:
    """The discrete choices of glm5's reference forward over `tokens` (fp32, the PyTorch paths) that sums in
    another order may make the other way: each MoE router's top-k experts and each DSA indexer's top-k keys
    whose k-th and (k+1)-th scores are closer than `rel` of the row's largest |score| (exact ties are left out:
    every path breaks them by the same lowest-position rule). A fp32 difference there changes which experts or
    keys a token uses, so the logits after it differ by far more than rounding. -> up to `limit` of the nearest,
    nearest first: {"choice": "router" or "indexer", "layer": the router's number or the indexer call's,
    "position", "gap", "relative"}."""
    import glm5.model.mla as mla
    from glm5.kernels import use_cpu_kernels
    from glm5.model.indexer import causal_key_mask, index_scores
    from glm5.model.moe import Router

    found = []

    def margins(choice: str, layer: int, scores: torch.Tensor, k: int, positions) -> None:
        if scores.shape[-1] <= k:
            return
        top = scores.float().topk(k + 1, dim=-1).values  # [rows, k + 1]
        gap = top[:, k - 1] - top[:, k]
        scale = scores.float().abs().masked_fill(~torch.isfinite(scores), 0).amax(-1).clamp(min=1e-30)
        near = torch.isfinite(top[:, k]) & (gap > 0) & (gap <= rel * scale)
        for row in near.nonzero().flatten().tolist():
            found.append({"choice": choice, "layer": layer, "position": int(positions[row]),
                          "gap": float(gap[row]), "relative": float(gap[row] / scale[row])})

    routers = {id(m): i for i, m in enumerate(m for m in model.modules() if isinstance(m, Router))}

    def router_hook(module, args, output):
        x = args[0].float()
        choice = torch.nn.functional.linear(x, module.weight.float()).sigmoid() + module.e_score_correction_bias
        if module.n_group <= 1:  # (grouped routing: the group cut comes first; not measured here)
            margins("router", routers[id(module)], choice, module.top_k, range(x.shape[0]))

    calls = [0]
    original = mla.select_topk

    def indexer(q, w, k, topk, *, q_positions=None, key_mask=None, **kwargs):
        scores = index_scores(q, w, k)  # [B, S, T]
        visible = causal_key_mask(q_positions, k.shape[1], key_mask).expand_as(scores)
        masked = scores.masked_fill(~visible, float("-inf"))
        margins("indexer", calls[0], masked.reshape(-1, masked.shape[-1]), topk, q_positions.reshape(-1).tolist())
        calls[0] += 1
        return original(q, w, k, topk, q_positions=q_positions, key_mask=key_mask, **kwargs)

    hooks = [m.register_forward_hook(router_hook) for m in model.modules() if isinstance(m, Router)]
    mla.select_topk = indexer
    try:
        with use_cpu_kernels(False):
            model(torch.tensor([list(tokens)]))
    finally:
        mla.select_topk = original
        for h in hooks:
            h.remove()
    return sorted(found, key=lambda f: f["relative"])[:limit]
