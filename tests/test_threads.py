"""store.threads.bounded_map: results in key order, reads in the calling thread, the memory bound kept."""

from __future__ import annotations

import threading

import pytest

from axis_stream.store.threads import bounded_map


@pytest.mark.parametrize("workers", [1, 3])
def test_results_in_key_order_with_the_budget_kept(workers):
    lock, running, starts, prepared_in, done = threading.Lock(), [0], {}, set(), []
    cost = {"a": 2, "b": 1, "c": 1, "d": 5, "e": 1}  # d alone is over the budget: it runs alone

    def prepare(key):
        prepared_in.add(threading.current_thread().name)

        def job():
            with lock:
                running[0] += cost[key]
                starts[key] = running[0]
            with lock:
                running[0] -= cost[key]
            return key * 2
        return job

    out = bounded_map(list(cost), prepare, cost.__getitem__, workers=workers, budget=3,
                      done=lambda n, total: done.append((n, total)))
    assert list(out.items()) == [(k, k * 2) for k in cost]
    assert prepared_in == {threading.current_thread().name}
    assert starts["d"] == 5 and all(v <= 3 for k, v in starts.items() if k != "d")
    assert done == [(i, 5) for i in range(1, 6)]


def test_a_failing_read_stops_the_run_and_propagates():
    seen = []

    def prepare(key):
        seen.append(key)
        if key == 2:
            raise ValueError("bad tensor")
        return lambda: key

    with pytest.raises(ValueError, match="bad tensor"):
        bounded_map([1, 2, 3], prepare, lambda k: 1, workers=2)
    assert seen == [1, 2]
