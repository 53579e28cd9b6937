"""Python tasks of the cross-language suites (tests/cross): the Ruby twin is xjobs.rb. Every run
appends a start and an end record to a per-process log under $QD_XLOG_DIR (one write per line, so
threads never interleave), with CLOCK_MONOTONIC microseconds, comparable across processes."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import queue_dispatcher as qd

_lock = threading.Lock()
_fd: int | None = None


def _now() -> int:
    return time.monotonic_ns() // 1000


def _log(kind: str, extra: str = "") -> None:
    global _fd
    directory = os.environ.get("QD_XLOG_DIR")
    if not directory:
        return
    t = qd.current_task()
    assert t is not None
    with _lock:
        if _fd is None:
            _fd = os.open(os.path.join(directory, f"python-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(_fd, f"{kind} {t.id} {_now()} {os.getpid()} {extra}\n".encode())


def _run(label: Any, ms: float, fail: bool = False) -> dict[str, Any]:
    _log("S")
    start = _now()
    time.sleep(ms / 1000)
    end = _now()
    if fail:
        _log("E", "fail")
        raise RuntimeError(f"{label}: designed to fail")
    _log("E", "ok")
    return {"runtime": "python", "pid": os.getpid(), "label": label, "start": start, "end": end}


@qd.task
def stamp(label: Any, ms: float = 20) -> dict[str, Any]:
    """Sleeps ``ms`` milliseconds; returns who ran it and when (monotonic microseconds)."""
    return _run(label, ms)


@qd.task
def fail_now(label: Any, ms: float = 5) -> dict[str, Any]:
    """Always raises (a designed-to-fail task)."""
    return _run(label, ms, fail=True)
