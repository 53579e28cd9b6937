"""The process's default store: opened on first use from `configure(db=...)`, else
``$QUEUE_DISPATCHER_DB``, else ``./queue_dispatcher.db``; shared by enqueuing code and workers.
A handle keeps working across ``os.fork()``: the native handle reopens its connections in the
child (never closing the parent's), and the lock guarding this module is renewed there."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Optional

from queue_dispatcher import _native
from queue_dispatcher._native import Store

_lock = threading.Lock()
_db: Optional[str] = None
_busy_timeout: Optional[float] = None
_store: Optional[Store] = None


def configure(db: Optional[str] = None, *, busy_timeout: Optional[float] = None) -> Store:
    """Sets (and opens) the default database: a path or ``sqlite:///abs/path[?synchronous=full]``.
    ``None`` means ``$QUEUE_DISPATCHER_DB``, else ``./queue_dispatcher.db``."""
    global _db, _busy_timeout, _store
    store = Store(db, busy_timeout=busy_timeout)
    with _lock:
        _db, _busy_timeout, _store = db, busy_timeout, store
    return store


def get_store() -> Store:
    """The default store, opened on first use."""
    store = _store
    if store is not None:
        return store
    return _open_default()


def _open_default() -> Store:
    global _store
    with _lock:
        if _store is None:
            _store = Store(_db, busy_timeout=_busy_timeout)
        return _store


def _reset_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    global _lock
    _lock = threading.Lock()
    _native._after_fork_child()


# SQLite's global mutexes are held across the fork so no other thread holds one in the child.
os.register_at_fork(before=_native._before_fork, after_in_parent=_native._after_fork,
                    after_in_child=_reset_after_fork)


@contextlib.contextmanager
def batch(store: Optional[Store] = None) -> Iterator[None]:
    """Everything enqueued (and linked with ``task.dependent_tasks = ...``) on this thread inside
    the block becomes visible to workers together when the block ends, or not at all if it raises.
    The batch holds the database's write lock, so keep it short. Batches nest."""
    b = (store or get_store()).begin_batch()
    try:
        yield
    except BaseException:
        b.rollback()
        raise
    b.commit()
