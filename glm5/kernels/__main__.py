"""Which CPU kernel path runs here and why, with a micro-timing of each kernel against its PyTorch fallback.

    python -m glm5.kernels                      # the tiny-bench shapes at 2048 tokens, torch's thread count
    python -m glm5.kernels --tokens 8192 --threads 2 --repeats 5
    GLM5_CPU_ISA=avx2 python -m glm5.kernels    # the AVX2 build on an AVX-512 CPU

For each kernel: the instruction-set path its library was built for (and its vector width), the median
time of the kernel and of the fallback at the given shape (alternated, same process), their ratio, what the
startup check (glm5.kernels.check) would decide from that, and what it has already recorded on this machine.
The fallbacks are the model's own PyTorch code (imported from glm5.model: this entry point sits above both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _cases(tokens: int):
    """(name, kernel call, fallback call) at the tiny-bench preset's shapes; each kernel call returns None
    when it cannot run."""
    from glm5 import GLM5Config
    from glm5.kernels import indexer_topk, latent_attention, rms_norm, swiglu, use_cpu_kernels
    from glm5.model.dsa import sparse_latent_attention
    from glm5.model.indexer import Indexer, select_topk_blockwise

    cfg = GLM5Config.from_preset("tiny-bench")
    g = torch.Generator().manual_seed(0)
    T, H, D, topk = tokens, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    indexer = Indexer(cfg)
    q, w, k = torch.randn(1, T, H, D, generator=g), torch.randn(1, T, H, generator=g), torch.randn(1, T, D, generator=g)
    pos = torch.arange(T).view(1, T)
    block = 256

    def fallback(fn):
        def run():
            with use_cpu_kernels(False):
                return fn()
        return run

    heads, latent, rope = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    aq = torch.randn(1, T, heads, latent + rope, generator=g)
    akv = torch.randn(1, T, latent + rope, generator=g)
    with use_cpu_kernels(False):
        selected = select_topk_blockwise(q, w * indexer.softmax_scale, k, topk, pos, block=block)
    rows = selected[0]
    x = torch.randn(T, cfg.hidden_size, generator=g)
    norm_w = torch.randn(cfg.hidden_size, generator=g)
    h = torch.randn(T * cfg.num_experts_per_tok, 2 * cfg.moe_intermediate_size, generator=g)
    # a decode step of 8 sequences through one MoE layer's routed experts, against the eager engine's path
    from glm5.kernels.experts import experts_rows
    from glm5.model.experts import Experts, experts_loop

    experts = Experts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02, generator=g)
    torch.nn.init.normal_(experts.down_proj, std=0.02, generator=g)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    xd = torch.randn(8, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(8)])
    wd = torch.rand(8, K, generator=g)
    # the lm_head of a speculative verify step (the last token and two drafts), against F.linear
    from glm5.kernels.linear import linear_rows

    head = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    xv = torch.randn(3, cfg.hidden_size, generator=g)
    return [
        (f"indexer_topk   [{T} queries x {T} keys, {H} heads x {D}, top-{topk}]",
         lambda: indexer_topk(q, w * indexer.softmax_scale, k, pos, topk),
         fallback(lambda: select_topk_blockwise(q, w * indexer.softmax_scale, k, topk, pos, block=block))),
        (f"latent_attention [{T} queries, {heads} heads x {latent + rope}, {topk} rows each]",
         lambda: latent_attention(aq[0], akv[0], rows, 0.1, latent),
         fallback(lambda: sparse_latent_attention(aq, akv, selected, pos, 0.1, latent, block=block))),
        (f"rms_norm       [{T} x {cfg.hidden_size}]", lambda: rms_norm(x, norm_w, 1e-6),
         lambda: norm_w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))),
        (f"swiglu         [{h.shape[0]} x {h.shape[1]}]", lambda: swiglu(h),
         lambda: torch.nn.functional.silu(h[:, : h.shape[1] // 2]) * h[:, h.shape[1] // 2:]),
        (f"experts_rows   [8 rows, top-{K} of {E} experts, {cfg.hidden_size} -> {cfg.moe_intermediate_size}]",
         lambda: experts_rows(xd, idx, wd, experts.gate_up_proj.data, experts.down_proj.data),
         lambda: experts_loop(experts, xd, idx, wd)),
        (f"linear_rows    [3 rows x {cfg.hidden_size} -> {cfg.vocab_size}]", lambda: linear_rows(xv, head),
         lambda: torch.nn.functional.linear(xv, head)),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m glm5.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="sequence length of the micro-timings")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each path (alternated; median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from glm5.kernels import build, check

    try:
        isa, why = build.selected_isa()
    except ValueError as err:  # an unknown GLM5_CPU_ISA: one line, no traceback
        parser.exit(2, f"python -m glm5.kernels: {err}\n")
    report = {"cpu": build.cpu_model(), "isa": isa, "why": why, "available": build.available_isas(),
              "threads": torch.get_num_threads(), "kernels_enabled": build.cpu_kernels_enabled(),
              "check_enabled": check.check_enabled(), "kernels": []}
    libraries = {}
    for name in ("indexer_topk", "sparse_attention", "elementwise", "experts", "linear"):
        lib = build.load_library(name)
        if lib is None:
            libraries[name] = "not built (PyTorch fallback)"
        else:
            built_isa, width = build.library_isa(lib)
            libraries[name] = f"{built_isa}, {width} floats per vector"
    report["libraries"] = libraries
    if not args.json:
        print(f"CPU: {report['cpu']}; paths this CPU can run: {', '.join(report['available'])}")
        print(f"ISA path: {isa} ({why}); torch threads {report['threads']}; kernels "
              f"{'on' if report['kernels_enabled'] else f'off ({build.ENV_SWITCH})'}; startup check "
              f"{'on' if report['check_enabled'] else f'off ({check.CHECK_ENV}=0)'}")
        for name, built in libraries.items():
            print(f"  {name}.c: {built}")
    for label, kernel, fallback in _cases(args.tokens):
        if kernel() is None:
            entry = {"kernel": label, "kernel_ms": None, "fallback_ms": _median_ms(fallback, args.repeats)}
        else:
            fallback()  # warm both
            times = {"kernel": [], "fallback": []}
            for _ in range(args.repeats):  # alternated: machine load falls on both alike
                times["kernel"].append(_median_ms(kernel, 1))
                times["fallback"].append(_median_ms(fallback, 1))
            entry = {"kernel": label, "kernel_ms": statistics.median(times["kernel"]),
                     "fallback_ms": statistics.median(times["fallback"])}
        report["kernels"].append(entry)
        if not args.json:
            if entry["kernel_ms"] is None:
                print(f"{label}: kernel cannot run here; fallback {entry['fallback_ms']:.2f} ms")
            else:
                ratio = entry["fallback_ms"] / entry["kernel_ms"]
                verdict = "kernel runs" if ratio >= 1 else "fallback runs (kernel slower)"
                print(f"{label}: kernel {entry['kernel_ms']:.2f} ms, fallback {entry['fallback_ms']:.2f} ms, "
                      f"{ratio:.2f}x -> {verdict}")
    report["recorded_decisions"] = check.decisions()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        recorded = report["recorded_decisions"]
        print(f"startup check decisions recorded on this machine for {isa} at {report['threads']} threads: "
              f"{len(recorded)}")
        for key, entry in sorted(recorded.items()):
            print(f"  {key}: {'kernel' if entry['kernel'] else 'fallback'} "
                  f"({entry['kernel_ms']:.2f} vs {entry['fallback_ms']:.2f} ms)")
    return report


if __name__ == "__main__":
    main()
