"""Rows written straight into the database (by another program, a bug, an attacker with write
access): malformed arguments, an unknown runtime, unknown or forbidden targets, a dependency on a
missing task. Each such task ends in `error` with a message naming the problem, nothing forbidden
runs, and both dispatchers keep serving other tasks. Rows are written with Python's sqlite3 in a
separate process (never inside this one, which has the engine open)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import queue_dispatcher as qd
from conftest import Dispatcher, read_xlog, sql
import xjobs

Start = Callable[..., Dispatcher]


def insert(db: str, runtime: str, target: str, args: str = '{"args":[],"kwargs":{}}', deps: tuple[int, ...] = ()) -> int:
    """One task row (and its dependency rows) in one transaction; returns its id."""
    code = (
        "import json, sqlite3, sys\n"
        "db, runtime, target, args, deps = json.loads(sys.argv[1])\n"
        "con = sqlite3.connect(db, timeout=30, isolation_level=None)\n"
        "con.execute('BEGIN IMMEDIATE')\n"
        "cur = con.execute('INSERT INTO tasks (runtime, target, args) VALUES (?, ?, ?)', (runtime, target, args))\n"
        "for d in deps:\n"
        "    con.execute('INSERT INTO task_deps (task_id, depends_on) VALUES (?, ?)', (cur.lastrowid, d))\n"
        "con.execute('COMMIT')\n"
        "print(cur.lastrowid)\n"
    )
    import json
    out = subprocess.run([sys.executable, "-c", code, json.dumps([db, runtime, target, args, list(deps)])],
                         check=True, capture_output=True, text=True, timeout=60)
    return int(out.stdout)


@pytest.fixture
def both(db: str, start_dispatcher: Start) -> tuple[Dispatcher, Dispatcher]:
    return start_dispatcher("python"), start_dispatcher("ruby")


def ends_in_error(task_id: int) -> qd.TaskError:
    t = qd.Task(task_id)
    with pytest.raises(qd.TaskFailed) as info:
        t.wait(timeout=60)
    assert t.state == "error"
    return info.value.error


def still_serving(both: tuple[Dispatcher, Dispatcher]) -> None:
    for d in both:
        assert d.proc.poll() is None, f"{d.runtime} dispatcher died:\n{d.output()}"
    assert xjobs.stamp.enqueue("after", ms=1).wait(timeout=60)["runtime"] == "python"
    assert qd.ruby_task("XJob.stamp").enqueue("after", ms=1).wait(timeout=60)["runtime"] == "ruby"


def test_unknown_runtime_is_refused_by_the_schema(db: str) -> None:
    qd.get_store()  # the schema exists
    with pytest.raises(subprocess.CalledProcessError) as info:
        insert(db, "perl", "main::run")
    assert "CHECK constraint failed" in info.value.stderr
    assert sql(db, "SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize("runtime,target", [("python", "xjobs:stamp"), ("ruby", "XJob.stamp")])
@pytest.mark.parametrize("args", ['{"args": ["x", ', "not json at all", "[1, 2]", '{"args": "x"}'])
def test_malformed_arguments(db: str, both: tuple[Dispatcher, Dispatcher], xlog: Path, runtime: str, target: str, args: str) -> None:
    tid = insert(db, runtime, target, args)
    err = ends_in_error(tid)
    assert "cannot decode the stored arguments" in err.message, err
    assert not [r for r in read_xlog(xlog) if r[1] == tid], "the task's code ran"
    still_serving(both)


@pytest.mark.parametrize("runtime,target,named", [
    ("ruby", "Kernel#system", "Kernel"),
    ("ruby", "LongRunningMailJob.class_eval", "class_eval"),
    ("ruby", "LongRunningMailJob.instance_eval", "instance_eval"),
    ("ruby", "XJob._secret", "_secret"),
    ("ruby", "XJob.run", "run"),             # private in XJob
    ("ruby", "NoSuchJob.perform", "NoSuchJob"),
    ("ruby", "xjobs:stamp", "xjobs:stamp"),  # a Python name given to Ruby
    ("python", "os:system", "os:system"),
    ("python", "myapp.jobs:os.system", "myapp.jobs:os.system"),
    ("python", "xjobs:_run", "xjobs:_run"),  # exists in the module, never registered
    ("python", "xjobs:os.system", "xjobs:os.system"),
    ("python", "XJob.stamp", "XJob.stamp"),  # a Ruby name given to Python
])
def test_unknown_or_forbidden_targets(db: str, both: tuple[Dispatcher, Dispatcher], xlog: Path, tmp_path: Path,
                                      runtime: str, target: str, named: str) -> None:
    marker = tmp_path / "pwned"
    args = '{"args": ["touch %s"], "kwargs": {}}' % marker
    tid = insert(db, runtime, target, args)
    err = ends_in_error(tid)
    assert named in err.message, err
    assert err.class_name in ("UnregisteredTask", "QueueDispatcher::InvalidInputError"), err
    assert not marker.exists()
    assert not [r for r in read_xlog(xlog) if r[1] == tid]
    still_serving(both)


@pytest.mark.parametrize("runtime,target", [("python", "xjobs:stamp"), ("ruby", "XJob.stamp")])
def test_dependency_on_a_missing_task(db: str, both: tuple[Dispatcher, Dispatcher], xlog: Path, runtime: str, target: str) -> None:
    tid = insert(db, runtime, target, '{"args": ["orphan"], "kwargs": {}}', deps=(987654,))
    err = ends_in_error(tid)
    assert err.class_name == "DependencyFailed"
    assert "987654" in err.message, err
    assert not [r for r in read_xlog(xlog) if r[1] == tid]
    still_serving(both)


def test_many_bad_rows_at_once_leave_the_good_ones_alone(db: str, both: tuple[Dispatcher, Dispatcher]) -> None:
    good = [xjobs.stamp.enqueue(i, ms=1) for i in range(10)] + [qd.ruby_task("XJob.stamp").enqueue(i, ms=1) for i in range(10)]
    bad = [insert(db, "ruby", "Kernel#system"), insert(db, "python", "os:system"),
           insert(db, "python", "xjobs:stamp", "{"), insert(db, "ruby", "XJob.stamp", "{")]
    for t in good:
        t.wait(timeout=60)
    for tid in bad:
        ends_in_error(tid)
    still_serving(both)
