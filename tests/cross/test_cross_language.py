"""One database, two languages, driven from Python: Python enqueues tasks for both runtimes
(Ruby ones by name with `queue_dispatcher.ruby_task`), a Python and a Ruby dispatcher serve the same
file, and each runs only its own language's tasks; serial queues stay serial across languages and
dependencies cross them. The Ruby twin of this suite is cross_language_test.rb."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import queue_dispatcher as qd
from conftest import RUBY_EXE, Dispatcher, read_xlog, runs_of, wait_until
import xjobs

Start = Callable[..., Dispatcher]


def test_ruby_task_handle_and_options(db: str) -> None:
    dep = xjobs.stamp.enqueue("first")
    t = qd.ruby_task("XJob.stamp", queue="mixed", priority=7, retries=2, delay=30, depends_on=[dep],
                     meta={"user": 1}).enqueue("x", ms=5)
    assert isinstance(t, qd.Task)
    rec = t.refresh().record
    assert (rec.runtime, rec.target, rec.queue, rec.priority, rec.retries) == ("ruby", "XJob.stamp", "mixed", 7, 2)
    assert t.depends_on == [dep.id]
    assert t.args == (["x"], {"ms": 5})
    assert t.meta == {"user": 1}
    assert t.run_at is not None and t.enqueued_at is not None
    assert (t.run_at - t.enqueued_at).total_seconds() > 25
    later = qd.ruby_task("XJob.stamp").enqueue_with(queue="other")("y")
    assert later.refresh().record.runtime == "ruby" and later.queue == "other"


@pytest.mark.parametrize("name", ["Kernel#system", "LongRunningMailJob.class_eval", "XJob._secret", "xjobs:stamp", "XJob"])
def test_ruby_task_refuses_what_the_name_shows(db: str, name: str) -> None:
    with pytest.raises(qd.InvalidInputError, match="target"):
        qd.ruby_task(name)


def test_ruby_instance_target_needs_a_receiver(db: str) -> None:
    with pytest.raises(qd.InvalidInputError, match="receiver"):
        qd.ruby_task("Report#build")
    with pytest.raises(qd.InvalidInputError, match="receiver"):
        qd.ruby_task("Report.build", receiver=3)
    t = qd.ruby_task("Report#build", receiver=42).enqueue("pdf")
    assert t.record.receiver == "42"


def test_each_dispatcher_runs_only_its_own_runtime(db: str, start_dispatcher: Start, xlog: Path) -> None:
    py = start_dispatcher("python", workers=3)
    rb = start_dispatcher("ruby", workers=3)
    store = qd.get_store()
    ids = {d.pid: d.id for d in store.dispatchers()}
    tasks = []
    for i in range(20):
        tasks.append(("python", xjobs.stamp.enqueue(f"p{i}", ms=5)))
        tasks.append(("ruby", qd.ruby_task("XJob.stamp").enqueue(f"r{i}", ms=5)))
    for runtime, t in tasks:
        result = t.wait(timeout=60)
        assert result["runtime"] == runtime
        expected = ids[py.pid] if runtime == "python" else ids[rb.pid]
        assert t.record.dispatcher_id == expected
        assert result["pid"] == (py.pid if runtime == "python" else rb.pid)
    assert {r[5] for r in read_xlog(xlog)} == {"python", "ruby"}


def test_a_task_waits_while_its_runtime_has_no_dispatcher(db: str, start_dispatcher: Start) -> None:
    start_dispatcher("python")
    r = qd.ruby_task("XJob.stamp").enqueue("waits", ms=1)
    p = xjobs.stamp.enqueue("runs", ms=1)
    p.wait(timeout=30)
    assert r.refresh().state == "new"
    start_dispatcher("ruby")
    assert r.wait(timeout=30)["runtime"] == "ruby"


def test_serial_queue_stays_serial_across_runtimes(db: str, start_dispatcher: Start) -> None:
    start_dispatcher("python", workers=4)
    start_dispatcher("ruby", workers=4)
    with qd.batch():
        tasks = []
        for i in range(16):
            if i % 3 == 0:
                tasks.append(qd.ruby_task("XJob.stamp", queue="mixed").enqueue(i, ms=15))
            else:
                tasks.append(xjobs.stamp.enqueue_with(queue="mixed")(i, ms=15))
        # parallel noise on both sides
        for i in range(10):
            xjobs.stamp.enqueue(f"p{i}", ms=15)
            qd.ruby_task("XJob.stamp").enqueue(f"r{i}", ms=15)
    results = [t.wait(timeout=60) for t in tasks]
    assert [r["label"] for r in results] == list(range(16))
    assert {r["runtime"] for r in results} == {"python", "ruby"}
    for a, b in zip(results, results[1:]):
        assert a["end"] <= b["start"], f"{a} overlaps {b}"


def test_ruby_task_after_failed_python_task_fails_without_running(db: str, start_dispatcher: Start, xlog: Path) -> None:
    start_dispatcher("python")
    start_dispatcher("ruby")
    bad = xjobs.fail_now.enqueue_with(retries=1)("doomed")
    after = qd.ruby_task("XJob.stamp", depends_on=[bad]).enqueue("never")
    after2 = xjobs.stamp.enqueue_with(depends_on=[after])("never either")
    with pytest.raises(qd.TaskFailed, match="designed to fail"):
        bad.wait(timeout=60)
    assert bad.attempts == 2
    for t in (after, after2):
        with pytest.raises(qd.TaskFailed) as info:
            t.wait(timeout=60)
        assert info.value.error.class_name == "DependencyFailed"
        assert t.started_at is None
        assert runs_of(xlog, t.id) == 0
    assert str(bad.id) in (after.error.message if after.error else "")


def test_ruby_task_after_successful_python_task_runs_after_it(db: str, start_dispatcher: Start) -> None:
    start_dispatcher("python")
    start_dispatcher("ruby")
    first = xjobs.stamp.enqueue("first", ms=200)
    second = qd.ruby_task("XJob.stamp", depends_on=[first], queue="q").enqueue("second", ms=1)
    third = xjobs.stamp.enqueue_with(depends_on=[second])("third", ms=1)
    r1, r2, r3 = first.wait(timeout=60), second.wait(timeout=60), third.wait(timeout=60)
    assert (r1["runtime"], r2["runtime"], r3["runtime"]) == ("python", "ruby", "python")
    assert r1["end"] <= r2["start"] and r2["end"] <= r3["start"]


def test_python_status_lists_both_runtimes(db: str, start_dispatcher: Start) -> None:
    py = start_dispatcher("python")
    rb = start_dispatcher("ruby")
    slow_py = xjobs.stamp.enqueue("slow", ms=3000)
    slow_rb = qd.ruby_task("XJob.stamp").enqueue("slow", ms=3000)
    wait_until("both slow tasks to run", lambda: slow_py.refresh().state == "running" and slow_rb.refresh().state == "running")
    out = subprocess.run([sys.executable, "-m", "queue_dispatcher", "status", "--db", db], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    assert any(str(py.pid) in line and "python" in line for line in lines), out
    assert any(str(rb.pid) in line and "ruby" in line for line in lines), out
    assert any("xjobs:stamp" in line for line in lines) and any("XJob.stamp" in line for line in lines), out
    rb_out = subprocess.run([RUBY_EXE, "status", "--db", db], check=True, capture_output=True, text=True, timeout=60).stdout
    assert any(str(py.pid) in line and "python" in line for line in rb_out.splitlines()), rb_out
    assert any("xjobs:stamp" in line for line in rb_out.splitlines()), rb_out
