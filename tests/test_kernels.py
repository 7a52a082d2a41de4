"""The CPU kernels of glm5.kernels against their PyTorch fallbacks (which the rest of the suite also tests), on
every instruction-set path this CPU can execute (`isa`: avx512, avx2, neon, portable, forced with GLM5_CPU_ISA).

The indexer kernel must select exactly the keys the PyTorch path selects. With small integer queries, keys and
head weights (and a power-of-two head dim, so the 1/sqrt(D) scale is exact) every score is exact in fp32 in
any summation order, so the two must agree key for key, exact ties included (there are many).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import randomize_, tiny_config

from glm5.kernels import build, cpu_kernels_enabled, indexer_topk, latent_attention, load_library, use_cpu_kernels
from glm5.model.indexer import Indexer, lowest_position_ties, select_topk

if load_library("indexer_topk") is None:  # no C compiler here: the fallback is all there is to test
    pytest.skip("the CPU kernels cannot be built on this machine", allow_module_level=True)

ISAS = build.available_isas()  # e.g. ["avx512", "avx2", "portable"] on an AVX-512 x86 CPU
VECTOR_FLOATS = {"avx512": 16, "avx2": 8, "neon": 4, "portable": 4}


@pytest.fixture(autouse=True)
def _kernels_unchecked(monkeypatch):
    """The kernels run wherever they can (no timing check): these tests test the kernels themselves."""
    monkeypatch.setenv("GLM5_KERNEL_CHECK", "0")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each instruction-set path this CPU can execute, forced (the library reports the one it was built for)."""
    monkeypatch.setenv(build.ISA_ENV, request.param)
    for name in ("indexer_topk", "sparse_attention", "elementwise", "linear"):
        lib = load_library(name)
        assert build.library_isa(lib) == (request.param, VECTOR_FLOATS[request.param]), name
    return request.param


def _indexer(heads: int, dim: int, topk: int) -> Indexer:
    return Indexer(tiny_config(index_n_heads=heads, index_head_dim=dim, index_topk=topk,
                               qk_rope_head_dim=min(16, dim)))


def _select(indexer: Indexer, q, w, k, pos, key_mask=None, path=None) -> torch.Tensor:
    """The model's selection (glm5.model.indexer.select_topk): the kernel on a CPU when it is on, else blockwise."""
    return select_topk(q, w * indexer.softmax_scale, k, indexer.index_topk, q_positions=pos, key_mask=key_mask, path=path)


def _rows(sel: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(i) for i in row if i >= 0} for row in batch] for batch in sel]


def _integer_inputs(B, S, T, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, S, H, D), generator=g).float()
    w = torch.randint(-3, 4, (B, S, H), generator=g).float()
    k = torch.randint(-2, 3, (B, T, D), generator=g).float()
    return q, w, k


CASES = [  # B, S (queries), T (keys), H, D, topk, first query position
    (1, 300, 300, 4, 64, 16, 0),       # long rows: the group-maxima bound
    (1, 200, 200, 5, 16, 64, 0),       # heads not a multiple of 4; rows shorter and longer than 2 topk
    (2, 130, 130, 8, 16, 8, 0),        # batch of two
    (1, 40, 300, 4, 16, 32, 260),      # a chunk of queries at the end of a longer context
    (1, 50, 50, 4, 64, 64, 0),         # topk above every row's length: all visible keys, -1 after
    (1, 1100, 1100, 4, 16, 64, 0),     # rows past 4 * (4 topk): the vectorized scans' full 64-key tiles
]


@pytest.mark.parametrize("B,S,T,H,D,topk,first", CASES)
def test_indexer_kernel_selects_exactly_the_pytorch_keys(B, S, T, H, D, topk, first, isa):
    indexer = _indexer(H, D, topk)
    q, w, k = _integer_inputs(B, S, T, H, D, seed=S + T)
    pos = torch.arange(first, first + S).view(1, S).expand(B, S)
    with use_cpu_kernels(False):
        want = _select(indexer, q, w, k, pos)
    got = indexer_topk(q, w * indexer.softmax_scale, k, pos, topk)
    assert got is not None and got.shape == (B, S, topk) and got.dtype == torch.int64
    assert _rows(got) == _rows(want)
    for b in range(B):
        for i in range(S):
            visible = min(topk, first + i + 1)
            assert (got[b, i] >= 0).sum() == visible and (got[b, i] <= first + i).all()
    # and through the public entry point (kernels on), the same
    assert _rows(_select(indexer, q, w, k, pos)) == _rows(want)


