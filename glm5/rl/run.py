"""The RL loop: rollout workers, the buffer and the trainer joined in `sync`, `async` or `april` mode.

    from glm5.rl.run import RLConfig, run_rl
    summary = run_rl(RLConfig(init="runs/demo/model", env="tool-call", mode="april", steps=20, out="runs/rl"))

Modes (slime's shapes; reference figures in README.md):
- sync: generate the batch with the current weights, train on it, sync the weights; staleness 0.
- async: generation of step n+1 runs while step n trains (on Ray actors at the same time), so its tokens are one
  version old when trained; `max_staleness` (>= 1) bounds it (glm5/rl/buffer.py).
- april: over-sample (`over_sample` x the rollout batch of groups), stop generating once the batch's groups are
  done, keep the unfinished episodes (tokens, log-probs, versions, generator state) in the buffer and continue
  them first next step; `mask_offpolicy` trains only on tokens of the current policy. With `overlap` the next
  step's APRIL round runs while this step trains, as async's does (slime's train_async with partial rollouts):
  on Ray the generator no longer waits for the update, nor the trainer for the long tail.

Placement: with `rollout_workers` W >= 1 each worker (its own engine and model copy), the trainer and the
buffer (glm5/rl/buffer.py's RolloutBuffer) are Ray actors (glm5/rl/actors.py) on a local Ray the run starts
(`ray.init(include_dashboard=False)`) or the cluster at `ray_address`; with W = 0 the same objects run in this
process (tests, `make demo`). With `trainer_workers` N > 1 the trainer is a group of N Ray actors in one
torch.distributed process group (`trainer_parallel` ddp or fsdp), each training its slice of the batch's groups
(rollout_batch must divide by N). The loop is the same either way: it calls the objects' methods through
`Placement` (`place.get(place.submit(obj, "method", *args))`), and the summary's "placement" says where each
one ran (Ray actor or not, its process id).

Data flow on Ray: this process asks the buffer for the episodes to run and deals them to the workers by group;
the workers' futures go to the buffer's `collect` in one call, so their answers travel from the workers to the
buffer through Ray's object store, not through here (slime keeps its rollout data on the RolloutManager
actor); `collect` answers only figures (sampled tokens, seconds, aborted episodes, complete groups). A batch
from `take` goes to the trainer as the buffer's future (read here too, for the step's metrics). Checkpoints
read `state_dict` through the buffer actor and a resumed run loads it back into a new one, partial episodes
included.

Each step writes a line of OUT/metrics.jsonl; every `save_every` steps a checkpoint (model, optimizer,
version, buffer with its partial episodes, data position, RNG) is written atomically to OUT/checkpoints/;
`resume` continues from the last one. At the end: OUT/model (safetensors + tokenizer) and OUT/report.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glm5.quant.load import quant_method
from glm5.rl.losses import ALGOS, LossConfig
from glm5.rl.names import MODES, TRAINER_PARALLEL  # torch-free: the command's parser reads them

METRIC_KEYS = ("step", "policy_version", "reward_mean", "reward_std", "response_len_mean", "staleness_mean",
               "staleness_max", "mismatch_kl", "rollout_tokens_per_s", "train_tokens_per_s", "partial_resumed",
               "aborted")


@dataclass
class RLConfig:
    out: str = "runs/rl"
    init: str | None = None  # a model directory with its tokenizer
    preset: str | None = None  # or random weights of a preset + the default tokenizer
    env: str = "tool-call"
    reward: str | None = None  # module:attr
    env_kwargs: dict = field(default_factory=dict)
    algo: str = "grpo"
    mode: str = "sync"
    steps: int = 10
    rollout_batch: int = 4  # groups (prompts) per training step
    group_size: int = 4
    max_new_tokens: int = 48  # per assistant turn
    over_sample: float = 2.0  # april: groups launched / groups needed
    keep_partial_kv: bool = False  # april: a rollout worker keeps its aborted episodes' KV cache for their next step
    overlap: bool = False  # april: the next step's generation runs while this step trains (slime's train_async)
    ternary: bool = False  # train through ternary views, save glm5-ternary (set by load_policy for a ternary --init)
    max_staleness: int = 1  # async / april: no trained token older than this many versions
    rollout_workers: int = 0  # Ray rollout actors (0: everything in this process)
    trainer_workers: int = 1  # trainer ranks (Ray actors in one process group); > 1 needs rollout_workers >= 1
    trainer_parallel: str = "ddp"  # how several trainer ranks split the model: ddp or fsdp
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    seed: int = 0
    resume: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    std_normalization: bool = True
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.0
    mismatch: str = "tis"
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    mask_offpolicy: bool = False
    filter_equal: bool = False
    overlong: str = "keep"
    micro_batch: int = 8
    save_every: int = 1
    keep_last: int = 2
    threads: int = 1
    progress: bool = True
    max_minutes: float = 0.0  # stop after the step that passes this (0: no limit)
    slow_trainer_seconds: float = 0.0  # tests: sleep in every train step (a deliberately slow trainer)

    def loss_config(self) -> LossConfig:
        return LossConfig(algo=self.algo, std_normalization=self.std_normalization, kl_coef=self.kl_coef,
                          kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef, mismatch=self.mismatch,
                          tis_cap=self.tis_cap, icepop_low=self.icepop_low, icepop_high=self.icepop_high)

    def validate(self, need_source: bool = True) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: must be one of {', '.join(MODES)}")
        if self.algo not in ALGOS:
            raise ValueError(f"--algo {self.algo!r}: must be one of {', '.join(ALGOS)}")
        if need_source and (self.init is None) == (self.preset is None):
            raise ValueError("give exactly one of --init DIR and --preset NAME")
        for name in ("steps", "rollout_batch", "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.group_size < 2 and self.algo in ("grpo", "gspo", "cispo", "reinforce++"):
            raise ValueError(f"--group-size 1 with --algo {self.algo}: group-relative advantages need at least "
                             "2 responses per prompt")
        if self.mode == "april" and not self.over_sample >= 1:
            raise ValueError(f"--over-sample {self.over_sample}: must be >= 1")
        if self.mode == "async" and self.max_staleness < 1:
            raise ValueError("--mode async trains on tokens one version old: --max-staleness must be >= 1")
        if self.overlap and self.mode != "april":
            raise ValueError(f"--overlap is april's (--mode {self.mode}): async always overlaps, sync never does")
        if self.overlap and self.max_staleness < 1:
            raise ValueError("--overlap trains on tokens at least one version old: --max-staleness must be >= 1")
        if self.max_staleness < 0 or self.rollout_workers < 0 or self.save_every < 0:
            raise ValueError("--max-staleness, --rollout-workers and --save-every must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip {self.grad_clip}: must be >= 0 (0: no clipping)")
        if self.ternary and self.trainer_parallel == "fsdp" and self.trainer_workers > 1:
            raise ValueError("--ternary runs without FSDP (its parametrized weights are not sharded); use "
                             "--trainer-parallel ddp")
        if self.trainer_workers < 1:
            raise ValueError(f"--trainer-workers {self.trainer_workers}: must be >= 1")
        if self.trainer_parallel not in TRAINER_PARALLEL:
            raise ValueError(f"--trainer-parallel {self.trainer_parallel!r}: must be one of {', '.join(TRAINER_PARALLEL)}")
        if self.trainer_workers > 1 and self.rollout_workers < 1:
            raise ValueError(f"--trainer-workers {self.trainer_workers} runs the trainer ranks as Ray actors: it needs "
                             "--rollout-workers >= 1")
        if self.rollout_batch % self.trainer_workers:
            raise ValueError(f"--rollout-batch {self.rollout_batch} must be a multiple of --trainer-workers "
                             f"{self.trainer_workers}: each trainer rank trains the same number of groups")
        if not self.temperature > 0:
            raise ValueError(f"--temperature {self.temperature}: must be > 0 (RL samples)")
        self.loss_config().validate()


# ---------------------------------------------------------------------------------------------- loading
def check_init_dir(path: str) -> Path:
    """--init must hold a model and its tokenizer (RL renders chats and parses the model's turns)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ValueError(f"--init {directory}: no model there (config.json missing)")
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"--init {directory}: the model has no tokenizer (tokenizer.json missing); RL renders "
                         "chats and parses the model's turns, it needs one")
    return directory


