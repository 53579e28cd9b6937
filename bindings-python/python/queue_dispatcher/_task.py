"""Task handles (what `enqueue` returns), stored errors, and the running task as its own code sees
it. A handle holds the id and a snapshot of the row taken on first use; `refresh()` takes a new
one, as a reloaded record would."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import Any, Optional, Union

from queue_dispatcher import _native
from queue_dispatcher._native import Error, ErrorInfo, RunningTask, Store, TaskRecord
from queue_dispatcher._store import get_store

#: The task running on the current thread (see `current_task()`).
CurrentTask = RunningTask


def current_task() -> Optional[RunningTask]:
    """The task whose code runs on this thread (``update_message``, ``cancelled``), or None."""
    return _native.current_task()


def _time(micros: Optional[int]) -> Optional[_dt.datetime]:
    if micros is None:
        return None
    return _dt.datetime.fromtimestamp(micros / 1e6, tz=_dt.timezone.utc)


class TaskError:
    """A stored failure: the exception's class name, message and traceback text."""

    __slots__ = ("class_name", "message", "backtrace")

    def __init__(self, class_name: str, message: str, backtrace: Optional[list[str]] = None) -> None:
        self.class_name = class_name
        self.message = message
        self.backtrace = list(backtrace or [])

    @classmethod
    def _from(cls, info: ErrorInfo) -> TaskError:
        return cls(info.class_name, info.message, info.backtrace)

    @property
    def traceback(self) -> str:
        """The traceback as text (empty when the failure had none, e.g. a failed dependency)."""
        return "\n".join(self.backtrace)

    def __str__(self) -> str:
        return f"{self.class_name}: {self.message}"

    def __repr__(self) -> str:
        return f"TaskError({self.class_name!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskError):
            return NotImplemented
        return (self.class_name, self.message, self.backtrace) == (other.class_name, other.message, other.backtrace)

    __hash__ = None  # type: ignore[assignment]


class TaskFailed(Error):
    """`Task.wait()` on a task that ended in ``error``: carries the remote error."""

    def __init__(self, task: Task, error: TaskError) -> None:
        self.task = task
        self.error = error
        text = f"task {task.id} ({task.target}) {self._verb}: {error}"
        if error.backtrace:
            text += "\n\nRemote traceback:\n" + error.traceback
        super().__init__(text)

    _verb = "failed"


class TaskAborted(TaskFailed):
    """`Task.wait()` on a task that was aborted (cancelled, reset, or its worker lost too often)."""

    _verb = "was aborted"


class WaitTimeout(Error, TimeoutError):
    """`Task.wait(timeout=...)` returned before the task finished."""


TaskLike = Union["Task", int]


def _ids(tasks: Union[TaskLike, Iterable[TaskLike]]) -> list[int]:
    if isinstance(tasks, (Task, int)):
        tasks = [tasks]
    out = []
    for t in tasks:
        if isinstance(t, Task):
            out.append(t.id)
        elif isinstance(t, int) and not isinstance(t, bool):
            out.append(t)
        else:
            raise TypeError(f"expected a Task or a task id, got {type(t).__name__}")
    return out