def test_indexer_kernel_with_a_padding_mask_and_per_row_positions(isa):
    B, T, H, D, topk = 3, 150, 4, 16, 24
    indexer = _indexer(H, D, topk)
    q, w, k = _integer_inputs(B, T, T, H, D, seed=7)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :40] = 0  # left padding
    mask[2, torch.randperm(T, generator=torch.Generator().manual_seed(1))[:60]] = 0
    pos = torch.arange(T).expand(B, T)
    with use_cpu_kernels(False):
        want = _select(indexer, q, w, k, pos, key_mask=mask)
    got = indexer_topk(q, w * indexer.softmax_scale, k, pos, topk, key_mask=mask)
    assert _rows(got) == _rows(want)
    assert all(mask[b, i] for b, batch in enumerate(_rows(got)) for row in batch for i in row)


def test_indexer_kernel_on_real_valued_scores_is_a_valid_top_k(isa):
    """Normal inputs, head dim 24 (no exact scale): each selected set is a top-k of the fp64 scores, up to
    rounding at the boundary."""
    S, H, D, topk = 700, 6, 24, 40
    g = torch.Generator().manual_seed(0)
    q, w, k = torch.randn(1, S, H, D, generator=g), torch.randn(1, S, H, generator=g), torch.randn(1, S, D, generator=g)
    got = indexer_topk(q, w, k, torch.arange(S).view(1, S), topk)[0]
    exact = (torch.einsum("shd,td->sht", q[0].double(), k[0].double()).relu() * w[0].double().unsqueeze(-1)).sum(1)
    for i in range(S):
        n = min(topk, i + 1)
        chosen = got[i][got[i] >= 0]
        assert len(chosen) == n and len(set(chosen.tolist())) == n and (chosen <= i).all()
        kth = exact[i, : i + 1].topk(n).values[-1]
        assert exact[i, chosen].min() >= kth - 1e-9 * max(1.0, abs(kth.item()))


def _attention_inputs(N, H, D, T, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, D, generator=g)
    kv = torch.randn(T, D, generator=g)
    rows = torch.randint(0, T, (N, K), generator=g)  # duplicates included, as a cache's rows may repeat
    rows[torch.rand(N, K, generator=g) < 0.2] = -1
    rows[3] = -1  # a query with nothing to attend to
    return q, kv, rows


