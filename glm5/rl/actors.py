"""The run's roles as objects that Ray can place: rollout workers (each with its own engine), the trainer and
the rollout buffer.

    place, trainer, workers, buffer, shutdown = start_actors(config, model, tokenizer)
    answer = place.submit(workers[0], "generate", episodes, None)       # a future of (done, partial, info)
    place.get(place.submit(buffer, "collect", version, answer))         # the answer goes to the buffer itself
    place.get(place.submit(trainer, "train_step", groups))              # one trainer or a TrainerGroup of N ranks

With `config.rollout_workers` W >= 1 these are Ray actors (`ray.remote(num_cpus=0)`: W workers, the trainer,
glm5/rl/buffer.py's RolloutBuffer) on a local Ray started here (`ray.init(include_dashboard=False,
num_cpus=...)`, Ray's own logging kept to warnings) or on the cluster at `config.ray_address`; with W = 0 they
are plain objects in this process. Ray does the placement and the transport (weights travel as a CPU state
dict, tagged with their policy version; episodes as dataclasses in its object store, a future handed to
another actor's call resolved where that call runs); nothing here talks over a socket or starts a process of
its own.

With `config.trainer_workers` N > 1 the trainer is a TrainerGroup, slime's training group: N TrainerActor
ranks, Ray actors that join one torch.distributed process group (gloo on CPU, nccl when the model it is given
lives on CUDA; `glm5 rl` keeps its models on the CPU). Rank 0 reports its node's address and a port the OS
found free (binding and closing a socket, through Ray, as slime and OpenRLHF do); every rank then calls
init_process_group with MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE, and torch.distributed does the
transport. Each rank's RLTrainer wraps the model with glm5/train/parallel.py (`config.trainer_parallel`: DDP or
FSDP2) and trains its slice of the batch's groups (glm5/rl/trainer.py); the group fans every call out to all
ranks and returns rank 0's answer (metrics reduced over ranks, full weights and state).
"""

from __future__ import annotations

import copy
import logging
import os
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
                                    env_kwargs=config.env_kwargs,
                                    keep_partial_kv=config.mode == "april" and config.keep_partial_kv)

    def generate(self, episodes, stop_after_groups, until=None):
        """`until`: futures (Ray ObjectRefs, in a list so that Ray hands them over unresolved), the trainer's
        step in flight: past `stop_after_groups` the round goes on until they are all ready."""
        before, started = sum(len(e.tokens) for e in episodes), time.perf_counter()
        kv_before = self.worker.stats["kv_resumed"]
        keep_going = None
        if until:
            import ray

            def keep_going():  # ray.wait with no timeout only looks
                return bool(ray.wait(until, num_returns=len(until), timeout=0)[1])

        done, partial = self.worker.generate(episodes, stop_after_groups=stop_after_groups, keep_going=keep_going)
        # new tokens of this call (observations included: they were prefilled, a small share)
        after = sum(len(e.tokens) for e in done + partial)
        return done, partial, {"seconds": time.perf_counter() - started, "sampled": after - before,
                               "version": self.worker.version, "kv_resumed": self.worker.stats["kv_resumed"] - kv_before}

    def set_weights(self, state_dict, version: int) -> int:
        if isinstance(state_dict, PackedWeights):
            state_dict = state_dict.unpack()
        return self.worker.set_weights(state_dict, version)

    def version(self) -> int:
        return self.worker.version


class TrainerActor:
    """The RLTrainer behind train_step / weights / state_dict / load_state_dict. One rank of a TrainerGroup when
    world_size > 1: the trainer is built in join(), inside the process group. `pack`: weights() answers
    PackedWeights (a Ray actor's answer for the workers) instead of the state dict."""

    def __init__(self, model, config, rank: int = 0, world_size: int = 1, pack: bool = False) -> None:
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        self.slow = config.slow_trainer_seconds
        self.rank, self.world_size, self.pack = rank, world_size, pack
        self.trainer = None
        self._model, self._config = model, config
        if world_size == 1:
            self._build()

    def _build(self) -> None:
        from glm5.rl.trainer import RLTrainer, TrainerConfig

        config = self._config
        self.trainer = RLTrainer(self._model, TrainerConfig(
            loss=config.loss_config(), lr=config.lr, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
            mask_offpolicy=config.mask_offpolicy, overlong=config.overlong, micro_batch=config.micro_batch,
            parallel=config.trainer_parallel, ternary=config.ternary), group_size=config.group_size)
        self._model = None

    def address(self) -> tuple[str, int]:
        """Rank 0: this node's address and a port free on it, for the others' MASTER_ADDR / MASTER_PORT."""
        import socket

        import ray

        with socket.socket() as sock:  # the OS picks a free port; torch.distributed's store listens on it
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, master_addr: str, master_port: int) -> int:
        """Join the process group (env:// rendezvous) and build the trainer inside it; -> this rank."""
        from glm5.train.parallel import init_distributed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        device = next(self._model.parameters()).device
        rank, _ = init_distributed(device)
        self._build()
        return rank

    def train_step(self, groups):
        if self.slow:
            time.sleep(self.slow)
        metrics = self.trainer.train_step(groups)
        metrics["policy_version"] = self.trainer.version
        return metrics

    def weights(self):
        state = self.trainer.weights()
        return PackedWeights(state) if self.pack and state else state  # {} on ranks other than 0

    def state_dict(self):
        import torch

        from glm5.train.checkpoints import rng_state

        return {**self.trainer.state_dict(), "torch_rng": torch.get_rng_state(), "rng": rng_state()}

    def load_state_dict(self, state):
        self.trainer.load_state_dict(state)
        return self.trainer.version


