"""The command line and everything that needs several processes: workers in other processes,
serial queues across processes, crash recovery, signals, daemon mode, the supervisor, the admin
commands, durability of enqueue, and fork."""

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import warnings

import pytest

import qd_jobs
import queue_dispatcher as qd
from conftest import child_env, sql, wait_until

FAST_LEASE = ("--lease", "1", "--heartbeat", "0.2")


def run_cli(*args, db=None, cwd=None, timeout=60):
    cmd = [sys.executable, "-m", "queue_dispatcher", *args]
    if db:
        cmd += ["--db", db]
    return subprocess.run(cmd, env=child_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def reap(pid, timeout):
    """waitpid with a deadline: a child that hangs is killed instead of hanging the suite."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} did not finish within {timeout}s")


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_worker_process_runs_tasks_and_logs(db, start_worker):
    w = start_worker("--log-level", "DEBUG")
    t = qd_jobs.add.enqueue(20, 22)
    assert t.wait(20) == 42
    bad = qd_jobs.fail.enqueue("remote boom")
    with pytest.raises(qd.TaskFailed) as e:
        bad.wait(20)
    assert e.value.error.class_name == "ValueError" and "remote boom" in e.value.error.traceback
    assert t.refresh().record.dispatcher_id is not None
    wait_until("log lines", lambda: f"task {bad.id} qd_jobs:fail failed" in w.output())
    out = w.output()
    assert "dispatcher" in out and "started: 2 workers" in out
    assert f"task {t.id} qd_jobs:add started" in out and f"task {t.id} qd_jobs:add successful" in out

    def title():
        with open(f"/proc/{w.pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")

    wait_until("the status line in the process title", lambda: title().startswith("queue-dispatcher worker [running: "), timeout=5)
    assert "done]" in title()


def test_console_script_is_installed():
    exe = os.path.join(sysconfig.get_path("scripts"), "queue-dispatcher")
    assert os.access(exe, os.X_OK), "pip install put the queue-dispatcher script next to python"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and qd.__version__ in r.stdout


def test_serial_queue_order_across_two_worker_processes(db, start_worker, tmp_path):
    log = tmp_path / "serial.log"
    with qd.batch():
        tasks = [qd_jobs.record.enqueue_with(queue="serial")(str(log), f"t{i}", 0.02) for i in range(12)]
        others = [qd_jobs.record.enqueue(str(tmp_path / "parallel.log"), f"p{i}", 0.02) for i in range(6)]
    start_worker(workers=3)
    start_worker(workers=3)
    for t in tasks + others:
        t.wait(60)
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert [ln[:2] for ln in lines] == [[kind, f"t{i}"] for i in range(12) for kind in ("start", "end")], \
        "one at a time, in enqueue order, across processes"


def test_dependencies_across_queues_including_a_failed_one(db, start_worker, tmp_path):
    log = tmp_path / "deps.log"
    with qd.batch():
        a = qd_jobs.record.enqueue_with(queue="q1")(str(log), "a", 0.2)
        b = qd_jobs.record.enqueue_with(queue="q2", depends_on=[a])(str(log), "b")
        bad = qd_jobs.fail.enqueue_with(queue="q3")("upstream failed")
        c = qd_jobs.record.enqueue_with(queue="q2", depends_on=[bad])(str(log), "c")
        d = qd_jobs.record.enqueue(str(log), "d")
        d.dependent_tasks = [c]  # transitive: c never runs, so neither does d
    start_worker(workers=4)
    assert b.wait(30) == "b"
    lines = log.read_text().splitlines()
    assert lines.index(f"end a {lines[0].split()[2]}") < [i for i, ln in enumerate(lines) if ln.startswith("start b")][0]
    for t in (c, d):
        with pytest.raises(qd.TaskFailed) as e:
            t.wait(30)
        assert e.value.error.class_name == "DependencyFailed"
        assert t.attempts == 0
    assert "dependency" in c.error.message and str(bad.id) in c.error.message
    assert not any(" c " in f" {ln} " or " d " in f" {ln} " for ln in lines)


def test_sigkill_mid_task_is_recovered_by_another_worker(db, start_worker, tmp_path):
    started = tmp_path / "started"
    release = tmp_path / "release"
    victim = start_worker(*FAST_LEASE)
    t = qd_jobs.hold.enqueue_with(queue="crashy")(str(release), str(started))
    wait_until("the task to start in the victim", started.exists)
    assert started.read_text().split()[1] == str(victim.pid)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    release.touch()
    rescuer = start_worker(*FAST_LEASE)
    assert t.wait(30) == "released"
    t.refresh()
    assert (t.state, t.lost, t.attempts) == ("successful", 1, 1), "a lost run is not an attempt"
    runs = [ln.split()[1] for ln in started.read_text().splitlines()]
    assert runs == [str(victim.pid), str(rescuer.pid)]


def test_max_lost_gives_a_task_up_after_that_many_lost_runs(db, start_worker, tmp_path):
    started = tmp_path / "started"
    release = tmp_path / "release"  # never created: every run holds until its worker dies
    t = qd_jobs.hold.enqueue_with(queue="crashy")(str(release), str(started))
    victims = []
    for run in (1, 2):
        w = start_worker(*FAST_LEASE, "--max-lost", "1")
        wait_until(f"run {run} to start", lambda: len(started.read_text().splitlines()) == run if started.exists() else False)
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(10)
        victims.append(w)
    # The first lost run went back to `new` (1 <= --max-lost 1); the second one is one too many.
    start_worker(*FAST_LEASE, "--max-lost", "1")
    wait_until("the task to be given up", lambda: t.refresh().state == "aborted", timeout=30)
    assert t.lost == 2 and "worker lost more than 1 times" in t.error.message
    assert [ln.split()[1] for ln in started.read_text().splitlines()] == [str(v.pid) for v in victims]


def test_sigterm_finishes_running_tasks_and_claims_nothing_new(db, start_worker, tmp_path):
    started = tmp_path / "started"
    release = tmp_path / "release"
    w = start_worker("--grace", "30")
    t = qd_jobs.hold.enqueue(str(release), str(started))
    wait_until("the task to start", started.exists)
    w.proc.send_signal(signal.SIGTERM)
    wait_until("the stop to be logged", lambda: "claiming nothing more" in w.output())
    later = qd_jobs.noop.enqueue()
    time.sleep(0.5)
    assert w.proc.poll() is None, "still finishing the running task"
    release.touch()
    assert w.proc.wait(30) == 0
    assert t.refresh().state == "successful" and t.result == "released"
    assert later.refresh().state == "new", "nothing new was claimed after SIGTERM"
    assert not qd.get_store().dispatcher_alive(), "the heartbeat row is gone"


def test_a_second_signal_leaves_at_once_and_loses_nothing(db, start_worker, tmp_path):
    started = tmp_path / "started"
    release = tmp_path / "release"
    w = start_worker()
    t = qd_jobs.hold.enqueue(str(release), str(started))
    wait_until("the task to start", started.exists)
    w.proc.send_signal(signal.SIGINT)
    wait_until("the stop to be logged", lambda: "claiming nothing more" in w.output())
    w.proc.send_signal(signal.SIGTERM)
    w.proc.wait(10)
    t.refresh()
    assert (t.state, t.lost) == ("new", 1), "the interrupted task went back to the queue"
    release.touch()
    start_worker()
    assert t.wait(30) == "released"


def test_grace_period_expiry_hands_tasks_back(db, start_worker, tmp_path):
    started = tmp_path / "started"
    w = start_worker("--grace", "0.5")
    t = qd_jobs.hold.enqueue(str(tmp_path / "never"), str(started))
    wait_until("the task to start", started.exists)
    w.proc.send_signal(signal.SIGTERM)
    w.proc.wait(15)
    assert "grace period" in w.output()
    assert t.refresh().state == "new"


def test_unknown_task_in_the_database_is_an_error_not_a_crash(db, start_worker, tmp_path):
    from queue_dispatcher import _native

    store = qd.get_store()
    w = start_worker()
    ids = [store.enqueue(_native.Template("myapp.jobs:os.system"), ("touch pwned",)),
           store.enqueue(_native.Template("never_imported_mod:run"), ())]
    for i in ids:
        with pytest.raises(qd.TaskFailed) as e:
            qd.Task(i).wait(20)
        assert e.value.error.class_name == "UnregisteredTask"
    assert not (tmp_path / "imported-marker").exists() and not (tmp_path / "pwned").exists()
    assert w.proc.poll() is None
    assert qd_jobs.add.enqueue(1, 2).wait(20) == 3


def test_progress_is_visible_from_another_process(db, start_worker, tmp_path):
    release = tmp_path / "release"
    start_worker()
    t = qd_jobs.hold.enqueue(str(release), message="converting page 3")
    wait_until("progress from the worker process", lambda: t.refresh().message == "converting page 3")
    assert t.perc_finished == 25.0 and t.state == "running"
    status = run_cli("status", db=db)
    assert status.returncode == 0, status.stderr
    for needle in ("dispatchers:", "alive", "queues:", "running tasks:", "qd_jobs:hold", "25%", "converting page 3"):
        assert needle in status.stdout, f"{needle!r} missing from:\n{status.stdout}"
    release.touch()
    assert t.wait(20) == "released"


def test_callbacks_run_in_the_worker_process(db, start_worker, tmp_path):
    cb = tmp_path / "callbacks"
    start_worker(env={"QD_CALLBACK_FILE": str(cb)})
    ok = qd_jobs.cross_process_callbacks.enqueue()
    bad = qd_jobs.cross_process_callbacks.enqueue(ok=False)
    ok.wait(20)
    with pytest.raises(qd.TaskFailed):
        bad.wait(20)
    wait_until("both callbacks", lambda: cb.exists() and len(cb.read_text().splitlines()) == 2)
    assert sorted(cb.read_text().splitlines()) == sorted([f"{ok.id} successful", f"{bad.id} error"])


def test_status_reset_and_purge_commands(db, tmp_path):
    empty = run_cli("status", db=db)
    assert empty.returncode == 0 and "dispatchers: none running" in empty.stdout
    pending = [qd_jobs.noop.enqueue_with(queue="mail", delay=3600)() for _ in range(3)]
    status = run_cli("status", db=db)
    assert "mail" in status.stdout and "WAITING" in status.stdout
    r = run_cli("reset", db=db)
    assert r.returncode == 0 and "3 unfinished" in r.stdout
    assert {t.refresh().state for t in pending} == {"aborted"}
    with qd.Worker(2):
        done = [qd_jobs.noop.enqueue() for _ in range(4)]
        for t in done:
            t.wait(20)
    keep = run_cli("purge", "--older-than", "7d", db=db)
    assert keep.returncode == 0 and "0 finished" in keep.stdout
    time.sleep(1.1)
    purged = run_cli("purge", "--older-than", "1s", db=db)
    assert re.search(r"purge: [4-7] finished task\(s\) older than 1s deleted", purged.stdout), purged.stdout
    assert qd.get_store().list(states=["successful"]) == []
    bad = run_cli("purge", "--older-than", "7 days", db=db)
    assert bad.returncode == 1 and "unknown unit" in bad.stderr, bad.stderr


def test_database_from_the_environment(db, tmp_path):
    qd_jobs.noop.enqueue()
    r = subprocess.run([sys.executable, "-m", "queue_dispatcher", "status"], env=child_env(QUEUE_DISPATCHER_DB=db),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and db in r.stdout


def test_background_mode_with_pid_file_refuses_to_start_twice(db, tmp_path):
    pidfile, logfile = tmp_path / "w.pid", tmp_path / "w.log"
    cmd = ["worker", "-b", "--pidfile", str(pidfile), "--logfile", str(logfile), "--workers", "2", "--import", "qd_jobs"]
    first = run_cli(*cmd, db=db, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "started in the background" in first.stdout
    pid = int(pidfile.read_text())
    try:
        assert qd_jobs.add.enqueue(2, 2).wait(30) == 4
        second = run_cli(*cmd, db=db, cwd=tmp_path)
        assert second.returncode == 1
        assert "refusing to start twice" in second.stderr and str(pid) in second.stderr
        assert int(pidfile.read_text()) == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until("the daemon to exit", lambda: gone(pid), timeout=30)
    assert not pidfile.exists(), "the pid file is removed on exit"
    assert "dispatcher" in logfile.read_text()


def test_supervisor_restarts_a_dead_worker_process(db, start_worker, tmp_path):
    sup = start_worker("--processes", "2", *FAST_LEASE, ready=False)
    store = qd.get_store()

    def alive_pids():
        return {d.pid for d in store.dispatchers() if d.alive}

    wait_until("two worker processes", lambda: len(alive_pids()) == 2, timeout=30)
    first = alive_pids()
    assert sup.pid not in first
    victim = sorted(first)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until("a replacement process", lambda: len(alive_pids() - first) == 1 and victim not in alive_pids(), timeout=30)
    assert "restarting it" in sup.output()
    assert qd_jobs.add.enqueue(5, 5).wait(30) == 10
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(30) == 0
    wait_until("children gone", lambda: not store.dispatcher_alive(), timeout=10)


def test_enqueued_tasks_survive_sigkill_of_the_enqueuer(db, tmp_path):
    code = (
        "import sys, qd_jobs, queue_dispatcher as qd\n"
        "qd.configure(sys.argv[1])\n"
        "while True:\n"
        "    print(qd_jobs.noop.enqueue().id, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, db], env=child_env(), stdout=subprocess.PIPE, text=True)
    returned = [int(proc.stdout.readline()) for _ in range(300)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    stored = {r.id for r in qd.get_store().list()}
    assert set(returned) <= stored, "every enqueue that returned is in the database"


def test_fork_keeps_handles_working(db, start_worker):
    before = qd_jobs.add.enqueue(1, 2)
    start_worker()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child_task = qd_jobs.add.enqueue(20, 22)
            code = 0 if child_task.wait(30) == 42 else 3
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 2
        os._exit(code)
    status = reap(pid, timeout=60)
    assert os.waitstatus_to_exitcode(status) == 0, "the child enqueued a task that a worker ran"
    assert before.wait(30) == 3
    assert qd_jobs.add.enqueue(3, 4).wait(30) == 7, "the parent's handle keeps working"
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]
    states = {r.state for r in qd.get_store().list()}
    assert states == {"successful"}


def test_bad_arguments_are_reported(db):
    r = run_cli("worker", "--workers", "0", db=db)
    assert r.returncode == 2 and "must be at least 1" in r.stderr
    r = run_cli("worker", "--import", "no_such_module_xyz", db=db, timeout=60)
    assert r.returncode == 2 and "cannot import" in r.stderr


def test_fork_of_a_process_running_an_in_process_worker(db, tmp_path):
    """gunicorn-style: a process with a running in-process Worker forks; the child enqueues, the
    parent's worker threads run it, and the child exits normally without waiting for threads it
    does not have. The fork happens while the worker is idle: forking while one of the engine's
    threads is inside an SQLite transaction can leave the child's SQLite lock bookkeeping wedged
    (an engine-level fork-prepare hook is requested; SQLite's global mutexes are already held
    across the fork by the package's hook)."""
    script = tmp_path / "forker.py"
    script.write_text(
        "import os, sys, warnings\n"
        "import qd_jobs, queue_dispatcher as qd\n"
        "qd.configure(sys.argv[1])\n"
        "w = qd.Worker(2).start()\n"
        "assert qd_jobs.add.enqueue(1, 1).wait(30) == 2\n"
        "import time; time.sleep(0.5)  # let the engine's threads go idle\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore', DeprecationWarning)\n"
        "    pid = os.fork()\n"
        "if pid == 0:\n"
        "    assert qd_jobs.add.enqueue(2, 3).wait(30) == 5\n"
        "    sys.exit(0)  # normal exit: atexit and GC run in the child\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
        "assert w.stop(grace=10)\n"
        "print('parent ok')\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), db], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the forked child too
        out, err = proc.communicate()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert r.returncode == 0, r.stderr
    assert "parent ok" in r.stdout
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]