def _attention_fp64(q, kv, rows, scale, L):
    gathered = kv.double()[rows.clamp(min=0)]  # [N, K, D]
    scores = torch.einsum("nhd,nkd->nhk", q.double(), gathered) * scale
    scores = scores.masked_fill((rows < 0).unsqueeze(1), float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return torch.einsum("nhk,nkl->nhl", probs, gathered[..., :L])


@pytest.mark.parametrize("N,H,D,T,K,L", [(200, 4, 80, 300, 64, 64), (150, 5, 40, 90, 37, 33), (64, 1, 16, 20, 1, 16)])
def test_latent_attention_kernel_matches_fp64_and_the_pytorch_path(N, H, D, T, K, L, isa):
    from glm5.model.dsa import sparse_latent_attention

    q, kv, rows = _attention_inputs(N, H, D, T, K)
    got = latent_attention(q, kv, rows, 0.3, L)
    assert got.shape == (N, H, L) and got.dtype == torch.float32
    assert (got.double() - _attention_fp64(q, kv, rows, 0.3, L)).abs().max() < 1e-5
    assert got[3].abs().max() == 0  # no valid row: zeros, as the PyTorch path's nan_to_num gives
    # the model's entry point: the same rows as [1, N, K] positions into one sequence, every query at the end
    positions = torch.full((1, N), T - 1)
    with use_cpu_kernels(False):
        want = sparse_latent_attention(q[None], kv[None], rows[None], positions, 0.3, L)
    fast = sparse_latent_attention(q[None], kv[None], rows[None], positions, 0.3, L)
    assert (fast - want).abs().max() < 1e-5
    # positions after a query's own are not attended (causality), by either path
    early = torch.arange(N).view(1, N) % T
    with use_cpu_kernels(False):
        want = sparse_latent_attention(q[None], kv[None], rows[None], early, 0.3, L)
    assert (sparse_latent_attention(q[None], kv[None], rows[None], early, 0.3, L) - want).abs().max() < 1e-5


@pytest.mark.parametrize("batch,threads", [(3, 2), (1, 2), (4, 1)])
def test_latent_attention_kernel_backward_matches_fp64_and_the_pytorch_path(batch, threads, isa):
    """dq and dkv from the C backward: rows shared between queries (and, with one sequence and two threads,
    between threads: each adds into its own copy) accumulate like PyTorch's gather backward."""
    from glm5.model.dsa import sparse_latent_attention

    S, H, D, L, K = 40, 5, 40, 33, 12
    g = torch.Generator().manual_seed(batch)
    q = torch.randn(batch, S, H, D, generator=g, dtype=torch.float64)
    kv = torch.randn(batch, S, D, generator=g, dtype=torch.float64)
    idx = torch.randint(0, S, (batch, S, K), generator=g)
    idx[torch.rand(batch, S, K, generator=g) < 0.2] = -1
    pos = torch.arange(S).expand(batch, S)
    grad_out = torch.randn(batch, S, H, L, generator=g, dtype=torch.float64)
    results = {}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, kernels, dtype in [("kernel", True, torch.float32), ("pytorch", False, torch.float32),
                                     ("fp64", False, torch.float64)]:
            qq, kk = q.to(dtype).requires_grad_(), kv.to(dtype).requires_grad_()
            with use_cpu_kernels(kernels):
                out = sparse_latent_attention(qq, kk, idx, pos, 0.2, L)
            below_view = type(out.grad_fn.next_functions[0][0]).__name__  # out is a view of the [B*S, H, L] result
            assert ("LatentAttention" in below_view) == kernels, below_view
            out.backward(grad_out.to(dtype))
            results[name] = [t.double() for t in (out.detach(), qq.grad, kk.grad)]
    finally:
        torch.set_num_threads(old_threads)
    for got, pytorch, exact in zip(results["kernel"], results["pytorch"], results["fp64"]):
        assert (got - exact).abs().max() < 1e-5
        assert (got - pytorch).abs().max() < 1e-5


def test_latent_attention_kernel_declines_what_it_does_not_do():
    q, kv, rows = _attention_inputs(10, 2, 16, 12, 4)
    assert latent_attention(q, kv, rows, 1.0, 8).grad_fn is None
    assert latent_attention(q.requires_grad_(), kv, rows, 1.0, 8).grad_fn is not None  # its own backward
    assert latent_attention(q.detach().bfloat16(), kv.bfloat16(), rows, 1.0, 8) is None
    with use_cpu_kernels(False):
        assert latent_attention(q.detach(), kv, rows, 1.0, 8) is None
    with pytest.raises(ValueError, match="latent_dim"):
        latent_attention(q.detach(), kv, rows, 1.0, 17)


def test_model_sparse_path_agrees_with_kernel_and_fallback_and_reference():
    from glm5 import GLM5ForCausalLM

    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=12))).eval()
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model.set_attn_impl("sparse")(ids).logits
        with use_cpu_kernels(False):
            slow = model(ids).logits
        ref = model.set_attn_impl("reference")(ids).logits
    assert (fast - slow).abs().max() < 1e-5
    assert (fast - ref).abs().max() < 1e-5


def test_exact_ties_keep_the_lowest_positions_in_every_path():
    # a query whose head weights are all negative: every key with all dot products <= 0 scores exactly 0, the
    # highest possible score; 10 keys tie for 4 slots
    H, D, topk, T = 4, 16, 4, 12
    indexer = _indexer(H, D, topk)
    q = torch.ones(1, T, H, D)
    w = -torch.ones(1, T, H)
    k = -torch.ones(1, T, D)
    k[0, [3, 7]] = 1.0  # these two score negative
    pos = torch.arange(T).view(1, T)
    last = T - 1
    expected = {0, 1, 2, 4}
    with use_cpu_kernels(False):
        assert _rows(_select(indexer, q, w, k, pos))[0][last] == expected
    assert _rows(_select(indexer, q, w, k, pos, path="reference"))[0][last] == expected
    assert _rows(indexer_topk(q, w * indexer.softmax_scale, k, pos, topk))[0][last] == expected
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    values, idx = torch.tensor([[5.0, 1.0, 1.0]]), torch.tensor([[0, 5, 3]])
    assert lowest_position_ties(scores, values, idx).tolist() == [[0, 1, 2]]


