"""The run's roles as objects that Ray can place: rollout workers (each with its own engine), the trainer.

    place, trainer, workers, shutdown = start_actors(config, model, tokenizer)
    place.get(place.submit(workers[0], "generate", episodes, None))    # -> (done, partial, info)

With `config.rollout_workers` W >= 1 these are Ray actors (`ray.remote`) on a local Ray started here
(`ray.init(include_dashboard=False, num_cpus=...)`, Ray's own logging kept to warnings) or on the cluster at
`config.ray_address`; with W = 0 they are plain objects in this process. Ray does the placement and the
transport (weights travel as a CPU state dict, tagged with their policy version); nothing here opens a socket
or a process of its own. The trainer runs on one device here; a trainer with several devices would wrap its
model with glm5/train/parallel.py (DDP / FSDP2) inside the actor.
"""

from __future__ import annotations

import copy
import logging
import time


class RolloutActor:
    """A RolloutWorker behind a small interface: generate, set_weights, version."""

    def __init__(self, model, tokenizer_json: str, config) -> None:
        import torch

        from glm5.rl.rollout import RolloutWorker

        if config.threads:
            torch.set_num_threads(config.threads)
        tokenizer = _tokenizer_from_json(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
        self.worker = RolloutWorker(model, tokenizer, config.env, max_new_tokens=config.max_new_tokens,
                                    temperature=config.temperature, top_p=config.top_p, reward=config.reward,
                                    env_kwargs=config.env_kwargs)

    def generate(self, episodes, stop_after_groups):
        before, started = sum(len(e.tokens) for e in episodes), time.perf_counter()
        done, partial = self.worker.generate(episodes, stop_after_groups=stop_after_groups)
        # new tokens of this call (observations included: they were prefilled, a small share)
        after = sum(len(e.tokens) for e in done + partial)
        return done, partial, {"seconds": time.perf_counter() - started, "sampled": after - before,
                               "version": self.worker.version}

    def set_weights(self, state_dict, version: int) -> int:
        return self.worker.set_weights(state_dict, version)

    def version(self) -> int:
        return self.worker.version


class TrainerActor:
    """The RLTrainer behind train_step / weights / state_dict / load_state_dict."""

    def __init__(self, model, config) -> None:
        import torch

        from glm5.rl.trainer import RLTrainer, TrainerConfig

        if config.threads:
            torch.set_num_threads(config.threads)
        self.slow = config.slow_trainer_seconds
        self.trainer = RLTrainer(model, TrainerConfig(
            loss=config.loss_config(), lr=config.lr, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
            mask_offpolicy=config.mask_offpolicy, overlong=config.overlong, micro_batch=config.micro_batch),
            group_size=config.group_size)

    def train_step(self, groups):
        if self.slow:
            time.sleep(self.slow)
        metrics = self.trainer.train_step(groups)
        metrics["policy_version"] = self.trainer.version
        return metrics

    def weights(self):
        return self.trainer.weights()

    def state_dict(self):
        import torch

        from glm5.train.checkpoints import rng_state

        return {**self.trainer.state_dict(), "torch_rng": torch.get_rng_state(), "rng": rng_state()}

    def load_state_dict(self, state):
        self.trainer.load_state_dict(state)
        return self.trainer.version


def _tokenizer_from_json(text: str):
    import tokenizers

    from glm5.tokenizer import Tokenizer

    return Tokenizer(tokenizers.Tokenizer.from_str(text))


def start_actors(config, model, tokenizer):
    """-> (placement, trainer, [workers], shutdown())."""
    from glm5.rl.run import Placement

    if config.rollout_workers == 0:
        workers = [RolloutActor(copy.deepcopy(model), tokenizer, config)]
        return Placement(None), TrainerActor(model, config), workers, lambda: None
    import ray

    started_here = False
    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, num_cpus=config.ray_num_cpus or config.rollout_workers + 1,
                     logging_level=logging.WARNING, log_to_driver=False)
        started_here = True
    tokenizer_json = tokenizer.backend.to_str()
    # each actor asks for no CPU of Ray's budget: on a small machine they share the cores (torch threads are
    # set per actor), and a 2-core machine can still place W workers + a trainer
    remote_worker = ray.remote(num_cpus=0)(RolloutActor)
    remote_trainer = ray.remote(num_cpus=0)(TrainerActor)
    trainer = remote_trainer.remote(model, config)
    workers = [remote_worker.remote(model, tokenizer_json, config) for _ in range(config.rollout_workers)]

    def shutdown():
        for actor in [trainer, *workers]:
            ray.kill(actor)
        if started_here:
            ray.shutdown()

    return Placement(ray), trainer, workers, shutdown
