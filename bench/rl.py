"""RL throughput: sync vs async vs APRIL on a long-tailed response-length distribution.

    PYTHONPATH=. .venv/bin/python bench/rl.py                  # nano preset, 2 rounds x 100 steps per mode, ~10 minutes
    PYTHONPATH=. .venv/bin/python bench/rl.py --steps 10 --async-workers 1   # async on Ray actors (overlap)

The same task, seed and starting policy (the nano preset's random weights) in each mode. The task, `LongTailEnv`
(loaded the way a user's env is, `--env bench.rl:LongTailEnv`), gives each prompt its own token budget: most
answers short (4-12 tokens), one in ten near the maximum (`--max-new-tokens`, 128); a random policy rarely stops early, so response
lengths follow the budgets. Its reward is the share of digits in the answer (something to learn). Per mode:
trained tokens/s over the whole run (trained tokens / wall time of the steps), median step time, time the
generator sat idle (step time - generation time), final reward (mean of the last ten steps) and the share of
trained tokens that an earlier policy version sampled. JSON to bench/results/rl.json with the CPU model and ISA;
the last line reads `april vs sync: N.NNx throughput, reward A.AA vs B.BB`.

`april` is APRIL with `keep_partial_kv` (`glm5 rl --keep-partial-kv`): the rollout worker keeps an aborted
episode's KV cache and continues it there after the weight update; `april-recompute` prefills each continued
episode again (prompt and everything it has), as slime does. On a CPU that prefill is most of what APRIL
saves: a long answer is continued ~10 times, each time from the start. Runs are long (100 steps) because a long
answer waits several steps as a partial: in a short run the ones still waiting at the end are never trained,
and APRIL's trained tokens come out short of sync's by that much.

Without --async-workers, async runs in this process: step n+1's generation runs before step n's update
(one version stale, as on Ray) but nothing overlaps, so its throughput equals sync's; on Ray actors the
generation overlaps training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import describe_cpu, write_results  # noqa: E402

LONGEST = int(os.environ.get("GLM5_BENCH_RL_LONGEST", "128"))  # the longest answer; set by --max-new-tokens


class LongTailEnv:
    """A prompt with its own token budget: 90 % short (4-12 tokens), 10 % near the maximum (7/8 of it or more)."""

    max_turns = 1

    def reset(self, seed: int):
        # seeds of consecutive prompts are consecutive integers: hash them, or Random(0..23) never draws < 0.1
        rng = random.Random(zlib.crc32(f"long-tail {seed}".encode()))
        self.max_new_tokens = rng.randint(LONGEST * 7 // 8, LONGEST) if rng.random() < 0.1 else rng.randint(4, 12)
        return [{"role": "user", "content": f"Write some digits ({seed % 997})."}], None

    def step(self, turn):
        text = (turn.content or "") + (turn.reasoning or "")
        return [], sum(c.isdigit() for c in text) / max(len(text), 1), True


def run_mode(name: str, args, out: Path) -> dict:
    from glm5.rl.run import RLConfig, run_rl

    mode = name.split("-")[0]  # april-recompute: april without keep_partial_kv
    config = RLConfig(out=str(out / name), preset="nano", env="bench.rl:LongTailEnv", algo="grpo", mode=mode,
                      steps=args.steps, rollout_batch=args.rollout_batch, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, over_sample=args.over_sample,
                      keep_partial_kv=name == "april",
                      max_staleness=args.april_staleness if mode == "april" else 1,
                      rollout_workers=args.async_workers if mode == "async" else 0, lr=1e-4, seed=args.seed,
                      save_every=0, threads=args.threads, progress=False)
    run_rl(config, save_model=False)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    trained = sum(r["trained_tokens"] for r in records)
    seconds = sum(r["step_seconds"] for r in records)
    gen = [r["response_len_mean"] for r in records]
    return {
        "trained_tokens_per_s": trained / seconds, "step_seconds_median": statistics.median(r["step_seconds"] for r in records),
        "generator_idle_s_per_step": statistics.median(
            max(0.0, r["step_seconds"] - r["rollout_seconds"]) for r in records),
        "final_reward": sum(r["reward_mean"] for r in records[-10:]) / len(records[-10:]),
        "mismatch_kl_mean": sum(r["mismatch_kl"] for r in records) / len(records),
        "offpolicy_token_share": sum(r["offpolicy_token_share"] * r["trained_tokens"] for r in records) / max(trained, 1),
        "response_len_mean": sum(gen) / len(gen), "steps": len(records), "trained_tokens": trained, "seconds": seconds,
    }


def _ratios(rounds: dict, mode: str) -> list[float]:
    """`mode`'s trained tokens/s over sync's, round by round (the same load); their median is reported."""
    return [a["trained_tokens_per_s"] / s["trained_tokens_per_s"] for a, s in zip(rounds[mode], rounds["sync"])]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="RL steps per mode and round (default 100)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every mode once, in turn, so a change "
                   "of machine load hits all modes alike; medians over rounds are reported (default 2)")
    p.add_argument("--rollout-batch", type=int, default=4, help="groups per step (default 4)")
    p.add_argument("--group-size", type=int, default=4, help="responses per group (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the longest answers' budget (default 128)")
    p.add_argument("--over-sample", type=float, default=2.0, help="april: groups launched / groups needed (default 2)")
    # a long answer is continued over several steps (each step's generation stops once the batch is full, after
    # ~12 tokens), so its first tokens are ~10 versions old when it is trained: with a bound of 2 the 112-128-token
    # answers were restarted again and again and never trained, with 8 still often. The off-policy share and the
    # final reward are reported beside the throughput.
    p.add_argument("--april-staleness", type=int, default=16,
                   help="april's --max-staleness: a partial episode older than this is restarted (default 16)")
    p.add_argument("--async-workers", type=int, default=0, help="Ray rollout actors for the async mode (default 0: in process)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--modes", default="sync,async,april,april-recompute",
                   help="comma-separated modes (default sync,async,april,april-recompute)")
    p.add_argument("--out", default="bench/results/rl.json", help="JSON output (default bench/results/rl.json)")
    args = p.parse_args()
    os.environ["GLM5_BENCH_RL_LONGEST"] = str(args.max_new_tokens)  # LongTailEnv is imported by module:attr
    print(f"[bench] {describe_cpu()}; nano preset, {args.rounds} rounds x {args.steps} steps x {args.rollout_batch} "
          f"groups x {args.group_size}, torch threads per run {args.threads}", flush=True)
    modes = args.modes.split(",")
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for mode in modes:
                r = run_mode(mode, args, Path(tmp) / f"round{round_index}")
                rounds[mode].append(r)
                print(f"round {round_index} {mode:15s} {r['trained_tokens_per_s']:8.1f} trained tok/s  step "
                      f"{r['step_seconds_median']:6.2f} s  generator idle {r['generator_idle_s_per_step']:5.2f} s/step  "
                      f"reward {r['final_reward']:.3f}  off-policy {r['offpolicy_token_share']:.2f}  response "
                      f"{r['response_len_mean']:.1f} tok", flush=True)
    results = {"args": vars(args), "rounds": rounds, "modes": {}}
    for mode, runs in rounds.items():
        results["modes"][mode] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    summary = results["modes"]
    for mode in modes:
        r = summary[mode]
        print(f"median {mode:15s} {r['trained_tokens_per_s']:8.1f} trained tok/s  step {r['step_seconds_median']:6.2f} s  "
              f"reward {r['final_reward']:.3f}")
    if "april-recompute" in summary and "sync" in summary:
        results["april_recompute_vs_sync_throughput"] = statistics.median(_ratios(rounds, "april-recompute"))
        print(f"april-recompute vs sync: {results['april_recompute_vs_sync_throughput']:.2f}x throughput, reward "
              f"{summary['april-recompute']['final_reward']:.3f} vs {summary['sync']['final_reward']:.3f}")
    if "april" in summary and "sync" in summary:
        ratios = _ratios(rounds, "april")
        ratio = statistics.median(ratios)
        results["april_vs_sync_throughput"] = ratio
        results["april_vs_sync_per_round"] = ratios
        write_results(args.out, results)
        print(f"final reward (mean of the last 10 steps): april {summary['april']['final_reward']:.4f}, sync "
              f"{summary['sync']['final_reward']:.4f}")
        print(f"april vs sync: {ratio:.2f}x throughput, reward {summary['april']['final_reward']:.2f} vs "
              f"{summary['sync']['final_reward']:.2f}")
    else:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
