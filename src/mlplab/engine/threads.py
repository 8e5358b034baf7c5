"""How many BLAS threads each phase of a training uses: a fixed rule, never a timing.

A run is given `threads` (its share of the machine's cores; by default all of them,
within a BLAS limit the user set, e.g. OPENBLAS_NUM_THREADS). Evaluation products are
large (thousands of rows at once) and use all of them. An update step multiplies a
batch of ~100 rows: a thread pays only for enough work, so the update phase gets one
thread per MACS_PER_UPDATE_THREAD multiply-adds of a step, at most `threads`. Measured
on a 2-core machine (bench/bench_threads.py, docs/performance.md), a second thread
speeds up the update steps of the reports' 3072-50 nets (31M multiply-adds a step) by
1-23% and of the toolbox net (947M) by 21%, and evaluation by 30-43%.

The same config and seed on the same machine give the same thread counts, hence the
same numbers: the thread count changes the last bits of some products (OpenBLAS
splits some shapes' sums by thread) and so a training's path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mlplab.engine import checks

MACS_PER_UPDATE_THREAD = 15_000_000  # a step's multiply-adds that pay for one thread


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (a scheduler's share), at most
    its cgroup's CPU quota (a container started with --cpus=N)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, _cgroup_quota() or cores))


def _cgroup_quota() -> int | None:
    """cgroup v2's cpu.max as whole cores (rounded up); None: no quota, or no cgroup."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else -(-int(quota) // int(period))


def blas_limit() -> int | None:
    """The BLAS thread limit in force (e.g. the user's OPENBLAS_NUM_THREADS); None
    when NumPy's BLAS reports none."""
    import numpy  # noqa: F401  (loads the BLAS whose limit is read)
    from threadpoolctl import threadpool_info

    return max((lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas"), default=None)


def default_threads() -> int:
    """A run's threads when its config gives none: every core it may use, within a
    BLAS limit the user set."""
    cores = available_cores()
    return min(cores, blas_limit() or cores)


def step_macs(sizes: Sequence[int], batch_size: int) -> int:
    """Multiply-adds of one update step's products: forward and weight gradient of
    every layer, input gradient of every layer above the first."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=False))
    forward = sum(a * b for a, b in pairs)
    return batch_size * (2 * forward + sum(a * b for a, b in pairs[1:]))


def update_threads(threads: int, macs: int) -> int:
    """Threads for the update steps of a run given `threads`: one per
    MACS_PER_UPDATE_THREAD of a step's work, at least 1, at most `threads`."""
    return max(1, min(threads, macs // MACS_PER_UPDATE_THREAD))


class Phases:
    """The BLAS thread limit of a run's phases: the update plan from `start()` to
    `stop()` (which restores the limit found), the eval plan inside `evaluate()`.
    Switching costs ~20 us, so it happens at phase changes, not every step.
    `used` holds what threadpoolctl read back inside each phase, for the record."""

    def __init__(self, threads: int, macs: int):
        checks.positive_int("threads", threads)
        from threadpoolctl import ThreadpoolController

        self.controller = ThreadpoolController()
        self.plan = {"update": update_threads(threads, macs), "eval": threads}
        self.used: dict[str, int] = {}
        self._found = None

    def _set(self, phase: str):
        limiter = self.controller.limit(limits=self.plan[phase], user_api="blas")
        if phase not in self.used:
            self.used[phase] = blas_limit()
        return limiter

    def start(self) -> None:
        self._found = self._set("update")

    def stop(self) -> None:
        if self._found is not None:
            self._found.restore_original_limits()
            self._found = None

    @contextmanager
    def evaluate(self) -> Iterator[None]:
        self._set("eval")
        try:
            yield
        finally:
            if self._found is not None:
                self._set("update")


class Unchanged:
    """Phases that leave BLAS's thread limit as it is (a run given no threads)."""

    used: dict[str, int | None] = {}

    def start(self) -> None:
        pass

    stop = start

    @contextmanager
    def evaluate(self) -> Iterator[None]:
        yield
