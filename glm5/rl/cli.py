"""`glm5 rl`: reinforcement learning of a GLM-5 model on an environment, sync / async / APRIL, on Ray.

    glm5 rl --init runs/demo/model --env tool-call --algo grpo --mode april --steps 20 --rollout-batch 4 \\
        --group-size 4 --max-new-tokens 48 --out runs/rl
    glm5 rl --preset nano --env countdown --algo gspo --mode async --max-staleness 2 --rollout-workers 2 ...
    glm5 rl ... --rollout-workers 1 --trainer-workers 2 --trainer-parallel fsdp   # 2 trainer ranks (Ray actors)
    glm5 rl ... --env my_pkg.envs:MyEnv --reward my_pkg.rewards:score     # your own env / reward
    glm5 rl ... --resume                                                   # after a crash or kill -9

Writes OUT/metrics.jsonl (one line per step), OUT/checkpoints/ (resume), OUT/model/ (loadable by
GLM5ForCausalLM.from_pretrained, LLM.from_pretrained and `glm5 serve --model`) and OUT/report.md with plots.
Every input is checked before anything runs; nothing in OUT is overwritten without --resume.
"""

from __future__ import annotations

import argparse


def config_from_args(args):
    from glm5.rl.run import RLConfig

    return RLConfig(
        out=args.out, init=args.init, preset=args.preset, env=args.env, reward=args.reward, algo=args.algo,
        mode=args.mode, steps=args.steps, rollout_batch=args.rollout_batch, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, over_sample=args.over_sample, keep_partial_kv=args.keep_partial_kv,
        overlap=args.overlap, ternary=args.ternary, max_staleness=args.max_staleness,
        rollout_workers=args.rollout_workers, trainer_workers=args.trainer_workers,
        trainer_parallel=args.trainer_parallel, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
        seed=args.seed, resume=args.resume, temperature=args.temperature, top_p=args.top_p, lr=args.lr,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, std_normalization=not args.disable_std_normalization,
        kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef, mismatch=args.mismatch,
        tis_cap=args.tis_cap, icepop_low=args.icepop_low, icepop_high=args.icepop_high,
        mask_offpolicy=args.mask_offpolicy, filter_equal=args.filter_equal, overlong=args.overlong,
        micro_batch=args.micro_batch, save_every=args.save_every, threads=args.threads, progress=not args.no_progress,
    )


def run(args) -> int:
    from glm5.rl.run import check_inputs, run_rl

    config = config_from_args(args)
    check_inputs(config)  # one-line errors before Ray or a model is started
    summary = run_rl(config)
    print(f"rl: {summary['steps']} steps, policy version {summary['policy_version']}, reward "
          f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f}")
    if config.ternary:
        print(f"model:   {summary['model']}  (glm5-ternary: the trained ternary weights, packed; LLM.from_pretrained / "
              "glm5 serve --model / load_any_checkpoint)")
    else:
        print(f"model:   {summary['model']}  (GLM5ForCausalLM.from_pretrained / LLM.from_pretrained / glm5 serve --model)")
    print(f"report:  {summary['report']}")
    print(f"metrics: {summary['metrics']}")
    print(f"placement: {placement_line(summary['placement'])}")
    return 0


def placement_line(placement: dict) -> str:
    """run_rl's summary["placement"] in a line: where the workers, the trainer (ranks) and the buffer ran."""
    ranks = placement["trainer"] if isinstance(placement["trainer"], list) else [placement["trainer"]]
    roles = [placement["buffer"], *ranks, *placement["workers"]]
    where = "Ray actors" if all(r["ray_actor"] for r in roles) else "in this process"
    return (f"{len(placement['workers'])} rollout worker(s), trainer ({len(ranks)} rank(s)) and buffer: {where} "
            f"(pids {', '.join(str(r['pid']) for r in roles)})")