def load_policy(config: RLConfig):
    """-> (model, tokenizer); one-line errors for a missing directory or tokenizer. A glm5-ternary --init sets
    `config.ternary` and gives shadows whose ternary views are its weights (glm5/train/ternary.py); int4 / q2
    inits train from their dequantized weights."""
    from glm5.config import GLM5Config
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import Tokenizer, default_tokenizer

    if config.init is not None and not config.preset:
        directory = check_init_dir(config.init)
        tokenizer = Tokenizer.from_file(directory)
        method = quant_method(directory)
        if method is None:
            model = GLM5ForCausalLM.from_pretrained(directory)
        else:
            from glm5.quant.load import load_any_checkpoint
            from glm5.quant.lowbit_model import dequantize_model

            model = dequantize_model(load_any_checkpoint(str(directory))).float()
            if method == "glm5-ternary":
                from glm5.train.ternary import shadows_from_ternary

                shadows_from_ternary(model)
                config.ternary = True
    else:
        tokenizer = default_tokenizer()
        try:
            cfg = GLM5Config.from_preset(config.preset, vocab_size=tokenizer.vocab_size,
                                         eos_token_id=tokenizer.eos_token_ids, pad_token_id=tokenizer.pad_token_id)
        except (KeyError, ValueError) as err:
            raise ValueError(f"--preset {config.preset!r}: {err}") from None
        torch.manual_seed(config.seed)
        model = GLM5ForCausalLM(cfg)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    return model, tokenizer