def test_switch_off_and_unbuildable_kernels_fall_back(monkeypatch, tmp_path):
    indexer = _indexer(4, 16, 8)
    q, w, k = _integer_inputs(1, 40, 40, 4, 16, seed=3)
    pos = torch.arange(40).view(1, 40)
    with use_cpu_kernels(False):
        want = _rows(_select(indexer, q, w, k, pos))
        assert not cpu_kernels_enabled() and indexer_topk(q, w, k, pos, 8) is None
    monkeypatch.setenv("GLM5_CPU_KERNELS", "0")
    assert load_library("indexer_topk") is None
    monkeypatch.setenv("GLM5_CPU_KERNELS", "1")
    # a compiler that fails: a warning, no library, and the PyTorch path gives the same keys
    monkeypatch.setenv("GLM5_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(build, "_load", build._load.__wrapped__)  # no result cached from earlier tests
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_library("indexer_topk") is None
    assert any("could not build indexer_topk" in str(c.message) for c in caught)
    with pytest.warns(UserWarning, match="could not build indexer_topk .*exit status 1"):
        assert _rows(_select(indexer, q, w, k, pos)) == want


def test_built_library_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("GLM5_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_load", build._load.__wrapped__)
    assert load_library("indexer_topk") is not None
    built = list((tmp_path / "kernels").glob("indexer_topk-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert load_library("indexer_topk") is not None  # a second load reuses the file
    assert built[0].stat().st_mtime_ns == stamp and not list((tmp_path / "kernels").glob("*.tmp"))


def test_isa_paths_give_the_same_results_as_the_best_one(monkeypatch):
    """Every path this CPU can run selects the same keys and computes the same attention (to fp32 rounding) as
    the best one, forward and backward; each library reports the ISA and vector width it was built for."""
    indexer = _indexer(5, 16, 24)
    q, w, k = _integer_inputs(2, 400, 400, 5, 16, seed=11)
    pos = torch.arange(400).view(1, 400).expand(2, 400)
    aq, akv, arows = _attention_inputs(N=300, H=5, D=40, T=500, K=37)
    results = {}
    for isa in ISAS:
        monkeypatch.setenv(build.ISA_ENV, isa)
        assert build.selected_isa()[0] == isa
        assert build.library_isa(load_library("sparse_attention")) == (isa, VECTOR_FLOATS[isa])
        qq, kk = aq.clone().requires_grad_(), akv.clone().requires_grad_()
        out = latent_attention(qq, kk, arows, 0.125, 32)
        out.square().sum().backward()
        results[isa] = (_rows(indexer_topk(q, w * indexer.softmax_scale, k, pos, 24)), out.detach(), qq.grad, kk.grad)
    best = results[ISAS[0]]
    for isa, got in results.items():
        assert got[0] == best[0], isa
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(got[1:], best[1:])), isa


def test_isa_detection_from_cpu_flags(monkeypatch):
    """The path follows the flags the CPU reports; GLM5_CPU_ISA forces one it can run, refuses to run one it
    cannot (a warning, the best path instead) and rejects an unknown name with a one-line error."""
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    for flags, want in [("fpu sse2 avx avx2 fma f16c", ["avx2", "portable"]),
                        ("sse2 avx2 fma avx512f avx512bw avx512vl avx512dq", ["avx512", "avx2", "portable"]),
                        ("sse2 avx2 avx512f", ["portable"]),  # AVX2 without FMA: no fused multiply-add path
                        ("sse2 sse4_2", ["portable"])]:
        monkeypatch.setattr(build, "cpu_features", lambda flags=flags: frozenset(flags.split()))
        assert build.available_isas() == want, flags
    monkeypatch.setattr(build, "cpu_features", lambda: frozenset("sse2 avx2 fma".split()))
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    assert build.selected_isa() == ("avx2", "the CPU reports avx2, fma")
    monkeypatch.setenv(build.ISA_ENV, "portable")
    assert build.selected_isa()[0] == "portable"
    monkeypatch.setenv(build.ISA_ENV, "avx512")
    with pytest.warns(UserWarning, match="cannot execute it; using avx2"):
        assert build.selected_isa()[0] == "avx2"
    monkeypatch.setenv(build.ISA_ENV, "avx3")
    with pytest.raises(ValueError, match="GLM5_CPU_ISA='avx3': expected one of avx512, avx2, neon, portable"):
        build.selected_isa()
    monkeypatch.setattr(build.platform, "machine", lambda: "arm64")
    monkeypatch.delenv(build.ISA_ENV)
    assert build.available_isas() == ["neon", "portable"] and build.selected_isa()[0] == "neon"


def test_startup_check_runs_the_faster_path_and_remembers_it(monkeypatch, tmp_path):
    """kernel_or_fallback: the first call of a shape class times both and keeps the faster (written to the cache
    directory); later calls, and a fresh process reading the file, run only that one. A kernel that cannot run
    (None) records nothing."""
    import time

    from glm5.kernels import check

    monkeypatch.setenv("GLM5_KERNEL_CHECK", "1")
    monkeypatch.setenv("GLM5_CACHE", str(tmp_path))
    monkeypatch.setattr(check, "_decisions", {})
    monkeypatch.setattr(check, "_loaded", set())
    calls = []

    def slow_kernel():
        calls.append("kernel")
        time.sleep(0.06)
        return "kernel"

    def quick_fallback():
        calls.append("fallback")
        return "fallback"

    # measured: the kernel once untimed (it may be compiling), then fallback and kernel alternated
    assert check.kernel_or_fallback("demo", (64, 8), slow_kernel, quick_fallback) == "kernel"
    assert calls == ["kernel", "fallback", "kernel"]
    assert [check.kernel_or_fallback("demo", (64, 8), slow_kernel, quick_fallback) for _ in range(3)] == ["fallback"] * 3
    assert calls == ["kernel", "fallback", "kernel"] + ["fallback"] * 3
    entry = check.decisions()["demo|64|8"]
    assert entry["kernel"] is False and entry["kernel_ms"] > entry["fallback_ms"]
    # a fast kernel in another shape class wins there; short calls are timed twice each, alternated
    calls.clear()
    assert check.kernel_or_fallback("demo", (128, 8), lambda: calls.append("k") or "kernel",
                                    lambda: (calls.append("f"), time.sleep(0.01))[0] or "fallback") == "kernel"
    assert calls == ["k", "f", "k", "f", "k"] and check.decisions()["demo|128|8"]["kernel"] is True
    # a fresh process: the file is read, nothing is timed again
    monkeypatch.setattr(check, "_decisions", {})
    monkeypatch.setattr(check, "_loaded", set())
    calls.clear()
    assert check.kernel_or_fallback("demo", (64, 8), slow_kernel, quick_fallback) == "fallback"
    assert calls == ["fallback"]
    # a kernel that cannot run: the fallback, no decision
    assert check.kernel_or_fallback("demo", (256, 8), lambda: None, quick_fallback) == "fallback"
    assert "demo|256|8" not in check.decisions()
    # the check switched off: the kernel runs wherever it can
    monkeypatch.setenv("GLM5_KERNEL_CHECK", "0")
    assert check.kernel_or_fallback("demo", (64, 8), slow_kernel, quick_fallback) == "kernel"
    with use_cpu_kernels(False):
        assert check.kernel_or_fallback("demo", (1, 1), slow_kernel, quick_fallback) == "fallback"


def test_model_forward_through_the_startup_check_matches_the_fallback(monkeypatch, tmp_path):
    """With the check on, the model's forward (which measures every kernel on first use) gives the logits of the
    PyTorch path, and its decisions are recorded for the indexer, the attention and RMSNorm."""
    from glm5 import GLM5ForCausalLM
    from glm5.kernels import check

    monkeypatch.setenv("GLM5_KERNEL_CHECK", "1")
    monkeypatch.setenv("GLM5_CACHE", str(tmp_path))
    monkeypatch.setattr(check, "_decisions", {})
    monkeypatch.setattr(check, "_loaded", set())
    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=12))).eval()
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        checked = model(ids).logits
        again = model(ids).logits  # the decisions now known: one path each
        with use_cpu_kernels(False):
            slow = model(ids).logits
    assert (checked - slow).abs().max() < 1e-5 and (again - slow).abs().max() < 1e-5
    kinds = {key.split("|")[0] for key in check.decisions()}
    assert {"indexer_topk", "latent_attention", "rms_norm"} <= kinds, kinds


