"""The rollout buffer: data position, partial episodes, the staleness bound, resume (glm5/rl/buffer.py)."""

from glm5.rl.buffer import RolloutBuffer


def _sampled(ep, versions):
    ep.tokens = list(range(len(versions)))
    ep.loss_mask = [1] * len(versions)
    ep.logprobs = [-1.0] * len(versions)
    ep.versions = list(versions)
    return ep


def test_new_prompts_advance_the_data_position_and_partials_come_first():
    buf = RolloutBuffer(group_size=2, seed=0, max_staleness=1)
    first = buf.episodes_to_run(3, version=0)
    assert sorted({e.group for e in first}) == [0, 1, 2] and buf.next_group == 3
    done = [e for e in first if e.group == 0]
    partial = [_sampled(e, [0, 0]) for e in first if e.group != 0]
    for e in partial:
        e.status = "partial"
    buf.put(done, partial)
    again = buf.episodes_to_run(3, version=1)
    # the two partial groups are continued, the complete one counts: no new prompt needed
    assert [e.group for e in again] == [1, 1, 2, 2] and buf.next_group == 3
    assert all(e.tokens for e in again), "partial tokens within the bound are kept"


def test_a_partial_older_than_the_bound_restarts():
    buf = RolloutBuffer(group_size=1, seed=0, max_staleness=1)
    [ep] = buf.episodes_to_run(1, version=0)
    _sampled(ep, [0, 0, 1])
    ep.status = "partial"
    buf.put([], [ep])
    [again] = buf.episodes_to_run(1, version=2)  # oldest token version 0, trained at >= 2: staleness 2 > 1
    assert again.tokens == [] and again.status == "new" and buf.stats["restarted"] == 1


def test_take_never_returns_a_token_older_than_the_bound():
    buf = RolloutBuffer(group_size=2, seed=0, max_staleness=1)
    eps = buf.episodes_to_run(2, version=0)
    for e in eps:
        _sampled(e, [0] if e.group == 0 else [2])
        e.status = "done"
    buf.put(eps)
    batch = buf.take(2, version=2)
    assert [g[0].group for g in batch] == [1], "group 0 (version 0, trained at 2) must not be taken"
    assert len(buf.waiting) == 2 and all(e.tokens == [] for e in buf.waiting)


def test_equal_reward_groups_are_filtered_when_asked():
    buf = RolloutBuffer(group_size=2, seed=0, filter_equal=True)
    eps = buf.episodes_to_run(2, version=0)
    for e in eps:
        e.rewards = [1.0] if e.group == 0 else [float(e.index)]
    buf.put(eps)
    assert [g[0].group for g in buf.take(2, version=0)] == [1] and buf.stats["filtered_groups"] == 1


def test_state_dict_round_trip_keeps_partials_and_position():
    buf = RolloutBuffer(group_size=2, seed=3, max_staleness=2)
    eps = buf.episodes_to_run(2, version=0)
    _sampled(eps[0], [0, 0])
    eps[0].status = "partial"
    buf.put(eps[2:], [eps[0]])
    other = RolloutBuffer(group_size=2, seed=3, max_staleness=2)
    other.load_state_dict(buf.state_dict())
    assert other.next_group == 2 and other.partial[0].tokens == [0, 1] and other.partial[0].uid == eps[0].uid
    assert other.complete_groups() == 1


def test_collect_puts_every_answer_restarts_stale_groups_and_counts():
    buf = RolloutBuffer(group_size=2, seed=0, max_staleness=1)
    eps = buf.episodes_to_run(3, version=0)
    for e in eps:
        _sampled(e, [0] if e.group == 0 else [2])
    part = [e for e in eps if e.group == 2]
    answers = [([e for e in eps if e.group == 0], [], {"seconds": 1.0, "sampled": 3}),
               ([e for e in eps if e.group == 1], part, {"seconds": 0.5, "sampled": 4, "kv_resumed": 1})]
    stats = buf.collect(2, *answers)  # group 0 (version 0) is stale under version 2: restarted, not counted
    assert stats == {"seconds": 1.5, "sampled": 7, "aborted": 2, "kv_resumed": 1, "complete_groups": 1}
    assert buf.stats["restarted"] == 2 and len(buf.partial) == 2
    assert buf.collect(None)["complete_groups"] == 1


def test_take_whole_gives_all_groups_or_keeps_them():
    buf = RolloutBuffer(group_size=2, seed=0)
    buf.put(buf.episodes_to_run(1, version=0))
    assert buf.take(2, version=0, whole=True) == [] and buf.complete_groups() == 1
    assert [len(g) for g in buf.take(1, version=0, whole=True)] == [2] and buf.complete_groups() == 0


def test_groups_go_back_to_the_worker_that_holds_their_partial_episodes():
    """run.py's _split: a group keeps its worker (`Episode.slot`; with --keep-partial-kv its KV cache waits there),
    new groups go where the fewest episodes are, whole groups per worker, and each episode learns its slot."""
    from glm5.rl.rollout import new_episodes
    from glm5.rl.run import _split

    old = new_episodes([0, 1, 2], 2, seed=0)
    for ep in old:
        ep.slot = 1 if ep.group < 2 else 0  # groups 0 and 1 last ran on worker 1, group 2 on worker 0
    shares = _split(old + new_episodes([3, 4, 5], 2, seed=0), 2)
    groups = [sorted({ep.group for ep in share}) for share in shares]
    assert groups == [[2, 3, 4], [0, 1, 5]], groups  # 6 episodes each
    assert all(ep.slot == i for i, share in enumerate(shares) for ep in share)
    # a slot beyond the workers there are now (fewer workers after a resume): dealt like a new group
    late = new_episodes([7], 2, seed=0)
    for ep in late:
        ep.slot = 3
    assert [len(s) for s in _split(late, 1)] == [2] and all(ep.slot == 0 for ep in late)