def check_inputs(config: RLConfig, need_source: bool = True) -> None:
    """Everything that can be refused before anything runs or is written."""
    from glm5.rl.env import check_env, check_reward, load_reward, make_env

    if config.init is not None and not config.preset:
        check_init_dir(config.init)
        method = quant_method(config.init)
        if method not in (None, "glm5-int4", "glm5-q2mix", "glm5-ternary"):
            raise ValueError(f"--init {config.init}: a {method} checkpoint; RL trains full-precision, int4, q2 or "
                             "ternary models (load it and save it in full precision first)")
        config.ternary = config.ternary or method == "glm5-ternary"  # a ternary model stays ternary
    config.validate(need_source)
    if config.preset is not None:
        from glm5.config import GLM5Config

        try:
            GLM5Config.from_preset(config.preset)
        except (KeyError, ValueError) as err:
            raise ValueError(f"--preset {config.preset!r}: {err}") from None
    env = make_env(config.env, **config.env_kwargs)
    check_env(env, config.env)
    check_reward(load_reward(config.reward), env, config.reward)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if not config.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds an RL run; pass --resume to continue it or choose another --out "
                         "(nothing was overwritten)")


# ---------------------------------------------------------------------------------------------- placement
class Ready:
    """A local call's answer, held the way a Ray future is (Placement(None) runs calls at once)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class Placement:
    """Calls methods of the run's objects: Ray actors (`.remote`, futures) or local objects (at once). A future
    may be an argument of a later call: Ray resolves it in the process the call runs in (a worker's answer
    reaches the buffer actor without passing through this one), and locally it is unwrapped the same way."""

    def __init__(self, ray_module=None):
        self.ray = ray_module

    def submit(self, obj, method: str, *args):
        if self.ray is None:
            args = tuple(a.value if isinstance(a, Ready) else a for a in args)
            return Ready(getattr(obj, method)(*args))
        if hasattr(obj, "submit"):  # a TrainerGroup: the call goes to every rank
            return obj.submit(method, *args)
        return getattr(obj, method).remote(*args)

    def get(self, future):
        if self.ray is None:
            return future.value
        if hasattr(future, "result"):
            return future.result()
        return self.ray.get(future)

    def describe(self, obj):
        """Where `obj` lives: {"class", "ray_actor", "pid"}; a TrainerGroup: a list, one per rank."""
        if hasattr(obj, "ranks"):
            return [self.describe(rank) for rank in obj.ranks]
        if self.ray is not None and isinstance(obj, self.ray.actor.ActorHandle):
            name, pid = self.ray.get(obj.__ray_call__.remote(_where))
            return {"class": name, "ray_actor": True, "pid": pid}
        return {"class": type(obj).__name__, "ray_actor": False, "pid": os.getpid()}


def _where(obj) -> tuple[str, int]:
    return type(obj).__name__, os.getpid()


def _split(items: list, parts: int) -> list[list]:
    """Episodes dealt to workers by group (a group stays on one worker): a group back to the worker that last
    ran it (`Episode.slot`: its partial episodes' KV caches may be kept there), the others to the workers with
    the fewest episodes so far. Each episode's slot is set to the worker it goes to."""
    groups: dict[int, list] = {}
    for ep in items:
        groups.setdefault(ep.group, []).append(ep)
    out = [[] for _ in range(parts)]
    fresh = []
    for eps in groups.values():
        slot = next((ep.slot for ep in eps if 0 <= ep.slot < parts), None)
        if slot is None:
            fresh.append(eps)
        else:
            out[slot] += eps
    for eps in fresh:
        min(out, key=len).extend(eps)
    for i, share in enumerate(out):
        for ep in share:
            ep.slot = i
    return out


# ---------------------------------------------------------------------------------------------- the loop
def run_rl(config: RLConfig, model=None, tokenizer=None, save_model: bool = True) -> dict:
    """The whole run; `model` / `tokenizer` given in memory replace --init / --preset (the demo's RL stage),
    and are left holding the trained weights (ternary: the shadows; OUT/model holds their ternary values)."""
    from glm5.rl.actors import start_actors
    from glm5.train.checkpoints import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state

    check_inputs(config, need_source=model is None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    if model is None or tokenizer is None:
        model, tokenizer = load_policy(config)
    started = time.perf_counter()
    ckpt_dir = out / "checkpoints"
    resumed_state = None
    if config.resume and latest_checkpoint(ckpt_dir) is not None:
        resumed_state = load_checkpoint(latest_checkpoint(ckpt_dir))
    place, trainer, workers, buffer, shutdown = start_actors(config, model, tokenizer)
    try:
        version = 0
        step = 0
        if resumed_state is not None:
            place.get(place.submit(trainer, "load_state_dict", resumed_state["model"]))
            place.get(place.submit(buffer, "load_state_dict", resumed_state["data"]["buffer"]))
            set_rng_state(resumed_state["rng"])
            step = int(resumed_state["step"])
            version = int(resumed_state["model"]["version"])
            _truncate_metrics(out / "metrics.jsonl", step)
        _sync_weights(place, trainer, workers, version)
        metrics_path = out / "metrics.jsonl"
        bar = None
        if config.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.steps, initial=step, desc=f"rl {config.mode}", unit="step", dynamic_ncols=True)
        placement = {"buffer": place.describe(buffer), "trainer": place.describe(trainer),
                     "workers": [place.describe(w) for w in workers]}
        pending = None  # async: the buffer's collect of the next step's generation, in flight while training
        carried_stats = None  # async: that generation's figures, reported with the step that trains on it
        summary_rewards = []
        while step < config.steps:
            if config.max_minutes and time.perf_counter() - started > 60 * config.max_minutes:
                break  # the time budget: stop after a whole step
            step_started = time.perf_counter()
            gen_stats = carried_stats or _no_stats()
            carried_stats = None
            stop, launch = None, config.rollout_batch
            if config.mode == "april":
                launch = math.ceil(config.over_sample * config.rollout_batch)
            complete = place.get(place.submit(buffer, "complete_groups"))
            while complete < config.rollout_batch:
                # async: only the first step (or after groups were filtered / restarted) waits for generation here
                if config.mode == "april":
                    stop = config.rollout_batch - complete
                # the buffer restarts groups that went stale and answers how many are complete
                round_stats = place.get(_collect(place, _launch(place, workers, buffer, config, version, stop, launch),
                                                 buffer, version))
                _add(gen_stats, round_stats)
                complete = round_stats["complete_groups"]
            # all rollout_batch groups or none (filtered / restarted ones leave too few: generate more)
            batch_future = place.submit(buffer, "take", config.rollout_batch, version, True)
            batch = place.get(batch_future)  # read for the step's metrics; the trainer gets the future
            if not batch:
                continue
            train_future = place.submit(trainer, "train_step", batch_future)
            if (config.mode == "async" or config.overlap) and step + 1 < config.steps:
                # step n+1's generation runs with the weights of version n while step n trains; the buffer's
                # collect of it is queued now (Ray runs it once the answers are there). april: one round that
                # goes on while the trainer trains and then stops once the groups the next batch lacks are done
                stop, until = None, None
                if config.overlap:
                    stop = max(1, config.rollout_batch - place.get(place.submit(buffer, "complete_groups")))
                    if place.ray is not None:  # in this process the step is done before generation starts
                        until = getattr(train_future, "refs", None) or [train_future]  # a TrainerGroup: every rank's
                pending = _collect(place, _launch(place, workers, buffer, config, version, stop, launch, until),
                                   buffer, None)
            synced = None
            if pending is not None:
                # the update's weights are queued behind the generation in flight: each worker loads them as soon
                # as its round ends, and the trainer writes them out while the workers still generate
                synced = _send_weights(place, trainer, workers, version + 1)
            train_metrics = place.get(train_future)
            version = int(train_metrics["policy_version"])
            if pending is not None:
                # finished under version - 1: one version stale when trained next step; its rollout figures too
                carried_stats = _add(_no_stats(), place.get(pending))
                pending = None
            # weight sync: every worker reports the version it now generates with
            if synced is None:
                synced = _send_weights(place, trainer, workers, version)
            worker_versions = [place.get(f) for f in synced]
            if worker_versions != [version] * len(workers):
                raise RuntimeError(f"weight sync: the workers report versions {worker_versions}, the trainer {version}")
            step += 1
            episodes = [e for g in batch for e in g]
            rewards = [e.reward for e in episodes]
            mean = sum(rewards) / len(rewards)
            summary_rewards.append(mean)
            record = {
                "step": step, "policy_version": version, "reward_mean": mean,
                "reward_std": (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5,
                "response_len_mean": sum(e.num_sampled for e in episodes) / len(episodes),
                "staleness_mean": train_metrics["staleness_mean"], "staleness_max": train_metrics["staleness_max"],
                "mismatch_kl": train_metrics.get("mismatch_kl", 0.0),
                "rollout_tokens_per_s": gen_stats["sampled"] / gen_stats["seconds"] if gen_stats["seconds"] else 0.0,
                "rollout_seconds": gen_stats["seconds"],
                "train_tokens_per_s": train_metrics["train_tokens_per_s"],
                "partial_resumed": sum(e.resumed > 0 for e in episodes), "aborted": gen_stats["aborted"],
                "partial_kv_kept": gen_stats["kv_resumed"],
                "failed_episodes": sum(e.status == "failed" for e in episodes),
                "exact_share": sum(r >= 1.0 for r in rewards) / len(rewards),
                "groups_with_success": sum(any(e.reward >= 1.0 for e in g) for g in batch),
                "offpolicy_token_share": train_metrics["offpolicy_token_share"],
                "step_seconds": time.perf_counter() - step_started, "worker_versions": worker_versions,
                **{k: train_metrics[k] for k in ("pg_loss", "entropy", "kl", "grad_norm", "clip_frac",
                                                  "trained_tokens") if k in train_metrics},
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{mean:.3f}", len=f"{record['response_len_mean']:.0f}")
            if config.save_every and (step % config.save_every == 0 or step == config.steps) and pending is None:
                state = place.get(place.submit(trainer, "state_dict"))
                save_checkpoint(ckpt_dir, step, {"model": state, "optimizer": {}, "step": step, "stage": "rl",
                                                 "data": {"buffer": place.get(place.submit(buffer, "state_dict"))},
                                                 "rng": rng_state(),
                                                 "config": asdict(config)}, keep_last=config.keep_last)
        if bar is not None:
            bar.close()
        if pending is not None:
            place.get(pending)
        final = place.get(place.submit(trainer, "state_dict"))
    finally:
        shutdown()
    if config.ternary:
        from glm5.train.ternary import remove_ternary

        remove_ternary(model)  # in this process the trainer's model is this one, its views still on
    model.load_state_dict(final["model"])  # ternary: the shadows
    model_dir = out / "model"
    report = None
    if save_model:
        if config.ternary:  # the trained forward's ternary weights exactly, packed (glm5-ternary)
            from glm5.config import GLM5Config
            from glm5.quant.lowbit_model import quantize_model_lowbit, save_quantized

            packed = quantize_model_lowbit(copy.deepcopy(model), "glm5-ternary")
            if config.init and quant_method(config.init) == "glm5-ternary":  # the unquantized rest as it came
                saved = GLM5Config.from_pretrained(config.init).torch_dtype
                packed = packed.to(getattr(torch, saved)) if saved in ("bfloat16", "float16") else packed
            save_quantized(packed, model_dir)
        else:
            model.save_pretrained(model_dir)
        tokenizer.save(model_dir)
        from glm5.rl.report import write_rl_report

        report = write_rl_report(out, config)
    return {"model": str(model_dir), "report": str(report), "metrics": str(metrics_path), "steps": step,
            "policy_version": version, "reward_first": summary_rewards[0] if summary_rewards else None,
            "reward_last": summary_rewards[-1] if summary_rewards else None, "placement": placement}


def _sync_weights(place, trainer, workers, version: int) -> list[int]:
    """The trainer's weights to every worker with their version; -> the versions the workers report."""
    return [place.get(f) for f in _send_weights(place, trainer, workers, version)]


def _send_weights(place, trainer, workers, version: int) -> list:
    """Queue the trainer's current weights (after the calls already queued on it) on every worker (after the calls
    queued on it), tagged `version`; -> the futures of the versions the workers will report. On Ray the weights
    stay a future (rank 0's object for a TrainerGroup, once every rank is done): each worker reads it from the
    object store, none passes through this process, and the workers load them at the same time."""
    weights = place.submit(trainer, "weights")
    if hasattr(weights, "value_ref"):  # a TrainerGroup's call: rank 0 holds the weights
        weights = weights.value_ref()
    return [place.submit(w, "set_weights", weights, version) for w in workers]


def _launch(place, workers, buffer, config, version, stop_after_groups, launch=None, until=None):
    """Hand episodes to the workers; -> their futures. `until`: the trainer's step in flight, as Ray futures (a
    worker generates past its stop until that step is done)."""
    episodes = place.get(place.submit(buffer, "episodes_to_run", launch or config.rollout_batch, version))
    shares = _split(episodes, len(workers))
    futures = []
    for w, share in zip(workers, shares):
        if not share:
            continue
        stop = None if stop_after_groups is None else max(1, math.ceil(stop_after_groups / len(workers)))
        futures.append(place.submit(w, "generate", share, stop, *([] if until is None else [until])))
    return futures


def _collect(place, futures, buffer, restart_version):
    """The workers' futures handed to the buffer in one call (their answers go to it, not through here);
    -> the future of its figures (seconds, sampled, aborted, complete_groups)."""
    return place.submit(buffer, "collect", restart_version, *futures)


def _no_stats() -> dict:
    return {"tokens": 0, "sampled": 0, "seconds": 0.0, "aborted": 0, "kv_resumed": 0, "resumed": 0, "failed": 0}


def _add(stats: dict, more: dict) -> dict:
    for key in ("seconds", "sampled", "aborted", "kv_resumed"):
        stats[key] += more[key]
    return stats


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past `step` (the resumed run logs them again) and a line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
