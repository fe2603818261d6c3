"""Programs compiled ahead, on a background thread, while the run does other work.

XLA compiles without holding Python's lock, so while the main thread initialises the
parameters (itself a compile and a run), another thread compiles the train step, then
the evaluations and the final sample, from shapes alone; the last two finish during the
first steps. On the 2-core CPU recipe this took 5.6 s off a 250-step run's 27.2 s
(docs/performance.md).

Compiling ``jitted.lower(shapes).compile()`` fills jit's own caches, so a later
ordinary call of the same function with arguments of those shapes and shardings finds
the program compiled. A compile ahead is only a head start: if its shapes miss, the
call compiles as it would have; a job that fails is reported by ``result`` to whoever
needs its value (the train step) and otherwise left to the call, which fails or
compiles on its own.

Only on the CPU for now (``background=False`` elsewhere: each job then runs when it is
first waited for, where the program used to compile). On a GPU, XLA's autotuner times
candidate kernels on the device while it compiles; beside the run's own kernels those
timings, and the device memory they take, have not been measured yet.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class CompileAhead:
    """Named compile jobs, run one at a time in the order started: on a background
    thread, or (``background=False``) on the caller's, when first waited for."""

    def __init__(self, background: bool = True) -> None:
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxgpt2-compile")
                      if background else None)
        self._jobs: dict[str, Future] = {}
        self._deferred: dict[str, Callable[[], tuple[Any, float]]] = {}

    def start(self, name: str, compile_fn: Callable[[], Any]) -> None:
        """Queue ``compile_fn``; ``result(name)`` gives ``(its value, seconds it took)``."""
        def timed() -> tuple[Any, float]:
            began = time.perf_counter()
            return compile_fn(), time.perf_counter() - began

        if self._pool is None:
            self._deferred[name] = timed
        else:
            self._jobs[name] = self._pool.submit(timed)

    def finished(self, name: str, value: Any, seconds: float) -> None:
        """Record a job already done elsewhere (the auto batch search's compile)."""
        self._jobs[name] = Future()
        self._jobs[name].set_result((value, seconds))

    def done(self, name: str) -> bool:
        return name in self._jobs and self._jobs[name].done()

    def result(self, name: str) -> tuple[Any, float]:
        """Wait for job ``name``: its value and compile seconds; its error is raised."""
        self._run_deferred(name)
        return self._jobs[name].result()

    def wait(self, name: str) -> None:
        """Wait for job ``name`` if there is one, so the caller does not compile the same
        program beside it; its failure is left to the call (see the module docstring)."""
        self._run_deferred(name)
        job = self._jobs.get(name)
        if job is not None and not job.cancelled():
            job.exception()

    def cancel(self) -> None:
        """Drop the jobs not yet begun (a run that stops during set-up); the one running
        finishes, since XLA cannot be interrupted."""
        self._deferred.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run_deferred(self, name: str) -> None:
        job = self._deferred.pop(name, None)
        if job is not None:
            self._jobs[name] = future = Future()
            try:
                future.set_result(job())
            except Exception as err:  # kept for result(), as a background job's would be
                future.set_exception(err)
