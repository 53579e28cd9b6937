"""Fixtures of the cross-language suites: a fresh database per test, and a Python
(`queue-dispatcher worker`) and a Ruby (`queue_worker_dispatcher`) dispatcher on it, started through
the real command lines and always reaped. The Ruby gem must be installed and its executable on PATH
(`make test-cross` does both). Warnings are errors and every test has a timeout (pyproject)."""

from __future__ import annotations

import json
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
RUBY_EXE = os.environ.get("QD_RUBY_EXE", "queue_worker_dispatcher")


def wait_until(what: str, cond: Callable[[], object], timeout: float = 30.0, every: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def sql(db: str, query: str, *params: object) -> list[tuple[object, ...]]:
    """Runs SQL in a separate process: Python's own sqlite3 must never open a file the engine has
    open in this process (https://sqlite.org/howtocorrupt.html, 2.2). Raises CalledProcessError
    (with SQLite's message on stderr) when the statement fails."""
    code = (
        "import json, sqlite3, sys\n"
        "db, q, params = json.loads(sys.argv[1])\n"
        "con = sqlite3.connect(db, timeout=30)\n"
        "rows = con.execute(q, params).fetchall()\n"
        "con.commit()\n"
        "print(json.dumps(rows))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps([db, query, list(params)])],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [tuple(r) for r in json.loads(out)]


class Dispatcher:
    def __init__(self, runtime: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.runtime = runtime
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
                raise AssertionError(f"{self.runtime} dispatcher exited with {self.proc.returncode}:\n{self.output()}")
            return any(d.alive and d.pid == self.pid for d in store.dispatchers())
        wait_until(f"the {self.runtime} dispatcher to register", ready, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful) and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def child_env(xlog: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "error"
    env["QD_XLOG_DIR"] = str(xlog)
    env.update(extra)
    return env


def dispatcher_command(runtime: str, db: str, workers: int, *extra: str) -> list[str]:
    if runtime == "python":
        return [sys.executable, "-m", "queue_dispatcher", "worker", "--workers", str(workers),
                "--import", "xjobs", "--db", db, "--retry-base", "0.05", *extra]
    return [RUBY_EXE, "-w", str(workers), "-r", str(HERE / "xjobs.rb"), "--db", db, *extra]


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = str(tmp_path / "queue.db")
    monkeypatch.setenv("QUEUE_DISPATCHER_DB", path)
    qd.configure(path)
    yield path


@pytest.fixture
def xlog(tmp_path: Path) -> Path:
    d = tmp_path / "xlog"
    d.mkdir()
    return d


@pytest.fixture
def start_dispatcher(db: str, tmp_path: Path, xlog: Path) -> Iterator[Callable[..., Dispatcher]]:
    """`start_dispatcher("python" | "ruby", *extra, workers=2)`: a dispatcher process on this
    test's database, heartbeating when this returns; killed at teardown if still running."""
    started: list[Dispatcher] = []

    def start(runtime: str, *extra: str, workers: int = 2, ready: bool = True) -> Dispatcher:
        log = tmp_path / f"{runtime}-{len(started)}.out"
        with open(log, "ab") as out:
            proc = subprocess.Popen(dispatcher_command(runtime, db, workers, *extra), cwd=tmp_path,
                                    env=child_env(xlog), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        d = Dispatcher(runtime, proc, log)
        started.append(d)
        if ready:
            d.wait_ready(qd.get_store())
        return d

    yield start
    for d in started:
        try:
            os.killpg(d.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        d.proc.wait(timeout=30)


def read_xlog(xlog: Path) -> list[tuple[str, int, int, int, str, str]]:
    """(kind, task id, monotonic µs, pid, outcome, runtime) of every record, in time order."""
    rows = []
    for f in xlog.glob("*.log"):
        runtime = f.name.split("-")[0]
        for line in f.read_text().splitlines():
            parts = line.split(" ")
            rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4] if len(parts) > 4 else "", runtime))
    rows.sort(key=lambda r: r[2])
    return rows


def runs_of(xlog: Path, task_id: int) -> int:
    return sum(1 for r in read_xlog(xlog) if r[0] == "S" and r[1] == task_id)