def _rms_reference(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(8, 64, 256), (3, 7, 40), (1, 1, 16), (2, 300, 80)])
def test_rms_norm_kernel_forward_and_backward(shape, isa):
    """Against fp64 and the PyTorch fp32 path: value, dx and dw (a sum over every row) to rounding."""
    from glm5.kernels import rms_norm

    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    results = {}
    for name, dtype in [("kernel", torch.float32), ("pytorch", torch.float32), ("fp64", torch.float64)]:
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        y = rms_norm(xx, ww, 1e-6) if name == "kernel" else _rms_reference(xx, ww)
        assert y is not None and y.shape == x.shape
        y.backward(dy.to(dtype))
        results[name] = [t.double() for t in (y.detach(), xx.grad, ww.grad)]
    rows = x.numel() // shape[-1]
    for got, pytorch, exact, tol in zip(results["kernel"], results["pytorch"], results["fp64"],
                                        (1e-5, 1e-5, 1e-6 * rows)):
        assert (got - exact).abs().max() < tol
        assert (got - exact).abs().max() <= 4 * (pytorch - exact).abs().max() + 1e-6
    with torch.no_grad():  # inference: no saved statistics, the same numbers
        assert torch.equal(rms_norm(x.float(), w.float(), 1e-6), results["kernel"][0].float())


