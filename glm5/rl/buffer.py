"""The rollout buffer: the data position, finished groups waiting to be trained, partial episodes (APRIL),
and the staleness bound.

    buffer = RolloutBuffer(group_size=4, seed=0, max_staleness=1)
    episodes = buffer.episodes_to_run(num_groups=8, version=3)   # partial ones first, then new prompts
    buffer.put(done, partial)                                    # a worker's results
    stats = buffer.collect(3, *answers)                          # workers' (done, partial, info) answers at once
    groups = buffer.take(4, version=3)                           # 4 complete groups within the bound, oldest first
    state = buffer.state_dict(); buffer.load_state_dict(state)   # resume: partial episodes included

Staleness of a token = the trainer's policy version when it is trained - the version that sampled it. Bound
K (`--max-staleness`): a partial episode whose oldest sampled token would be older than K versions is
restarted (its tokens dropped, the same prompt and seed generated again) before it is continued, and a
finished group found too old when a batch is taken is restarted the same way; so no trained token is older
than K versions (`take` checks it). The data position (the next prompt index) only moves forward, so a
resumed run continues with the prompts an uninterrupted one would have used.

In a run with Ray rollout workers this object is a Ray actor beside them (glm5/rl/actors.py; slime keeps its
rollout data buffer on the RolloutManager actor). The workers' answers go straight to it: the loop passes
their futures to `collect` and Ray resolves them in the buffer's process. A batch from `take` goes to the
trainer by reference (Ray's object store); the loop reads it only for the step's metrics.
"""

from __future__ import annotations

import dataclasses

from glm5.rl.rollout import Episode, new_episodes


class RolloutBuffer:
    def __init__(self, group_size: int, seed: int, max_staleness: int = 0, filter_equal: bool = False):
        self.group_size, self.seed, self.max_staleness, self.filter_equal = group_size, seed, max_staleness, filter_equal
        self.next_group = 0  # the data position: prompts handed out so far
        self.done: dict[int, list[Episode]] = {}  # group -> its finished episodes (complete at group_size)
        self.partial: list[Episode] = []  # aborted mid-generation, continued first
        self.waiting: list[Episode] = []  # restarted (too stale), to run again
        self.stats = {"restarted": 0, "filtered_groups": 0}

    # ------------------------------------------------------------------ handing out work
    def episodes_to_run(self, num_groups: int, version: int) -> list[Episode]:
        """Episodes for about `num_groups` groups: partial and restarted ones first, then new prompts."""
        out: list[Episode] = []
        for ep in self.partial:
            oldest = ep.min_version()
            if oldest is not None and version - oldest > self.max_staleness:
                ep.restart()
                self.stats["restarted"] += 1
            out.append(ep)
        out += self.waiting
        self.partial, self.waiting = [], []
        groups_out = {ep.group for ep in out}
        missing = num_groups - len(groups_out) - self.complete_groups()
        if missing > 0:
            ids = list(range(self.next_group, self.next_group + missing))
            self.next_group += missing
            out += new_episodes(ids, self.group_size, self.seed)
        return out

    def put(self, done: list[Episode], partial: list[Episode] = ()) -> None:
        for ep in done:
            self.done.setdefault(ep.group, []).append(ep)
        self.partial += list(partial)

    def collect(self, restart_version: int | None, *results) -> dict:
        """Rollout workers' answers, (done, partial, info) each, put in one call; with `restart_version`, complete
        groups gone stale under it are restarted (as take(0, version)). -> the round's figures and the complete
        groups now, so the loop needs no other call to decide whether to generate more."""
        stats = {"seconds": 0.0, "sampled": 0, "aborted": 0, "kv_resumed": 0}
        for done, partial, info in results:
            self.put(done, partial)
            stats["seconds"] += info["seconds"]
            stats["sampled"] += info["sampled"]
            stats["kv_resumed"] += info.get("kv_resumed", 0)
            stats["aborted"] += len(partial)
        if restart_version is not None:
            self.take(0, restart_version)
        stats["complete_groups"] = self.complete_groups()
        return stats

    def complete_groups(self) -> int:
        return sum(len(eps) == self.group_size for eps in self.done.values())

    def in_progress_groups(self) -> int:
        return len({ep.group for ep in self.partial + self.waiting} | {g for g, e in self.done.items() if len(e) < self.group_size})

    # ------------------------------------------------------------------ taking a batch
    def take(self, num_groups: int, version: int, whole: bool = False) -> list[list[Episode]]:
        """Up to num_groups complete groups, oldest prompt first, none with a token older than the bound; with
        `whole`, all num_groups or none (fewer are kept here for the next call)."""
        batch = []
        for group in sorted(g for g, eps in self.done.items() if len(eps) == self.group_size):
            eps = sorted(self.done[group], key=lambda e: e.index)
            oldest = [v for v in (e.min_version() for e in eps) if v is not None]
            if oldest and version - min(oldest) > self.max_staleness:
                del self.done[group]
                for ep in eps:
                    ep.restart()
                self.waiting += eps
                self.stats["restarted"] += len(eps)
                continue
            if self.filter_equal and len({e.reward for e in eps}) == 1:  # dynamic sampling: no signal
                del self.done[group]
                self.stats["filtered_groups"] += 1
                continue
            if len(batch) < num_groups:
                batch.append(eps)
                del self.done[group]
        for eps in batch:
            for ep in eps:
                oldest = ep.min_version()
                assert oldest is None or version - oldest <= self.max_staleness, "staleness bound broken"
        if whole and len(batch) < num_groups:
            self.put([ep for eps in batch for ep in eps])
            return []
        return batch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        def pack(eps):
            return [dataclasses.asdict(e) for e in eps]

        return {"next_group": self.next_group, "partial": pack(self.partial), "waiting": pack(self.waiting),
                "done": [pack(eps) for eps in self.done.values()], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.next_group = int(state["next_group"])
        self.partial = [Episode(**d) for d in state["partial"]]
        self.waiting = [Episode(**d) for d in state["waiting"]]
        self.done = {}
        for eps in state["done"]:
            for d in eps:
                ep = Episode(**d)
                self.done.setdefault(ep.group, []).append(ep)
        self.stats = dict(state["stats"])
