"""Tasks used by the test suite, imported by in-process tests and by worker processes
(`queue-dispatcher worker --import qd_jobs`)."""

import os
import time

import queue_dispatcher as qd


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


@qd.task
def noop():
    return None


@qd.task
def add(a, b):
    return a + b


@qd.task
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@qd.task
def fail(message):
    raise ValueError(message)


@qd.task(retries=2)
def flaky(path):
    """Fails until it has been called twice (counted in a file)."""
    _append(path, str(os.getpid()))
    with open(path) as f:
        calls = len(f.read().splitlines())
    if calls < 3:
        raise RuntimeError(f"flaky call {calls}")
    return calls


@qd.task
def record(path, label, pause=0.0):
    """Appends `label pid` to a file; with a pause to make overlaps visible."""
    _append(path, f"start {label} {os.getpid()}")
    time.sleep(pause)
    _append(path, f"end {label} {os.getpid()}")
    return label


@qd.task
def hold(release_path, started_path=None, message="working"):
    """Reports progress, then waits until `release_path` exists (or its cancel flag rises)."""
    t = qd.current_task()
    assert t is not None
    t.update_message(msg=message, perc_finished=25.0)
    if started_path:
        _append(started_path, f"{t.id} {os.getpid()}")
    deadline = time.monotonic() + 60
    while not os.path.exists(release_path) and time.monotonic() < deadline:
        if t.cancelled:
            return "saw " + str(t.cancel_reason)
        time.sleep(0.01)
    t.update_message(msg="finishing", perc_finished=100.0)
    return "released"


@qd.task
def spin_until_cancelled(limit=10.0):
    t = qd.current_task()
    assert t is not None
    end = time.monotonic() + limit
    while not t.cancelled and time.monotonic() < end:
        time.sleep(0.005)
    return t.cancel_reason


@qd.task
def pid():
    return os.getpid()


@qd.task
def returns_object():
    return object()


@qd.task
def enqueue_child(x):
    """A task that enqueues another one (through the worker's default store)."""
    return add.enqueue(x, 1).id


@qd.task(name="qd_jobs:renamed_task")
def explicitly_named():
    return "renamed"


@qd.task
def slow(seconds):
    time.sleep(seconds)
    return seconds


CALLBACKS = []


def _on_success(task):
    CALLBACKS.append(("success", task.id, task.state, task.result))


def _on_error(task):
    CALLBACKS.append(("error", task.id, task.state, task.error.class_name if task.error else None))


@qd.task(on_success=_on_success, on_error=_on_error)
def with_callbacks(fail_with=None):
    if fail_with:
        raise KeyError(fail_with)
    return "ok"


def _bad_callback(task):
    raise RuntimeError("callback exploded")


@qd.task(on_success=_bad_callback)
def with_bad_callback():
    return 1


def _file_callback(task):
    _append(os.environ["QD_CALLBACK_FILE"], f"{task.id} {task.state}")


@qd.task(on_error=_file_callback, on_success=_file_callback)
def cross_process_callbacks(ok=True):
    if not ok:
        raise RuntimeError("failed on purpose")
    return "fine"


@qd.job(queue="mail")
class LongRunningMailJob:
    """The original gem's example: a class proxy."""

    prefix = "sent"

    @staticmethod
    def send_mail(to, subject="hello"):
        return f"sent {subject} to {to}"

    @classmethod
    def describe(cls, n):
        return f"{cls.__name__}:{n}"

    def deliver(self, to):
        return [self.prefix, to]

    def _private_helper(self):
        return "never a task"


@qd.task
async def async_add(a, b):
    import asyncio

    await asyncio.sleep(0.01)
    return a + b


@qd.job
class AsyncJob:
    async def compute(self, x):
        return x * 3
