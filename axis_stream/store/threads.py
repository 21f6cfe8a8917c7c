"""The matrices of one fold in several threads, with a bound on the memory in flight.

Each matrix's fold is independent of the others' and torch releases the GIL inside its kernels, so
threads use several cores. The checkpoint is still read in the calling thread, in order: only the
arithmetic runs elsewhere, and the results are put back in the same order, so the outcome does not
depend on how many threads ran.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


def bounded_map(keys: Sequence[K], prepare: Callable[[K], Callable[[], R]], cost: Callable[[K], int], *,
                workers: int = 1, budget: float = math.inf,
                done: Callable[[int, int], None] | None = None) -> dict[K, R]:
    """For each key in order: wait until ``cost(key)`` bytes fit in ``budget`` with the work in flight
    (or nothing is in flight), call ``prepare(key)`` in this thread and run the callable it returns in
    one of ``workers`` threads. Returns the results by key; ``done(n, total)`` after each, in key order.
    With ``workers <= 1`` everything runs here, one key after the other."""
    total = len(keys)
    out: dict[K, R] = {}
    if workers <= 1:
        for i, key in enumerate(keys):
            out[key] = prepare(key)()
            if done is not None:
                done(i + 1, total)
        return out
    cond = threading.Condition()
    in_flight = [0]

    def fits(amount: int) -> bool:
        return in_flight[0] == 0 or in_flight[0] + amount <= budget

    def release(amount: int, _: object = None) -> None:
        with cond:
            in_flight[0] -= amount
            cond.notify_all()

    futures: dict[K, Future] = {}
    with ThreadPoolExecutor(workers, thread_name_prefix="fold") as pool:
        try:
            for key in keys:
                amount = cost(key)
                with cond:
                    cond.wait_for(functools.partial(fits, amount))
                    in_flight[0] += amount
                try:
                    job = prepare(key)
                except BaseException:
                    release(amount)
                    raise
                futures[key] = pool.submit(job)
                futures[key].add_done_callback(functools.partial(release, amount))
            for i, key in enumerate(keys):
                out[key] = futures[key].result()
                if done is not None:
                    done(i + 1, total)
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
    return out