@pytest.mark.parametrize("rows,inner", [(512, 768), (37, 40), (1, 8)])
def test_swiglu_kernel_forward_and_backward(rows, inner, isa):
    import torch.nn.functional as F

    from glm5.kernels import swiglu

    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 2 * inner, generator=g, dtype=torch.float64) * 4  # far into both tails of the sigmoid
    dout = torch.randn(rows, inner, generator=g, dtype=torch.float64)
    results = {}
    for name, dtype in [("kernel", torch.float32), ("pytorch", torch.float32), ("fp64", torch.float64)]:
        hh = h.to(dtype).requires_grad_()
        if name == "kernel":
            out = swiglu(hh)
        else:
            gate, up = hh.chunk(2, dim=-1)
            out = F.silu(gate) * up
        out.backward(dout.to(dtype))
        results[name] = [t.double() for t in (out.detach(), hh.grad)]
    for got, pytorch, exact in zip(results["kernel"], results["pytorch"], results["fp64"]):
        scale = exact.abs().max()
        assert (got - exact).abs().max() < 1e-6 * scale
        assert (got - exact).abs().max() <= 4 * (pytorch - exact).abs().max() + 1e-6 * scale
    assert swiglu(h.bfloat16()) is None and swiglu(h[:, :-1].float()) is None  # bf16, odd width: PyTorch's


def test_training_gradients_with_and_without_kernels_agree():
    """One fp32 training forward + backward of a tiny MoE + DSA model (sparse stage: top-k < sequence), every
    kernel on vs all off: the loss and every parameter's gradient agree to rounding."""
    from glm5 import GLM5ForCausalLM
    from glm5.train.losses import lm_loss_sum

    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8)))
    for layer in model.model.layers:
        layer.self_attn.sparse_as_mask = True  # as glm5.train runs the sparse stage on a CPU
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(4))
    grads = {}
    for on in (True, False):
        model.zero_grad(set_to_none=True)
        with use_cpu_kernels(on):
            total, n = lm_loss_sum(model(ids).logits, ids)
            (total / n).backward()
        grads[on] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        grads[on]["loss"] = (total / n).detach()
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 20
    for name, g in grads[True].items():
        ref = grads[False][name]
        assert (g - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), name


