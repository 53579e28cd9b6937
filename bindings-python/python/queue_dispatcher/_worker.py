"""An in-process dispatcher: native worker threads that run this process's registered tasks.
The command line (`queue-dispatcher worker`) is built on it; programs and tests can use it
directly. The thread that calls `stop` waits for the workers; at interpreter exit, running
pools are stopped first (their unfinished tasks go back to the queue for another worker)."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Optional

from queue_dispatcher._native import Store, WorkerPool
from queue_dispatcher._registry import REGISTRY
from queue_dispatcher._store import get_store
from queue_dispatcher._task import Task

log = logging.getLogger("queue_dispatcher.worker")

_running: weakref.WeakSet[Worker] = weakref.WeakSet()


class Worker:
    """``Worker(workers=10, queues=None).start()``: runs tasks until `stop`.

    ``queues`` lists the named queues to serve (None: all); ``parallel`` says whether tasks
    without a queue are served too (default: yes unless ``queues`` is given). ``lease`` and
    ``heartbeat`` (seconds) set how fast a dead dispatcher's tasks are recovered by others."""

    def __init__(
        self,
        workers: int = 10,
        *,
        queues: Optional[Sequence[str]] = None,
        parallel: Optional[bool] = None,
        store: Optional[Store] = None,
        name: Optional[str] = None,
        lease: float = 15.0,
        heartbeat: float = 1.0,
        max_lost: int = 5,
        retry_base: float = 1.0,
        retry_cap: float = 600.0,
        keep_successful: Optional[float] = None,
        keep_failed: Optional[float] = None,
    ) -> None:
        self.workers = workers
        self.queues = list(queues) if queues is not None else None
        self.parallel = parallel if parallel is not None else queues is None
        self.store = store
        self.name = name
        self.lease = lease
        self.heartbeat = heartbeat
        self.max_lost = max_lost
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.keep_successful = keep_successful
        self.keep_failed = keep_failed
        self.pool: Optional[WorkerPool] = None
        self._lock = threading.Lock()

    def start(self) -> Worker:
        with self._lock:
            if self.pool is not None:
                raise RuntimeError("this worker is already started")
            store = self.store if self.store is not None else get_store()
            self.pool = WorkerPool(
                store,
                REGISTRY,
                lambda id: Task(id, store),
                log,
                workers=self.workers,
                queues=self.queues,
                parallel=self.parallel,
                name=self.name,
                lease=self.lease,
                heartbeat=self.heartbeat,
                max_lost=self.max_lost,
                retry_base=self.retry_base,
                retry_cap=self.retry_cap,
                keep_successful=self.keep_successful,
                keep_failed=self.keep_failed,
            )
        _running.add(self)
        log.info(
            "dispatcher %d started: %d workers, queues %s%s, database %s",
            self.pool.id, self.workers, ",".join(self.queues) if self.queues is not None else "*",
            " + parallel" if self.parallel and self.queues is not None else "", store.path,
        )
        return self

    @property
    def id(self) -> Optional[int]:
        """The dispatcher id (its heartbeat row), once started."""
        return self.pool.id if self.pool is not None else None

    def stop_claiming(self) -> None:
        """Claim nothing more; running tasks finish."""
        if self.pool is not None:
            self.pool.stop_claiming()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits until every worker thread has left (after `stop_claiming`); True if they have."""
        return self.pool.wait(timeout) if self.pool is not None else True

    def stop(self, grace: float = 30.0) -> bool:
        """Claims nothing more, lets running tasks finish for up to ``grace`` seconds, then hands
        whatever still runs back to the queue (another worker runs it again) and leaves.
        Returns True if every worker thread has exited."""
        pool = self.pool
        if pool is None:
            return True
        done = pool.shutdown(grace)
        _running.discard(self)
        log.info("dispatcher %d stopped (%d tasks run)", pool.id, pool.done)
        return done

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, et: Optional[type[BaseException]], ev: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.pool is None else f"dispatcher {self.pool.id}, {self.pool.busy}/{self.workers} busy"
        return f"<Worker {state}>"


def _forget_after_fork() -> None:
    # The worker threads stay in the parent; the child must not wait for them.
    _running.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _stop_all() -> None:
    # Worker threads must not try to run Python code while the interpreter finalizes.
    for w in list(_running):
        w.stop(grace=0.0)
