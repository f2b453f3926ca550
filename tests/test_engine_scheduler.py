"""Scheduler policy, without torch: admission limits, bundle limits, FIFO fairness, aborts, deadlines, queue bound."""

from __future__ import annotations

import pytest

from server.engine.scheduler import QueueFull, ScheduledSeq, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ids(seqs):
    return [s.request_id for s in seqs]


def test_admits_fifo_up_to_batch_size_and_prefill_budget():
    sched = Scheduler(max_batch_size=3, max_prefill_rows=2)
    for i in range(5):
        sched.add(ScheduledSeq(f"r{i}", None))
    assert ids(sched.schedule().admit) == ["r0", "r1"]
    assert ids(sched.schedule().admit) == ["r2"]  # batch full at 3
    assert sched.schedule().admit == []
    sched.finish("r1")
    assert ids(sched.schedule().admit) == ["r3"]
    assert (sched.num_running, sched.num_waiting) == (3, 1)


def test_mixed_bundles_share_a_batch_by_default():
    sched = Scheduler(max_batch_size=8, max_prefill_rows=8)
    for i in range(6):
        sched.add(ScheduledSeq(f"r{i}", f"bundle{i}" if i < 5 else None))
    assert len(sched.schedule().admit) == 6


def test_max_bundles_per_batch_one_is_strict_fifo():
    sched = Scheduler(max_batch_size=8, max_prefill_rows=8, max_bundles_per_batch=1)
    for rid, bundle in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A")]:
        sched.add(ScheduledSeq(rid, bundle))
    assert ids(sched.schedule().admit) == ["a1", "a2"]  # b1 blocks a3 behind it: no starvation of B
    sched.finish("a1")
    assert sched.schedule().admit == []
    sched.finish("a2")
    assert ids(sched.schedule().admit) == ["b1"]
    sched.finish("b1")
    assert ids(sched.schedule().admit) == ["a3"]


def test_base_model_counts_as_one_bundle():
    sched = Scheduler(max_batch_size=8, max_bundles_per_batch=2)
    for rid, bundle in [("n1", None), ("a1", "A"), ("n2", None), ("b1", "B")]:
        sched.add(ScheduledSeq(rid, bundle))
    assert ids(sched.schedule().admit) == ["n1", "a1", "n2"]


def test_queue_bound_raises_queue_full():
    sched = Scheduler(max_batch_size=1, max_queue=2)
    sched.add(ScheduledSeq("r0", None))
    sched.add(ScheduledSeq("r1", None))
    with pytest.raises(QueueFull, match="max_queue=2"):
        sched.add(ScheduledSeq("r2", None))
    sched.schedule()  # r0 moves to running, freeing a queue place
    sched.add(ScheduledSeq("r2", None))


def test_abort_frees_a_running_slot_and_a_waiting_place():
    sched = Scheduler(max_batch_size=1)
    sched.add(ScheduledSeq("r0", None))
    sched.add(ScheduledSeq("r1", None))
    sched.schedule()
    sched.abort("r0")
    sched.abort("r1")
    out = sched.schedule()
    assert ids(out.aborted) == ["r1", "r0"] or sorted(ids(out.aborted)) == ["r0", "r1"]
    assert (sched.num_running, sched.num_waiting) == (0, 0)


def test_deadlines_expire_waiting_and_running_requests():
    clock = FakeClock()
    sched = Scheduler(max_batch_size=1, clock=clock)
    sched.add(ScheduledSeq("run", None, deadline=5.0))
    sched.add(ScheduledSeq("wait", None, deadline=3.0))
    assert ids(sched.schedule().admit) == ["run"]
    clock.now = 4.0
    assert ids(sched.schedule().expired) == ["wait"]
    clock.now = 6.0
    assert ids(sched.schedule().expired) == ["run"]
    assert (sched.num_running, sched.num_waiting) == (0, 0)


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="max_bundles_per_batch"):
        Scheduler(max_bundles_per_batch=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        Scheduler(max_batch_size=0)