def test_kernels_without_openmp_use_the_thread_pool(monkeypatch, tmp_path):
    """A compiler without OpenMP: the libraries have no parallel entry points and the Python thread pool
    runs the same per-range functions; same results."""
    import glm5.kernels.elementwise as elementwise_module
    import glm5.kernels.indexer as indexer_module
    import glm5.kernels.linear as linear_module
    import glm5.kernels.sparse_attention as attention_module
    from glm5.kernels import rms_norm

    q, w, k = _integer_inputs(1, 300, 300, 4, 16, seed=5)
    pos = torch.arange(300).view(1, 300)
    aq, akv, arows = _attention_inputs(N=200, H=4, D=48, T=100, K=20)
    x = torch.randn(64, 100, 256)
    weight = torch.randn(256)
    rows, head = torch.randn(5, 300), torch.randn(701, 300)  # 840 KB of weight: split over the threads

    def run_all():
        return (indexer_topk(q, w, k, pos, 16), latent_attention(aq, akv, arows, 0.2, 32), rms_norm(x, weight, 1e-6),
                linear_module.linear_rows(rows, head))

    native = run_all()
    libs = {name: build._load(name, str(tmp_path), build.selected_isa()[0], openmp=False)
            for name in ("indexer_topk", "sparse_attention", "elementwise", "linear")}
    assert all(lib is not None and not build.has_openmp(lib) for lib in libs.values())
    for module in (indexer_module, attention_module, elementwise_module, linear_module):
        monkeypatch.setattr(module, "load_library", lambda name: libs[name])
    pooled = run_all()
    assert _rows(pooled[0]) == _rows(native[0])
    assert all(torch.equal(a, b) for a, b in zip(pooled[1:], native[1:]))


@pytest.mark.parametrize("tokens", [64, 3])
def test_cpu_experts_function_matches_the_expert_loop(tokens, monkeypatch):
    """The fp32 CPU experts (`_CPUExperts`: matmuls into one buffer, C SwiGLU and combine, written-out
    backward) against the per-expert loop they replace: output and the gradients of the input, both expert
    weight tensors and the router (through the combine weights)."""
    import glm5.model.experts as experts_module
    from glm5.model.moe import MoE

    torch.manual_seed(tokens)
    moe = randomize_(MoE(tiny_config(n_routed_experts=8, num_experts_per_tok=3)))
    x = torch.randn(tokens, 64)
    grad_out = torch.randn(tokens, 64)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(experts_module, "USE_CPU_EXPERTS", on)
        moe.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = moe(xx)
        out.backward(grad_out)
        results[on] = [out.detach(), xx.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad,
                       moe.gate.weight.grad]
        with torch.no_grad():
            assert torch.allclose(moe(x), out.detach(), atol=1e-5)  # inference: the loop, the same numbers
    for got, want in zip(results[True], results[False]):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_swiglu_backward_with_a_non_contiguous_gradient():
    """The incoming gradient is made contiguous into a named tensor: a temporary copy passed by pointer was freed
    before the kernel read it (garbage or a crash)."""
    import torch.nn.functional as F

    from glm5.kernels import swiglu

    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 512, generator=g)
    grad = torch.randn(256, 256, generator=g).t()  # non-contiguous
    fast, slow = h.clone().requires_grad_(), h.clone().requires_grad_()
    swiglu(fast).backward(grad)
    gate, up = slow.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad)
    assert (fast.grad - slow.grad).abs().max() < 1e-4


def test_indexer_kernel_never_leaves_a_slot_unwritten_with_nan_scores(isa):
    """A NaN score makes the k-th value NaN, which matches neither selection test: the slots are -1, not
    whatever the output buffer held."""
    q, w, k = _integer_inputs(1, 12, 12, 4, 16, seed=1)
    w[0, 8] = float("nan")
    for _ in range(3):  # fresh torch.empty buffers each time
        out = indexer_topk(q, w, k, torch.arange(12).view(1, 12), 4)
        assert ((out >= -1) & (out <= torch.arange(12).view(1, 12, 1))).all()


