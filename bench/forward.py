"""Forward-pass benchmark: glm5's sparse DSA path against transformers' GlmMoeDsaForCausalLM (sdpa).

    .venv/bin/python bench/forward.py                       # 512, 2K, 8K both; 32K ours alone
    .venv/bin/python bench/forward.py --seqs 512 2048 --ours-only 8192 --repeats 3
    .venv/bin/python bench/forward.py --seqs 8192 --ours-only --rounds 3   # 3 rounds a side, taking turns

Same random weights in both (ours built from a seed, copied into transformers), the `tiny-bench` preset
(vocab 4096, hidden 256, 4 layers, 16 experts top-4, index_topk 64), fp32, batch 1, `--threads` CPU threads. Every
measurement runs in a fresh subprocess so its peak memory is its own, after an untimed pass whose logits
(64 rows) are compared with the other side's (transformers under glm5's DSA selections, and how often its own
differ reported, bench/peer.py; they must agree within fp32 rounding or the benchmark stops) and a warm-up pass: "peak MiB" is the forward's
high-water mark of resident memory above what the process held before the first forward (Linux VmHWM,
reset through /proc/self/clear_refs). Reports medians, tokens/s and the ratios; writes JSON. Growth with
length is also given without glm5's top-k selection (timed around each `select_topk` call): DSA's
lightning indexer scores every earlier token, so it alone stays O(T^2) by design.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from results_io import describe_cpu, write_results  # bench/ is on sys.path when a bench runs


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# Rows of the logits each side saves for the comparison: evenly spaced over the sequence (first and last included)
CHECK_ROWS = 64


def check_rows(seq: int) -> list[int]:
    return sorted({round(i * (seq - 1) / (CHECK_ROWS - 1)) for i in range(CHECK_ROWS)})


def worker(impl: str, seq: int, repeats: int, threads: int, device: str = "cpu", logits_to: str | None = None) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.manual_seed(0)
    cfg = GLM5Config.from_preset("tiny-bench")
    ours = GLM5ForCausalLM(cfg).eval()
    if impl == "transformers":
        from transformers import GlmMoeDsaForCausalLM

        from glm5.checkpoint import to_transformers_config

        model = GlmMoeDsaForCausalLM(to_transformers_config(cfg, "sdpa")).eval()
        loaded = model.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}, strict=False)
        if loaded.missing_keys or loaded.unexpected_keys:  # a name that did not match would leave random weights
            raise SystemExit(f"transformers did not take glm5's weights: missing {loaded.missing_keys[:5]}, "
                             f"unexpected {loaded.unexpected_keys[:5]}")
        del ours
    else:
        model = ours
    gc.collect()
    model.to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # glm5 only: time spent choosing the top-k (the lightning indexer's O(T^2) scoring and the selection),
    # the one part of DSA that stays quadratic, reported apart so the rest's growth with length shows
    indexer_s = [0.0]
    if impl == "glm5":
        import glm5.model.mla as mla

        select = mla.select_topk

        def timed_select(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = select(*a, **kw)
            sync()
            indexer_s[0] += time.perf_counter() - t0
            return out

        mla.select_topk = timed_select
    times, indexer_times = [], []
    if logits_to:  # the correctness check, untimed and before the memory high-water mark is reset (the sort
        from peer import lowest_position_topk, shared_selection  # that stands in for topk needs memory of its own)

        selection = topk_path(logits_to)
        with torch.inference_mode(), lowest_position_topk(), shared_selection(impl, selection) as agreement:
            torch.save(model(ids).logits[0, check_rows(seq)].float().cpu(), logits_to)
        check_extra = dict(agreement)
        gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS high-water mark
    except OSError:
        pass
    base_kib = _rss_kib("VmRSS")
    if cuda:
        sync()
        base_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(ids)  # warm-up at every length, with the timed passes' own ops
        for _ in range(repeats):
            sync()
            indexer_s[0] = 0.0
            t0 = time.perf_counter()
            model(ids)
            sync()
            times.append(time.perf_counter() - t0)
            indexer_times.append(indexer_s[0])
    peak_kib = _rss_kib("VmHWM")
    median = statistics.median(times)
    peak_mib = max(0, peak_kib - base_kib) / 1024
    if cuda:  # on the GPU, the forward's peak of allocated device memory above the weights
        peak_mib = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return {
        "impl": impl, "seq": seq, "device": device, "times_s": times, "median_s": median,
        "tokens_per_s": seq / median, "peak_mib": peak_mib, "peak_rss_mib": peak_kib / 1024,
        "indexer_times_s": indexer_times if impl == "glm5" else None,
        "indexer_median_s": statistics.median(indexer_times) if impl == "glm5" else None,
        **({"selection_check": check_extra} if logits_to else {}),
    }


def topk_path(logits_to: str) -> str:
    """Where glm5's check pass leaves its DSA selections for transformers' (beside glm5's logits file)."""
    return os.path.join(os.path.dirname(logits_to), os.path.basename(logits_to).split("-", 1)[-1] + ".topk")


def run_one(impl: str, seq: int, repeats: int, threads: int, device: str, logits_to: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(seq), "--repeats", str(repeats), "--threads", str(threads),
           "--device", device] + (["--logits-to", logits_to] if logits_to else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} at {seq} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_rounds(results: list[dict]) -> dict:
    """One side's rounds at one length -> one row: the median of the rounds' medians, the largest peak, every
    timed pass (the first round's logits check kept)."""
    row = dict(results[0])
    medians = [r["median_s"] for r in results]
    row.update(times_s=[t for r in results for t in r["times_s"]], median_s=statistics.median(medians),
               round_medians_s=medians, peak_mib=max(r["peak_mib"] for r in results),
               peak_rss_mib=max(r["peak_rss_mib"] for r in results))
    row["tokens_per_s"] = row["seq"] / row["median_s"]
    if row.get("indexer_times_s") is not None:
        row["indexer_times_s"] = [t for r in results for t in r["indexer_times_s"]]
        row["indexer_median_s"] = statistics.median(r["indexer_median_s"] for r in results)
    return row


def torch_load(path: str):
    import torch

    return torch.load(path)


def compare_logits(seq: int, ours, theirs) -> dict:
    """The two sides' logits at check_rows(seq) must agree within fp32 rounding (the tests' 1e-4 of the logits'
    scale: the same sums in a different order); a benchmark whose sides compute different things stops here.
    Both run under glm5's DSA selection (peer.shared_selection): at 8K, indexer scores summed in another order
    swap a key at the k-th place in a few rows, which moves those rows' logits by ~1e-2 without any error."""
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    check = {"seq": seq, "rows": len(check_rows(seq)), "max_abs_diff": err, "logit_scale": scale,
             "tolerance": 1e-4 * max(scale, 1.0)}
    print(f"[bench] logits at {check['rows']} rows of {seq}: max |glm5 - transformers| {err:.2e} (scale {scale:.2f})")
    if not err <= check["tolerance"]:
        raise SystemExit(f"seq {seq}: glm5 and transformers logits differ by {err:.3e} (> {check['tolerance']:.1e}): "
                         "the timings would compare different computations")
    return check


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192], help="lengths run by both")
    p.add_argument("--ours-only", type=int, nargs="*", default=[32768], help="lengths run by glm5 alone")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measurements per side at each compared length, the sides taking turns (each in a fresh "
                        "process); speed-up = median of the rounds' ratios (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (the goal's setting) or cuda (peak = device memory)")
    p.add_argument("--out", default="bench/results/forward.json", help="where the JSON goes")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    p.add_argument("--logits-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads, args.device,
                                args.logits_to)))
        return 0

    print(f"[bench] cpu: {describe_cpu()}", flush=True)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    runs, checks = {}, []  # (impl, seq) -> one result per round
    plan = [(s, impl, k) for s in args.seqs for k in range(args.rounds) for impl in ("glm5", "transformers")]
    plan += [(s, "glm5", 0) for s in args.ours_only]
    with tempfile.TemporaryDirectory() as scratch:
        for seq, impl, k in plan:
            print(f"[bench] {impl:<12} seq {seq:>6}" + (f" round {k + 1}/{args.rounds}" if args.rounds > 1 else "")
                  + " ...", end=" ", flush=True)
            # every round of a compared length runs the untimed check pass first (the same memory history before
            # the measured window); the logits are compared on the first round
            compared = seq in args.seqs
            r = run_one(impl, seq, args.repeats, args.threads, args.device,
                        os.path.join(scratch, f"{impl}-{seq}.pt") if compared else None)
            print(f"{r['median_s'] * 1000:9.1f} ms  {r['tokens_per_s']:9.0f} tok/s  peak {r['peak_mib']:8.1f} MiB")
            runs.setdefault((impl, seq), []).append(r)
            if compared and impl == "transformers" and k == 0:
                sel = r["selection_check"]
                print(f"[bench] DSA selections at {seq}: transformers' own top-k differs from glm5's in "
                      f"{sel['rows_differing']} of {sel['rows']} rows (max score gap at a swap "
                      f"{sel['max_relative_gap']:.1e} of the row's k-th score: near-ties in fp32 sums); "
                      "logits compared under glm5's selection")
                checks.append(compare_logits(seq, *(torch_load(os.path.join(scratch, f"{side}-{seq}.pt"))
                                                    for side in ("glm5", "transformers"))))
    rows = [merge_rounds(results) for results in runs.values()]

    by = {(r["impl"], r["seq"]): r for r in rows}
    print("\n| seq | glm5 ms | transformers ms | speed-up | glm5 tok/s | glm5 peak MiB | transformers peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for seq in sorted({r["seq"] for r in rows}):
        ours, theirs = by.get(("glm5", seq)), by.get(("transformers", seq))
        entry = {"seq": seq, "glm5_ms": ours["median_s"] * 1000, "glm5_tokens_per_s": ours["tokens_per_s"],
                 "glm5_peak_mib": ours["peak_mib"]}
        if theirs:
            # per round, the two sides' medians measured back to back: this shared machine's speed drifts by
            # tens of percent over minutes, and a ratio of neighbours drifts less than a ratio of medians
            ratios = [t / o for t, o in zip(theirs["round_medians_s"], ours["round_medians_s"])]
            entry.update(transformers_ms=theirs["median_s"] * 1000, transformers_tokens_per_s=theirs["tokens_per_s"],
                         transformers_peak_mib=theirs["peak_mib"], speedup=statistics.median(ratios),
                         speedup_rounds=ratios, memory_ratio=ours["peak_mib"] / max(theirs["peak_mib"], 1e-9))
            print(f"| {seq} | {entry['glm5_ms']:.1f} | {entry['transformers_ms']:.1f} | {entry['speedup']:.1f}x | "
                  f"{entry['glm5_tokens_per_s']:.0f} | {ours['peak_mib']:.1f} | {theirs['peak_mib']:.1f} | "
                  f"{entry['memory_ratio']:.3f} |")
        else:
            print(f"| {seq} | {entry['glm5_ms']:.1f} | - | - | {entry['glm5_tokens_per_s']:.0f} | {ours['peak_mib']:.1f} | - | - |")
        summary.append(entry)
    ours_seqs = sorted(s for (impl, s) in by if impl == "glm5")

    def rest(seq):  # the median forward minus the median top-k selection (the indexer)
        r = by[("glm5", seq)]
        return r["median_s"] - r["indexer_median_s"]

    growth = [
        {"from": a, "to": b, "length_ratio": b / a, "time_ratio": by[("glm5", b)]["median_s"] / by[("glm5", a)]["median_s"],
         "indexer_share_at_to": by[("glm5", b)]["indexer_median_s"] / by[("glm5", b)]["median_s"],
         "time_ratio_without_indexer": rest(b) / rest(a)}
        for a, b in zip(ours_seqs, ours_seqs[1:])
    ]
    for g in growth:
        print(f"glm5 time x{g['time_ratio']:.2f} for length x{g['length_ratio']:.0f} ({g['from']} -> {g['to']}); "
              f"without the indexer's top-k x{g['time_ratio_without_indexer']:.2f} "
              f"(the indexer is {100 * g['indexer_share_at_to']:.0f}% of the time at {g['to']})")
    result = {
        "benchmark": "forward", "preset": "tiny-bench", "dtype": "float32", "batch": 1, "threads": args.threads,
        "device": args.device, "rounds": args.rounds,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "rows": rows, "summary": summary, "growth": growth, "logits_check": checks,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