class PackedWeights:
    """A state dict as one byte array (numpy) and its layout: what the trainer hands Ray for the workers.

    Ray serializes a numpy array out of band, one copy into its object store, and a reader on the same node maps
    it without copying; a dict of torch tensors is pickled tensor by tensor instead (measured with the nano
    preset's 30 MB of weights: 50 ms to put, 12 ms to get, against 32 ms and < 1 ms), and the weight sync lies
    on the critical path of every step. unpack() views the bytes as the tensors again (read-only: the worker
    copies them into its model)."""

    ALIGN = 64  # each tensor starts on a 64-byte boundary, so that a byte view can be re-viewed as its dtype

    def __init__(self, state: dict) -> None:
        import numpy as np
        import torch

        self.layout, offset = [], 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            self.layout.append((name, t.dtype, tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        buf = torch.empty(offset, dtype=torch.uint8)
        for (_, _, _, start, nbytes), t in zip(self.layout, state.values()):
            if nbytes:
                buf[start:start + nbytes] = t.detach().contiguous().reshape(-1).view(torch.uint8)
        self.data: np.ndarray = buf.numpy()

    def unpack(self) -> dict:
        import warnings

        import torch

        with warnings.catch_warnings():  # Ray hands the bytes over read-only; nothing here writes them
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.from_numpy(self.data)
        return {name: buf[start:start + nbytes].view(dtype).reshape(shape)
                for name, dtype, shape, start, nbytes in self.layout}


class GroupCall:
    """A call in flight on every rank of a TrainerGroup; result() is rank 0's answer."""

    def __init__(self, ray_module, refs):
        self.ray, self.refs = ray_module, refs

    def result(self):
        pending = list(self.refs)
        while pending:  # a rank's error surfaces at once (the others would wait in a collective for it)
            ready, pending = self.ray.wait(pending, num_returns=1)
            self.ray.get(ready[0])
        return self.ray.get(self.refs[0])

    def value_ref(self):
        """Rank 0's answer as a future, an argument for another actor's call (its value is not fetched into this
        process; an error of rank 0 surfaces in that call), once the other ranks are done (their errors here)."""
        self.ray.get(self.refs[1:])  # the other ranks' answers are small ({} for weights)
        return self.refs[0]


class TrainerGroup:
    """N TrainerActor ranks (Ray actors) in one process group, used like one trainer: submit(method, *args)
    calls it on every rank (arguments put in Ray's object store once) and returns a GroupCall; train_step,
    weights, state_dict and load_state_dict wait for it and return rank 0's answer."""

    def __init__(self, ray_module, model, config):
        self.ray = ray_module
        n = config.trainer_workers
        # num_cpus=0 as the other actors: on a small machine the ranks share the cores (one torch thread each)
        remote = ray_module.remote(num_cpus=0)(TrainerActor)
        model_ref = ray_module.put(model)  # one copy in the object store, read by every rank
        self.ranks = [remote.remote(model_ref, config, rank, n, True) for rank in range(n)]
        try:
            addr, port = ray_module.get(self.ranks[0].address.remote())
            GroupCall(ray_module, [r.join.remote(addr, port) for r in self.ranks]).result()
        except Exception:
            self.kill()
            raise

    def submit(self, method: str, *args) -> GroupCall:
        # a future (an ObjectRef, e.g. the buffer's batch) is passed on as it is: each rank reads its object
        args = tuple(a if isinstance(a, self.ray.ObjectRef) else self.ray.put(a) for a in args)
        return GroupCall(self.ray, [getattr(r, method).remote(*args) for r in self.ranks])

    def train_step(self, groups):
        return self.submit("train_step", groups).result()

    def weights(self):
        state = self.submit("weights").result()
        return state.unpack() if isinstance(state, PackedWeights) else state

    def state_dict(self):
        return self.submit("state_dict").result()

    def load_state_dict(self, state):
        return self.submit("load_state_dict", state).result()

    def kill(self) -> None:
        for r in self.ranks:
            self.ray.kill(r)


def _tokenizer_from_json(text: str):
    import tokenizers

    from glm5.tokenizer import Tokenizer

    return Tokenizer(tokenizers.Tokenizer.from_str(text))


def start_actors(config, model, tokenizer):
    """-> (placement, trainer, [workers], buffer, shutdown()); the trainer is a TrainerGroup when
    trainer_workers > 1, the buffer a RolloutBuffer (a Ray actor like the others when rollout_workers >= 1)."""
    from glm5.rl.buffer import RolloutBuffer
    from glm5.rl.run import Placement

    # sync trains each batch with the weights that sampled it: no staleness allowed
    buffer_args = (config.group_size, config.seed, config.max_staleness if config.mode != "sync" else 0,
                   config.filter_equal)
    if config.rollout_workers == 0:
        workers = [RolloutActor(copy.deepcopy(model), tokenizer, config)]
        return Placement(None), TrainerActor(model, config), workers, RolloutBuffer(*buffer_args), lambda: None
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
    actors = []
    try:
        if config.trainer_workers > 1:
            trainer = TrainerGroup(ray, model, config)
            actors += trainer.ranks
        else:
            trainer = ray.remote(num_cpus=0)(TrainerActor).remote(model, config, 0, 1, True)
            actors.append(trainer)
        workers = [remote_worker.remote(model, tokenizer_json, config) for _ in range(config.rollout_workers)]
        actors += workers
        buffer = ray.remote(num_cpus=0)(RolloutBuffer).remote(*buffer_args)
        actors.append(buffer)
    except Exception:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
        raise

    def shutdown():
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()

    return Placement(ray), trainer, workers, buffer, shutdown