def test_unwritable_kernel_cache_falls_back(monkeypatch, tmp_path):
    """GLM5_CACHE that cannot hold a directory: a warning and the PyTorch path, not an OSError in the forward."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GLM5_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(build, "_load", build._load.__wrapped__)
    with pytest.warns(UserWarning, match="could not build"):
        assert load_library("elementwise") is None


def test_use_cpu_kernels_blocks_in_two_threads_exit_out_of_order():
    import threading

    entered_b, a_left, checked = threading.Event(), threading.Event(), {}

    def thread_b():
        with use_cpu_kernels(True):
            entered_b.set()
            a_left.wait(5)
            checked["b"] = cpu_kernels_enabled()

    with use_cpu_kernels(False):
        t = threading.Thread(target=thread_b)
        t.start()
        entered_b.wait(5)
    a_left.set()  # A's block has exited while B's is still open
    t.join(5)
    assert checked["b"] is True


def test_fallbacks_with_no_visible_key_and_no_query():
    """The PyTorch paths at the edges the kernels already handle: a block of queries before position 0 selects
    nothing (-1), and zero queries give an empty attention output."""
    from glm5.model.dsa import sparse_latent_attention

    indexer = _indexer(4, 16, 4)
    q, w, k = _integer_inputs(1, 6, 6, 4, 16, seed=2)
    pos = torch.full((1, 6), -3)
    with use_cpu_kernels(False):
        assert (_select(indexer, q, w, k, pos) == -1).all()
        empty = sparse_latent_attention(torch.randn(2, 0, 3, 24), torch.randn(2, 5, 24),
                                        torch.zeros(2, 0, 4, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                                        0.5, 16)
    assert empty.shape == (2, 0, 3, 16)
    assert (indexer_topk(q, w, k, pos, 4) == -1).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("O,H", [(37, 70), (3, 19), (260, 128)])
def test_linear_rows_kernel_matches_fp64_and_gives_each_row_the_same_numbers(rows, O, H, isa):
    """glm5.kernels.linear on few rows, with widths that are not whole vectors or output blocks (the kernel's
    tails) and rows further apart than their width: within fp32's bound for a sum of H products of the exact
    result, and each row's outputs bit-identical whatever the other rows (a speculative verify step's row and
    the one-row step it stands for compute the same numbers)."""
    from glm5.kernels.linear import linear_rows

    g = torch.Generator().manual_seed(rows * O + H)
    wide = torch.randn(rows, H + 5, generator=g)
    x = wide[:, :H]  # rows H + 5 floats apart
    w = torch.randn(O, H, generator=g)
    got = linear_rows(x, w)
    assert got is not None and got.shape == (rows, O) and got.dtype == torch.float32
    exact = x.double() @ w.double().T
    bound = (H + 2) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - exact).abs() <= bound).all()
    for r in range(rows):
        assert torch.equal(linear_rows(x[r : r + 1], w)[0], got[r])
    # the comparison can fail: one weight off by 0.01 moves an output well past the bound
    bad = w.clone()
    bad[O - 1, H - 1] += 0.01
    assert ((linear_rows(x, bad).double() - exact).abs() > bound).any()


def test_linear_rows_kernel_declines_what_it_does_not_do():
    from glm5.kernels.linear import MAX_ROWS, linear_rows

    x, w = torch.randn(4, 32), torch.randn(8, 32)
    assert linear_rows(x, w) is not None
    assert linear_rows(x.double(), w.double()) is None  # fp32 only
    assert linear_rows(torch.randn(MAX_ROWS + 1, 32), w) is None  # a matmul's job
    assert linear_rows(torch.randn(0, 32), w) is None
    assert linear_rows(x, torch.randn(8, 31)) is None  # widths disagree
    assert linear_rows(x.requires_grad_(), w) is None  # autograd: F.linear records the op
    with use_cpu_kernels(False):
        assert linear_rows(x.detach(), w) is None


def test_engine_linear_takes_the_kernel_for_few_rows_and_pytorch_otherwise(monkeypatch):
    """The engine's `linear` (every projection of an eager decode step, and the lm_head): the kernel on few fp32
    rows, F.linear when the kernels are off or the rows are many; the same numbers to fp32 rounding."""
    import torch.nn.functional as F

    import glm5.engine.runner as runner
    from glm5.kernels.linear import MAX_ROWS

    calls = []
    original = runner.linear_kernel.linear_rows
    monkeypatch.setattr(runner.linear_kernel, "linear_rows", lambda *a: calls.append(1) or original(*a))
    w = torch.randn(50, 40)
    for rows in (1, 3, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, 40)
        calls.clear()
        got = runner.linear(x, w)
        assert len(calls) == (rows <= MAX_ROWS)
        assert torch.allclose(got, F.linear(x, w), rtol=0, atol=40 * 2.0**-22 * (x.abs() @ w.abs().T).max())
        with use_cpu_kernels(False):
            calls.clear()
            assert torch.equal(runner.linear(x, w), F.linear(x, w)) and not calls
