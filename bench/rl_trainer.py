"""RL trainer step time: one trainer vs a group of trainer ranks (DDP / FSDP2 over gloo), all Ray actors.

    PYTHONPATH=. .venv/bin/python bench/rl_trainer.py                 # nano preset, 8 groups x 4, 4 timed steps
    PYTHONPATH=. .venv/bin/python bench/rl_trainer.py --groups 4 --steps 2 --response 16

The same batch (random prompts and responses of fixed lengths, rewards spread within each group) and the same
starting weights for every setup: 1 rank x 1 thread, 1 rank x 2 threads (the same cores used by torch's own
threads, the peer), 2 ranks x 1 thread with DDP, and with FSDP2. Each runs one untimed step, then `--steps`
timed ones; per setup the median step time (the driver's wall time of train_step, the ranks' slowest), trained
tokens/s, and the first step's gradient (AdamW's first moment) and update against the 1 x 1 trainer's, relative
to their size: the gradient agrees to fp32 rounding; AdamW's first update g / (|g| + eps) magnifies the
rounding of elements with |g| near eps, so the update agrees less closely. JSON to bench/results/rl_trainer.json
with the CPU; the last line compares 2 DDP ranks with the faster single-rank setup:
`2 ranks ddp vs 1 rank (1 rank x T threads): N.NNx`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results  # noqa: E402


def make_batch(groups: int, group_size: int, prompt: int, response: int, vocab: int, seed: int = 0):
    import torch

    from glm5.rl.rollout import Episode

    gen = torch.Generator().manual_seed(seed)
    batch = []
    for g in range(groups):
        group = []
        for i in range(group_size):
            ep = Episode(group=g, index=i, env_seed=g, sample_seed=i,
                         prompt_ids=torch.randint(0, vocab, (prompt,), generator=gen).tolist(),
                         tokens=torch.randint(0, vocab, (response,), generator=gen).tolist())
            ep.loss_mask, ep.versions, ep.logprobs = [1] * response, [0] * response, [-5.0] * response
            ep.rewards = [float(torch.rand((), generator=gen))]
            group.append(ep)
        batch.append(group)
    return batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="nano", help="model preset (default nano)")
    p.add_argument("--groups", type=int, default=8, help="groups per batch (default 8)")
    p.add_argument("--group-size", type=int, default=4, help="responses per group (default 4)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--response", type=int, default=32, help="response tokens (default 32)")
    p.add_argument("--micro-batch", type=int, default=8, help="responses per forward (default 8)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setup (default 4)")
    p.add_argument("--out", default="bench/results/rl_trainer.json", help="JSON output")
    args = p.parse_args(argv)

    import ray
    import torch

    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.rl.actors import TrainerActor, TrainerGroup
    from glm5.rl.run import RLConfig

    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_preset(args.preset))
    batch = make_batch(args.groups, args.group_size, args.prompt, args.response, model.config.vocab_size)
    base = RLConfig(group_size=args.group_size, rollout_batch=args.groups, lr=1e-4, micro_batch=args.micro_batch,
                    rollout_workers=1)
    start = torch.cat([v.float().flatten() for _, v in sorted(model.state_dict().items())])
    setups = [("1 rank x 1 thread", dict(trainer_workers=1, threads=1)),
              ("1 rank x 2 threads", dict(trainer_workers=1, threads=2)),
              ("2 ranks ddp x 1 thread", dict(trainer_workers=2, trainer_parallel="ddp", threads=1)),
              ("2 ranks fsdp x 1 thread", dict(trainer_workers=2, trainer_parallel="fsdp", threads=1))]
    ray.init(include_dashboard=False, num_cpus=2, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    rows, reference = [], None
    try:
        for name, overrides in setups:
            config = dataclasses.replace(base, **overrides)
            if config.trainer_workers > 1:
                trainer = TrainerGroup(ray, model, config)
                step, state, stop = trainer.train_step, trainer.state_dict, trainer.kill
            else:
                actor = ray.remote(num_cpus=0)(TrainerActor).remote(model, config)
                step = lambda b, a=actor: ray.get(a.train_step.remote(b))  # noqa: E731
                state = lambda a=actor: ray.get(a.state_dict.remote())  # noqa: E731
                stop = lambda a=actor: ray.kill(a)  # noqa: E731
            try:
                metrics = step(batch)  # untimed: the first step builds AdamW's state
                first = state()
                update = torch.cat([v.float().flatten() for _, v in sorted(first["model"].items())]) - start
                moments = first["optimizer"]["optimizers"][0]["state"]
                moment = torch.cat([moments[i]["exp_avg"].flatten() for i in sorted(moments)])
                times = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    metrics = step(batch)
                    times.append(time.perf_counter() - t)
            finally:
                stop()
            reference = (update, moment) if reference is None else reference
            median = statistics.median(times)
            row = {"setup": name, "median_step_s": median, "trained_tokens_per_s": metrics["trained_tokens"] / median,
                   "first_update_vs_1x1": float((update - reference[0]).norm() / reference[0].norm()),
                   "first_moment_vs_1x1": float((moment - reference[1]).norm() / reference[1].norm()),
                   "step_times_s": times}
            rows.append(row)
            print(f"{name:26s} {median:7.3f} s/step  {row['trained_tokens_per_s']:8.1f} tok/s  "
                  f"vs 1x1: gradient (AdamW's first moment) {row['first_moment_vs_1x1']:.1e}, update "
                  f"{row['first_update_vs_1x1']:.1e}")
    finally:
        ray.shutdown()
    by = {r["setup"]: r for r in rows}
    best = min((by[k] for k in ("1 rank x 1 thread", "1 rank x 2 threads")), key=lambda r: r["median_step_s"])
    ratio = best["median_step_s"] / by["2 ranks ddp x 1 thread"]["median_step_s"]
    write_results(args.out, {"benchmark": "rl_trainer", "args": vars(args), "results": rows,
                             "ddp2_vs_best_1rank": ratio, "best_1rank": best["setup"]})
    print(f"2 ranks ddp vs 1 rank ({best['setup']}): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
