"""Where the per-sample tasks and shard writes run: in-process, local processes, or dask.

Every executor has one method, :meth:`imap_unordered`, that applies a picklable function to
each item and yields results as they finish, keeping at most ``max_in_flight`` items submitted
at once (so memory stays flat however long the task list is). Results depend only on the
items, never on where or in which order they ran; the driver sorts what it collects.

* ``SerialExecutor``: in this process (``--workers 0``, the default; deterministic and easy to
  debug, and what the fault-injection tests use).
* ``ProcessExecutor``: ``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start
  method (``--workers N``): no fork of a process holding threads (rich's refresh thread, torch).
* ``DaskExecutor``: an existing ``dask.distributed`` cluster (``--scheduler ADDRESS``) or any
  ``distributed.Client``. Tasks are submitted with ``pure=False`` (each item once) and
  collected with ``as_completed``; a worker lost mid-task has its task rerun by dask, which is
  safe because tasks only write content-addressed entries and whole shards atomically.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol


class Executor(Protocol):
    workers: int

    def imap_unordered(self, fn: Callable[..., Any], items: Iterable[tuple]) -> Iterator[Any]:
        """Yield ``fn(*item)`` for each item, in completion order."""

    def close(self) -> None: ...


class SerialExecutor:
    workers = 1

    def imap_unordered(self, fn, items):
        for item in items:
            yield fn(*item)

    def close(self) -> None:
        pass


class ProcessExecutor:
    def __init__(self, workers: int, *, max_in_flight: int | None = None) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = int(workers)
        self.max_in_flight = max_in_flight or 2 * self.workers
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))

    def imap_unordered(self, fn, items):
        from concurrent.futures import FIRST_COMPLETED, wait

        iterator = iter(items)
        running: set = set()
        while True:
            while len(running) < self.max_in_flight:
                item = next(iterator, None)
                if item is None:
                    break
                running.add(self._pool.submit(fn, *item))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Runs tasks on a ``dask.distributed`` cluster: ``DaskExecutor(address)`` connects a new
    client (closed by :meth:`close`), ``DaskExecutor(client=...)`` borrows one."""

    def __init__(self, address: str | None = None, *, client=None, max_in_flight: int | None = None,
                 timeout: float = 30.0) -> None:
        from distributed import Client

        if client is None and address is None:
            raise ValueError("give a scheduler address or a client")
        self._own = client is None
        if client is None:
            try:
                # distributed retries a refused connection until ``timeout``: the wait is bounded by it
                client = Client(address, timeout=f"{float(timeout)}s")
            except (OSError, TimeoutError, ValueError) as exc:
                from anaus_core.errors import UserInputError, one_line

                raise UserInputError(f"--scheduler {address}: cannot connect ({one_line(str(exc)) or type(exc).__name__})") from None
        self.client = client
        self.workers = max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))
        self.max_in_flight = max_in_flight or 2 * self.workers

    def imap_unordered(self, fn, items):
        from distributed import as_completed

        iterator = iter(items)
        completed = as_completed()
        in_flight = 0
        exhausted = False
        while True:
            while not exhausted and in_flight < self.max_in_flight:
                item = next(iterator, None)
                if item is None:
                    exhausted = True
                    break
                completed.add(self.client.submit(fn, *item, pure=False))
                in_flight += 1
            if in_flight == 0:
                return
            future = next(completed)
            in_flight -= 1
            yield future.result()
            future.release()

    def close(self) -> None:
        if self._own:
            self.client.close()


def make_executor(*, workers: int = 0, scheduler: str | None = None, client=None, scheduler_timeout: float = 30.0) -> Executor:
    if client is not None:
        return DaskExecutor(client=client)
    if scheduler:
        return DaskExecutor(scheduler, timeout=scheduler_timeout)
    if workers and workers > 0:
        return ProcessExecutor(workers)
    return SerialExecutor()