class Task:
    """A handle on one stored task. Attributes read the snapshot taken on first access (or by the
    last `refresh()`); `wait()` and `refresh()` read the database again."""

    __slots__ = ("id", "_store", "_record")

    def __init__(self, id: int, store: Optional[Store] = None) -> None:
        self.id = id
        self._store = store
        self._record: Optional[TaskRecord] = None

    @property
    def store(self) -> Store:
        return self._store if self._store is not None else get_store()

    def refresh(self) -> Task:
        """Reads the row again; returns self."""
        self._record = self.store.task(self.id)
        return self

    @property
    def record(self) -> TaskRecord:
        """The raw stored row (as last read)."""
        rec = self._record
        if rec is None:
            rec = self._record = self.store.task(self.id)
        return rec

    # -- the row's fields ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``running``, ``successful``, ``error`` or ``aborted``."""
        return self.record.state

    @property
    def finished(self) -> bool:
        return self.record.state in ("successful", "error", "aborted")

    @property
    def target(self) -> str:
        return self.record.target

    @property
    def queue(self) -> Optional[str]:
        return self.record.queue

    @property
    def priority(self) -> int:
        return self.record.priority

    @property
    def attempts(self) -> int:
        return self.record.attempts

    @property
    def retries(self) -> int:
        return self.record.retries

    @property
    def lost(self) -> int:
        return self.record.lost

    @property
    def args(self) -> tuple[list[Any], dict[str, Any]]:
        """The stored arguments as (positional list, keyword dict)."""
        data = _native.decode_json(self.record.args)
        return list(data.get("args", [])), dict(data.get("kwargs", {}))

    @property
    def meta(self) -> Optional[dict[str, Any]]:
        m = self.record.meta
        return None if m is None else _native.decode_json(m)

    @property
    def unique_key(self) -> Optional[str]:
        return self.record.unique_key

    @property
    def result(self) -> Any:
        """The return value of a successful run (None before that)."""
        r = self.record.result
        return None if r is None else _native.decode_json(r)

    @property
    def error(self) -> Optional[TaskError]:
        e = self.record.error
        return None if e is None else TaskError._from(e)

    @property
    def error_history(self) -> list[TaskError]:
        """Errors of every failed attempt, oldest first."""
        return [TaskError._from(e) for e in self.record.error_history]

    @property
    def message(self) -> Optional[str]:
        return self.record.message

    @property
    def perc_finished(self) -> Optional[float]:
        return self.record.perc_finished

    @property
    def enqueued_at(self) -> Optional[_dt.datetime]:
        return _time(self.record.enqueued_at)

    @property
    def run_at(self) -> Optional[_dt.datetime]:
        return _time(self.record.run_at)

    @property
    def started_at(self) -> Optional[_dt.datetime]:
        return _time(self.record.started_at)

    @property
    def finished_at(self) -> Optional[_dt.datetime]:
        return _time(self.record.finished_at)

    @property
    def depends_on(self) -> list[int]:
        return list(self.record.depends_on)

    # -- actions -----------------------------------------------------------------------------

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Waits until the task is finished and returns its result. Raises `TaskFailed` (with the
        remote class, message and traceback) if it ended in ``error``, `TaskAborted` if it was
        aborted, `WaitTimeout` if ``timeout`` seconds passed first."""
        rec = self._record = self.store.wait(self.id, timeout)
        if rec.state == "successful":
            return self.result
        if rec.state == "error":
            raise TaskFailed(self, self.error or TaskError("Error", ""))
        if rec.state == "aborted":
            raise TaskAborted(self, self.error or TaskError("Aborted", ""))
        raise WaitTimeout(f"task {self.id} ({rec.target}) is still {rec.state} after {timeout}s")

    def cancel(self) -> str:
        """A ``new`` task becomes ``aborted``; a running one gets its cancellation flag raised
        (its code sees ``current_task().cancelled``) and is stored ``aborted`` when it returns.
        Returns the state afterwards."""
        state = self.store.cancel(self.id)
        self._record = None
        return state

    @property
    def dependent_tasks(self) -> list[Task]:
        """The tasks this one waits for. Assigning a task (or a list) adds dependencies: allowed
        while this task is ``new`` and was never started, otherwise `InvalidStateError`. Inside
        ``with queue_dispatcher.batch():`` the assignment is race-free."""
        return [Task(i, self._store) for i in self.depends_on]

    @dependent_tasks.setter
    def dependent_tasks(self, tasks: Union[TaskLike, Iterable[TaskLike]]) -> None:
        self.store.add_dependencies(self.id, _ids(tasks))
        self._record = None

    def __repr__(self) -> str:
        rec = self._record
        if rec is None:
            return f"<Task {self.id}>"
        return f"<Task {self.id} {rec.target} {rec.state}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Task):
            return NotImplemented
        return self.id == other.id and self.store.path == other.store.path

    def __hash__(self) -> int:
        return hash(self.id)
