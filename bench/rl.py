"""RL throughput: sync vs async vs APRIL on a long-tailed response-length distribution.

    PYTHONPATH=. .venv/bin/python bench/rl.py                  # nano preset, 6 steps per mode, ~ a few minutes
    PYTHONPATH=. .venv/bin/python bench/rl.py --steps 10 --async-workers 1   # async on Ray actors (overlap)

The same task, seed and starting policy (the nano preset's random weights) in each mode. The task, `LongTailEnv`
(loaded the way a user's env is, `--env bench.rl:LongTailEnv`), gives each prompt its own token budget: most
answers short (4-12 tokens), one in ten near the maximum (`--max-new-tokens`, 128); a random policy rarely stops early, so response
lengths follow the budgets. Its reward is the share of digits in the answer (something to learn). Per mode:
trained tokens/s over the whole run (trained tokens / wall time of the steps), median step time, time the
generator sat idle (step time - generation time), final reward (mean of the last two steps) and the share of
trained tokens that an earlier policy version sampled. JSON to bench/results/rl.json with the CPU model and ISA;
the last line reads `april vs sync: N.NNx throughput, reward A.AA vs B.BB`.

Without --async-workers, async runs in this process: step n+1's generation runs before step n's update
(one version stale, as on Ray) but nothing overlaps, so its throughput equals sync's; on Ray actors the
generation overlaps training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results  # noqa: E402

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


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")) and not flags:
                flags = line
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "neon" if "asimd" in flags else "other"
    return {"cpu": model, "isa": isa, "cpus": os.cpu_count()}


def run_mode(mode: str, args, out: Path) -> dict:
    from glm5.rl.run import RLConfig, run_rl

    config = RLConfig(out=str(out / mode), preset="nano", env="bench.rl:LongTailEnv", algo="grpo", mode=mode,
                      steps=args.steps, rollout_batch=args.rollout_batch, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, over_sample=2.0, max_staleness=1 if mode != "april" else 2,
                      rollout_workers=args.async_workers if mode == "async" else 0, lr=1e-4, seed=args.seed,
                      save_every=0, threads=args.threads, progress=False)
    run_rl(config, save_model=False)
    records = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    trained = sum(r["trained_tokens"] for r in records)
    seconds = sum(r["step_seconds"] for r in records)
    gen = [r["response_len_mean"] for r in records]
    return {
        "trained_tokens_per_s": trained / seconds, "step_seconds_median": statistics.median(r["step_seconds"] for r in records),
        "generator_idle_s_per_step": statistics.median(
            max(0.0, r["step_seconds"] - r["rollout_seconds"]) for r in records),
        "final_reward": sum(r["reward_mean"] for r in records[-2:]) / len(records[-2:]),
        "offpolicy_token_share": sum(r["offpolicy_token_share"] * r["trained_tokens"] for r in records) / max(trained, 1),
        "response_len_mean": sum(gen) / len(gen), "steps": len(records), "trained_tokens": trained, "seconds": seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="RL steps per mode (default 6)")
    p.add_argument("--rollout-batch", type=int, default=4, help="groups per step (default 4)")
    p.add_argument("--group-size", type=int, default=4, help="responses per group (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the longest answers' budget (default 128)")
    p.add_argument("--async-workers", type=int, default=0, help="Ray rollout actors for the async mode (default 0: in process)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--modes", default="sync,async,april", help="comma-separated modes (default all three)")
    p.add_argument("--out", default="bench/results/rl.json", help="JSON output (default bench/results/rl.json)")
    args = p.parse_args()
    os.environ["GLM5_BENCH_RL_LONGEST"] = str(args.max_new_tokens)  # LongTailEnv is imported by module:attr
    machine = cpu_info()
    print(f"[bench] {machine['cpu']} ({machine['isa']}, {machine['cpus']} cpus), nano preset, {args.steps} steps x "
          f"{args.rollout_batch} groups x {args.group_size}, threads {args.threads}")
    results = {"machine": machine, "args": vars(args), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            r = run_mode(mode, args, Path(tmp))
            results["modes"][mode] = r
            print(f"{mode:6s} {r['trained_tokens_per_s']:8.1f} trained tok/s  step {r['step_seconds_median']:6.2f} s  "
                  f"generator idle {r['generator_idle_s_per_step']:5.2f} s/step  reward {r['final_reward']:.3f}  "
                  f"off-policy {r['offpolicy_token_share']:.2f}  response {r['response_len_mean']:.1f} tok", flush=True)
    modes = results["modes"]
    if "april" in modes and "sync" in modes:
        ratio = modes["april"]["trained_tokens_per_s"] / modes["sync"]["trained_tokens_per_s"]
        results["april_vs_sync_throughput"] = ratio
        write_results(args.out, results)
        print(f"april vs sync: {ratio:.2f}x throughput, reward {modes['april']['final_reward']:.2f} vs "
              f"{modes['sync']['final_reward']:.2f}")
    else:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