def register(subparsers) -> None:
    from glm5.common import int_at_least
    from glm5.rl.names import ALGOS, KL_ESTIMATORS, MISMATCH_FIXES, MODES, OVERLONG, TRAINER_PARALLEL

    p = subparsers.add_parser("rl", help="reinforcement learning on an environment (sync / async / APRIL, Ray)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--init", help="the starting model: a directory with config.json, safetensors and tokenizer.json")
    src.add_argument("--preset", help="start from random weights of a preset (with the default tokenizer)")
    p.add_argument("--env", required=True, help="tool-call, calculator, countdown, or module:attr of your own env")
    p.add_argument("--reward", default=None, help="module:attr of a reward function score(messages, env) -> float "
                   "(default: the env's own rewards)")
    p.add_argument("--algo", choices=ALGOS, default="grpo", help="policy objective (default grpo)")
    p.add_argument("--mode", choices=MODES, default="sync", help="sync, async (generation overlaps training) or "
                   "april (over-sample, abort the long tail, continue it next step) (default sync)")
    p.add_argument("--steps", type=int_at_least(1), required=True, help="training steps (policy updates)")
    p.add_argument("--rollout-batch", type=int_at_least(1), required=True, help="prompts (groups) per step")
    p.add_argument("--group-size", type=int_at_least(1), required=True, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int_at_least(1), required=True, help="tokens per assistant turn at most")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--over-sample", type=float, default=2.0, help="april: groups launched / groups needed (default 2.0)")
    p.add_argument("--keep-partial-kv", action="store_true",
                   help="april: each rollout worker keeps its aborted episodes' KV cache and continues them there "
                   "after the weight update, instead of prefilling them again (their cached latents then come from "
                   "the weights that sampled them, measured by mismatch_kl)")
    p.add_argument("--overlap", action="store_true",
                   help="april: the next step's generation (over-sampled, stopped once the batch is full) runs while "
                   "this step trains, on Ray actors at the same time; trained tokens are then at least one version "
                   "old (needs --max-staleness >= 1)")
    p.add_argument("--ternary", action="store_true",
                   help="1.58-bit RL: the trainer updates full-precision shadows through absmean-ternary views "
                   "(BitNet b1.58's straight-through estimator), the workers generate with the ternary weights, "
                   "OUT/model is glm5-ternary; on by itself when --init is a glm5-ternary model")
    p.add_argument("--max-staleness", type=int_at_least(0), default=1,
                   help="async / april: no trained token older than this many policy versions (default 1)")
    p.add_argument("--rollout-workers", type=int_at_least(0), default=1,
                   help="Ray rollout actors, each with its own engine (0: no Ray, all in this process; default 1)")
    p.add_argument("--trainer-workers", type=int_at_least(1), default=1,
                   help="trainer ranks: Ray actors in one torch.distributed process group, each training its share "
                   "of the groups (--rollout-batch must divide by it; > 1 needs --rollout-workers >= 1; default 1)")
    p.add_argument("--trainer-parallel", choices=TRAINER_PARALLEL, default="ddp",
                   help="how several trainer ranks hold the model: ddp (a replica each) or fsdp (FSDP2 shards) "
                   "(default ddp)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--ray-num-cpus", type=int_at_least(1), default=None, help="CPUs of the local Ray (default: workers + 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and samples (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: none; default 1.0)")
    p.add_argument("--disable-std-normalization", action="store_true",
                   help="GRPO advantages without dividing by the group's std (Dr. GRPO)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="weight of the KL to the starting model (default 0: no reference)")
    p.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default="low_var_kl", help="KL estimator (default low_var_kl)")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight (default 0)")
    p.add_argument("--mismatch", choices=MISMATCH_FIXES, default="tis",
                   help="engine/trainer log-prob mismatch: tis (capped IS weight), icepop (mask), none (default tis)")
    p.add_argument("--tis-cap", type=float, default=2.0, help="TIS weight cap (default 2.0)")
    p.add_argument("--icepop-low", type=float, default=0.5, help="IcePop: lowest kept ratio (default 0.5)")
    p.add_argument("--icepop-high", type=float, default=2.0, help="IcePop: highest kept ratio (default 2.0)")
    p.add_argument("--mask-offpolicy", action="store_true", help="train only on tokens the current policy sampled")
    p.add_argument("--filter-equal", action="store_true", help="drop groups whose rewards are all equal (dynamic sampling)")
    p.add_argument("--overlong", choices=OVERLONG, default="keep",
                   help="responses cut at --max-new-tokens: keep, mask (no loss) or penalty (default keep)")
    p.add_argument("--micro-batch", type=int_at_least(1), default=8, help="responses per trainer forward (default 8)")
    p.add_argument("--save-every", type=int_at_least(0), default=1, help="checkpoint every N steps (default 1)")
    p.add_argument("--threads", type=int_at_least(0), default=1, help="torch threads per actor (0: torch's choice; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
