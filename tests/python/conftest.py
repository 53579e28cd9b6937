"""Shared fixtures: every test gets a fresh temporary database (also exported as
QUEUE_DISPATCHER_DB for the processes it starts); worker processes are started through the real
command line and always reaped. Warnings are errors and every test has a timeout (pyproject)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

import queue_dispatcher as qd

HERE = Path(__file__).resolve().parent


def wait_until(what: str, cond: Callable[[], object], timeout: float = 20.0, every: float = 0.01) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def sql(db: str, query: str, *params: object) -> list[tuple]:
    """Runs SQL on the database in a separate process: Python's own sqlite3 library must never
    open a file the engine (its own SQLite copy) has open in this process, or closing it can
    delete the live WAL from under the engine (https://sqlite.org/howtocorrupt.html, 2.2)."""
    code = (
        "import json, sqlite3, sys\n"
        "db, q, params = json.loads(sys.argv[1])\n"
        "con = sqlite3.connect(db, timeout=30)\n"
        "rows = con.execute(q, params).fetchall()\n"
        "con.commit()\n"
        "print(json.dumps(rows))\n"
    )
    import json
    out = subprocess.run([sys.executable, "-c", code, json.dumps([db, query, list(params)])],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [tuple(r) for r in json.loads(out)]


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = str(tmp_path / "queue.db")
    monkeypatch.setenv("QUEUE_DISPATCHER_DB", path)
    monkeypatch.setenv("QD_IMPORT_MARKER", str(tmp_path / "imported-marker"))
    qd.configure(path)
    yield path


@pytest.fixture
def store(db: str) -> qd.Store:
    return qd.get_store()


@pytest.fixture
def worker(db: str) -> Iterator[qd.Worker]:
    """An in-process dispatcher with 4 worker threads and fast retries."""
    w = qd.Worker(4, retry_base=0.02, retry_cap=0.05).start()
    yield w
    assert w.stop(grace=10.0), "worker threads did not exit"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "error"
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, store: qd.Store, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            return any(d.alive and d.pid == self.pid for d in store.dispatchers())
        wait_until("the worker process to register", ready, timeout)


@pytest.fixture
def start_worker(db: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts `python -m queue_dispatcher worker --import qd_jobs --db <db> ...` and waits until
    its dispatcher heartbeats; every process is killed at teardown if still running."""
    started: list[WorkerProcess] = []

    def start(*extra: str, workers: int = 2, ready: bool = True, env: dict[str, str] | None = None) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        cmd = [sys.executable, "-m", "queue_dispatcher", "worker", "--workers", str(workers),
               "--import", "qd_jobs", "--db", db, *extra]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(**(env or {})), stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        w = WorkerProcess(proc, log)
        started.append(w)
        if ready:
            w.wait_ready(qd.get_store())
        return w

    yield start
    for w in started:
        try:
            os.killpg(w.pid, signal.SIGKILL)  # with any children (--processes)
        except ProcessLookupError:
            pass
        w.proc.wait(timeout=30)
