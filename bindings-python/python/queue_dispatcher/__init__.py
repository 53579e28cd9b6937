"""queue_dispatcher: background tasks kept in one SQLite file, run by worker processes.

    import queue_dispatcher

    @queue_dispatcher.task(queue="mail", retries=3)
    def send_mail(to, subject): ...

    t = send_mail.enqueue("a@b.c", subject="hi")     # durable when this returns
    t.wait(timeout=30)                               # the result, or TaskFailed

Run the tasks with ``queue-dispatcher worker --import myapp.jobs``. The engine (Rust) owns all
behaviour; this package registers tasks, converts values and runs them on native worker threads.
"""

from queue_dispatcher._native import (
    BusyError,
    DependencyCycleError,
    Error,
    InvalidInputError,
    InvalidStateError,
    MissingDependencyError,
    NotADatabaseError,
    SchemaTooNewError,
    StaleTokenError,
    StoppedError,
    StorageError,
    Store,
    TaskNotFoundError,
    __version__,
)
from queue_dispatcher._registry import JobProxy, TaskFunction, job, registered_names, task
from queue_dispatcher._remote import RubyTask, ruby_task
from queue_dispatcher._store import batch, configure, get_store
from queue_dispatcher._task import (
    CurrentTask,
    Task,
    TaskAborted,
    TaskError,
    TaskFailed,
    WaitTimeout,
    current_task,
)
from queue_dispatcher._worker import Worker

__all__ = [
    "BusyError",
    "CurrentTask",
    "DependencyCycleError",
    "Error",
    "InvalidInputError",
    "InvalidStateError",
    "JobProxy",
    "MissingDependencyError",
    "NotADatabaseError",
    "RubyTask",
    "SchemaTooNewError",
    "StaleTokenError",
    "StoppedError",
    "StorageError",
    "Store",
    "Task",
    "TaskAborted",
    "TaskError",
    "TaskFailed",
    "TaskFunction",
    "TaskNotFoundError",
    "WaitTimeout",
    "Worker",
    "__version__",
    "batch",
    "configure",
    "current_task",
    "get_store",
    "job",
    "registered_names",
    "ruby_task",
    "task",
]
