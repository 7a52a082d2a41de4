"""RL throughput: sync vs async vs APRIL on a long-tailed response-length distribution.

    PYTHONPATH=. .venv/bin/python bench/rl.py                        # 2 rounds x 100 steps x 5 modes, ~12 minutes
    PYTHONPATH=. .venv/bin/python bench/rl.py --modes sync,april --rounds 3

The same task, seed, learning rate and starting policy (the nano preset's random weights) in each mode. The task,
`LongTailEnv` (loaded the way a user's env is, `--env bench.rl:LongTailEnv`), gives each prompt its own token
budget: most answers short (4-12 tokens), one in ten near the maximum (`--max-new-tokens`, 128); a random policy
rarely stops early, so response lengths follow the budgets. Its reward is the share of digits in the answer: at
lr 1e-3 sync takes it from 0.01 to 1.0 in ~60 steps, so "no loss in reward" is a comparison of learning, not of
two flat lines. Per mode: trained tokens/s over the whole run (trained tokens / wall time of the steps), median
step time, time the generator sat idle (step time - generation time), final reward (mean of the last ten steps),
the step and the seconds at which the 10-step mean reward first reached 0.5, the reward per 10 steps, and the
share of trained tokens that an earlier policy version sampled. JSON to bench/results/rl.json with the CPU model
and ISA; the last line reads `april vs sync: N.NNx throughput, reward A.AA vs B.BB`.

Each mode as glm5 runs it on this machine (MODES below), with the machine's cores (`--threads`, default all):
- sync: generate, train, sync, in this process with every core's threads (faster here than on Ray actors);
- async: `glm5 rl --mode async` on Ray: one rollout actor and the trainer actor, the cores shared out;
- april: `glm5 rl --mode april --keep-partial-kv --overlap` on Ray, as async: the next step's over-sampled
  round runs while the trainer trains (and on past APRIL's stop until the update lands), aborted episodes keep
  their KV caches on the worker and go on there;
- april-serial: APRIL with kept KV caches in this process, generation and training in turn;
- april-recompute: APRIL in this process, each continued episode prefilled again (prompt and all it has), as
  slime does; on a CPU that prefill is most of what APRIL saves.
Runs are long (100 steps) because a long answer waits several steps as a partial: in a short run the ones still
waiting at the end are never trained, and APRIL's trained tokens come out short of sync's by that much.
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


# Each mode as glm5 offers it, on the same machine: in this process with every core's torch threads, or on Ray
# with the cores shared out (one rollout actor and the trainer actor, each with its share of the threads).
MODES = {
    "sync": {"mode": "sync"},
    "async": {"mode": "async", "ray": True},
    "april": {"mode": "april", "keep_partial_kv": True, "overlap": True, "ray": True},
    "april-serial": {"mode": "april", "keep_partial_kv": True},
    "april-recompute": {"mode": "april"},
}


def run_mode(name: str, args, out: Path) -> dict:
    from glm5.rl.run import RLConfig, run_rl

    spec = MODES[name]
    ray_workers = args.ray_workers if spec.get("ray") else 0
    threads = args.threads if not ray_workers else max(1, args.threads // (ray_workers + 1))
    config = RLConfig(out=str(out / name), preset="nano", env="bench.rl:LongTailEnv", algo="grpo", mode=spec["mode"],
                      steps=args.steps, rollout_batch=args.rollout_batch, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, over_sample=args.over_sample,
                      keep_partial_kv=spec.get("keep_partial_kv", False), overlap=spec.get("overlap", False),
                      max_staleness=args.april_staleness if spec["mode"] == "april" else 1,
                      rollout_workers=ray_workers, ray_num_cpus=max(args.threads, ray_workers + 1), lr=args.lr,
                      seed=args.seed, save_every=0, threads=threads, progress=False)
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
        # the learning curve: reward per 10 steps, and when the 10-step mean first reached 0.5 (step, seconds)
        "reward_per_10_steps": [sum(r["reward_mean"] for r in records[i:i + 10]) / len(records[i:i + 10])
                                for i in range(0, len(records), 10)],
        **_reaching(records, 0.5),
    }


def _reaching(records: list[dict], level: float) -> dict:
    """The first step at which the mean reward of the last 10 steps reached `level`, and the seconds run by then
    (None, None if it never did)."""
    elapsed = 0.0
    for i, r in enumerate(records):
        elapsed += r["step_seconds"]
        window = records[max(0, i - 9):i + 1]
        if len(window) == 10 and sum(w["reward_mean"] for w in window) / 10 >= level:
            return {"step_reward_half": i + 1, "seconds_reward_half": elapsed}
    return {"step_reward_half": None, "seconds_reward_half": None}


def _median(values):
    """Median of numbers; of lists, element by element; None if any run has None (a level never reached)."""
    values = list(values)
    if any(v is None for v in values):
        return None
    if isinstance(values[0], list):
        return [statistics.median(column) for column in zip(*values)]
    return statistics.median(values)


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
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the machine: all of them in this process's modes, shared out among the "
                   "actors in Ray's (default: the CPU count)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the longest answers' budget (default 128)")
    p.add_argument("--over-sample", type=float, default=2.0, help="april: groups launched / groups needed (default 2)")
    # a long answer is continued over several steps (each step's generation stops once the batch is full, after
    # ~12 tokens), so its first tokens are ~10 versions old when it is trained: with a bound of 2 the 112-128-token
    # answers were restarted again and again and never trained, with 8 still often. The off-policy share and the
    # final reward are reported beside the throughput.
    p.add_argument("--april-staleness", type=int, default=16,
                   help="april's --max-staleness: a partial episode older than this is restarted (default 16)")
    p.add_argument("--ray-workers", type=int, default=1, help="Ray rollout actors of the modes on Ray (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3: sync's reward climbs from "
                   "0.01 to 1.0 within ~60 steps, so the modes' rewards can be compared)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default all)")
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
                half = (f"reward 0.5 at step {r['step_reward_half']} ({r['seconds_reward_half']:.0f} s)"
                        if r["step_reward_half"] else "reward never 0.5")
                print(f"round {round_index} {mode:15s} {r['trained_tokens_per_s']:8.1f} trained tok/s  step "
                      f"{r['step_seconds_median']:6.2f} s  generator idle {r['generator_idle_s_per_step']:5.2f} s/step  "
                      f"reward {r['final_reward']:.3f}  off-policy {r['offpolicy_token_share']:.2f}  response "
                      f"{r['response_len_mean']:.1f} tok  {half}", flush=True)
    results = {"args": vars(args), "rounds": rounds, "modes": {}}
    for mode, runs in rounds.items():
        results["modes"][mode] = {key: _median(r[key] for r in runs) for key in runs[0]}
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
