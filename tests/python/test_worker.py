"""Running tasks on an in-process dispatcher (native worker threads): outcomes, failure records,
retries, timeouts, cancellation, progress, callbacks, the class proxy and the registry gate."""

import threading
import time

import pytest

import qd_jobs
import queue_dispatcher as qd
from conftest import sql, wait_until
from queue_dispatcher import _native


def test_result_and_wait(worker):
    t = qd_jobs.add.enqueue(2, 3)
    assert t.wait(timeout=10) == 5
    assert t.state == "successful" and t.result == 5
    assert t.attempts == 1 and t.started_at and t.finished_at >= t.started_at
    e = qd_jobs.echo.enqueue(1, [2], k={"v": None})
    assert e.wait(10) == {"args": [1, [2]], "kwargs": {"k": {"v": None}}}


def test_failure_keeps_class_message_and_traceback(worker):
    t = qd_jobs.fail.enqueue("boom")
    with pytest.raises(qd.TaskFailed) as e:
        t.wait(10)
    err = e.value.error
    assert (err.class_name, err.message) == ("ValueError", "boom")
    assert "Traceback (most recent call last)" in err.traceback
    assert "qd_jobs.py" in err.traceback and "raise ValueError(message)" in err.traceback
    assert "ValueError: boom" in str(e.value) and f"task {t.id}" in str(e.value)
    assert t.state == "error" and t.error == err


def test_exception_classes_outside_builtins_are_qualified(worker):
    @qd.task(name="tests.inline:raise_custom")
    def raise_custom():
        raise qd.InvalidStateError("custom")

    with pytest.raises(qd.TaskFailed) as e:
        raise_custom.enqueue().wait(10)
    assert e.value.error.class_name == "queue_dispatcher.InvalidStateError"


def test_retries_keep_the_error_history(worker, tmp_path):
    t = qd_jobs.flaky.enqueue(str(tmp_path / "calls"))
    assert t.wait(20) == 3
    assert t.attempts == 3
    assert [e.message for e in t.error_history] == ["flaky call 1", "flaky call 2"]


def test_timeout_raises_the_flag_and_stores_a_timeout_error(worker):
    t = qd_jobs.spin_until_cancelled.enqueue_with(timeout=0.2)(10.0)
    with pytest.raises(qd.TaskFailed) as e:
        t.wait(20)
    assert e.value.error.class_name == "Timeout"


def test_cancel_a_running_task(worker, tmp_path):
    started = tmp_path / "started"
    t = qd_jobs.hold.enqueue(str(tmp_path / "never"), str(started))
    wait_until("the task to start", started.exists)
    assert t.cancel() == "running"
    with pytest.raises(qd.TaskAborted) as e:
        t.wait(20)
    assert e.value.error.class_name == "Cancelled"
    assert t.result is None


def test_progress_is_visible_while_running(worker, tmp_path):
    release = tmp_path / "release"
    t = qd_jobs.hold.enqueue(str(release), message="half way")
    wait_until("progress", lambda: t.refresh().message == "half way")
    assert t.perc_finished == 25.0 and t.state == "running"
    release.touch()
    assert t.wait(10) == "released"
    assert (t.message, t.perc_finished) == ("finishing", 100.0)


def test_current_task_outside_a_task_is_none():
    assert qd.current_task() is None


def test_current_task_inside(worker):
    @qd.task(name="tests.inline:introspect", queue="intro")
    def introspect():
        t = qd.current_task()
        with pytest.raises(qd.InvalidInputError):
            t.update_message(perc_finished=150.0)
        return [t.id, t.target, t.queue, t.attempt, t.cancelled, t.cancel_reason]

    t = introspect.enqueue()
    assert t.wait(10) == [t.id, "tests.inline:introspect", "intro", 1, False, None]


def test_class_proxy_runs_static_class_and_instance_methods(worker):
    job = qd_jobs.LongRunningMailJob
    assert job.enqueue().send_mail("a@b.c", subject="hi").wait(10) == "sent hi to a@b.c"
    assert job.enqueue(queue=None).describe(3).wait(10) == "LongRunningMailJob:3"
    assert job.enqueue().deliver("z").wait(10) == ["sent", "z"]


def test_callbacks_run_after_the_outcome_is_stored(worker):
    qd_jobs.CALLBACKS.clear()
    ok = qd_jobs.with_callbacks.enqueue()
    bad = qd_jobs.with_callbacks.enqueue("nope")
    assert ok.wait(10) == "ok"
    with pytest.raises(qd.TaskFailed):
        bad.wait(10)
    wait_until("callbacks", lambda: len(qd_jobs.CALLBACKS) == 2)
    assert sorted(qd_jobs.CALLBACKS) == sorted([
        ("success", ok.id, "successful", "ok"),
        ("error", bad.id, "error", "KeyError"),
    ])


def test_on_error_runs_for_a_failed_dependency_and_for_a_cancelled_task(worker):
    qd_jobs.CALLBACKS.clear()
    failing = qd_jobs.fail.enqueue_with(queue="first")("dep broke")
    dependent = qd_jobs.with_callbacks.enqueue_with(queue="second", depends_on=[failing])()
    with pytest.raises(qd.TaskFailed) as e:
        dependent.wait(10)
    assert e.value.error.class_name == "DependencyFailed"
    assert f"dependency {failing.id}" in e.value.error.message and "dep broke" in e.value.error.message
    assert dependent.attempts == 0, "the dependent never ran"
    cancelled = qd_jobs.with_callbacks.enqueue_with(delay=3600)()
    cancelled.cancel()
    wait_until("on_error callbacks", lambda: len(qd_jobs.CALLBACKS) == 2)
    assert sorted(c[:3] for c in qd_jobs.CALLBACKS) == sorted([
        ("error", dependent.id, "error"), ("error", cancelled.id, "aborted"),
    ])


def test_a_failing_callback_changes_nothing(worker, caplog):
    t = qd_jobs.with_bad_callback.enqueue()
    assert t.wait(10) == 1
    wait_until("the callback error to be logged", lambda: "callback exploded" in caplog.text)
    assert t.refresh().state == "successful"


def test_dependencies_wait_for_success(worker, tmp_path):
    log = tmp_path / "order"
    release = tmp_path / "release"
    first = qd_jobs.hold.enqueue(str(release))
    second = qd_jobs.record.enqueue_with(queue="other", depends_on=[first])(str(log), "second")
    time.sleep(0.3)
    assert second.refresh().state == "new"
    release.touch()
    assert second.wait(10) == "second"


def test_results_that_are_not_json_are_stored_as_text(worker, caplog):
    t = qd_jobs.returns_object.enqueue()
    result = t.wait(10)
    assert isinstance(result, str) and result.startswith("<object object at")
    assert "cannot be stored as JSON" in caplog.text


def test_unregistered_targets_fail_without_running_or_importing(worker, db, tmp_path):
    store = qd.get_store()
    evil = qd.Task(store.enqueue(_native.Template("qd_jobs:os.system"), ("touch /tmp/qd-pwned",)))
    unimported = qd.Task(store.enqueue(_native.Template("never_imported_mod:run"), ()))
    private = qd.Task(store.enqueue(_native.Template("qd_jobs:noop"), ()))
    sql(db, "UPDATE tasks SET target = 'qd_jobs:_append', state = 'new', run_at = 0 WHERE id = ?", private.id)
    for t in (evil, unimported, private):
        with pytest.raises(qd.TaskFailed) as e:
            t.wait(10)
        assert e.value.error.class_name == "UnregisteredTask"
        assert "not a registered task" in e.value.error.message
    assert not (tmp_path / "imported-marker").exists(), "the module named by the row was not imported"
    import sys
    assert "never_imported_mod" not in sys.modules
    assert qd_jobs.add.enqueue(1, 1).wait(10) == 2, "the worker carries on"


def test_tasks_can_enqueue_tasks(worker):
    child_id = qd_jobs.enqueue_child.enqueue(41).wait(10)
    assert qd.Task(child_id).wait(10) == 42


def test_named_queue_runs_one_at_a_time_in_order(worker, tmp_path):
    log = tmp_path / "serial"
    tasks = [qd_jobs.record.enqueue_with(queue="serial")(str(log), f"t{i}", 0.01) for i in range(8)]
    for t in tasks:
        t.wait(20)
    lines = log.read_text().split("\n")[:-1]
    assert [ln.split()[:2] for ln in lines] == [[kind, f"t{i}"] for i in range(8) for kind in ("start", "end")]


def test_parallel_tasks_overlap(db):
    barrier = threading.Barrier(3, timeout=10)

    @qd.task(name="tests.inline:meet")
    def meet():
        barrier.wait()
        return "met"

    with qd.Worker(3):
        tasks = [meet.enqueue() for _ in range(3)]
        assert [t.wait(20) for t in tasks] == ["met"] * 3


def test_wait_timeout(worker):
    t = qd_jobs.noop.enqueue_with(delay=3600)()
    with pytest.raises(qd.WaitTimeout):
        t.wait(timeout=0.1)
    assert isinstance(qd.WaitTimeout("x"), TimeoutError)


def test_queue_selection(db):
    mail = qd_jobs.noop.enqueue_with(queue="mail")()
    other = qd_jobs.noop.enqueue_with(queue="other")()
    parallel = qd_jobs.noop.enqueue()
    with qd.Worker(2, queues=["mail"]):
        mail.wait(10)
        time.sleep(0.3)
        assert other.refresh().state == "new" and parallel.refresh().state == "new"
    with qd.Worker(2, queues=[], parallel=True):
        parallel.wait(10)
        assert other.refresh().state == "new"


def test_stop_hands_back_unfinished_work(db, tmp_path):
    started = tmp_path / "started"
    w = qd.Worker(1).start()
    t = qd_jobs.hold.enqueue(str(tmp_path / "release"), str(started))
    wait_until("the task to start", started.exists)
    assert w.stop(grace=0.2) is False, "the task's code is still running"
    t.refresh()
    assert (t.state, t.lost) == ("new", 1), "released back to the queue, counted as lost"
    (tmp_path / "release").touch()
    with qd.Worker(1):
        assert t.wait(10) == "released"


def test_adding_a_dependency_to_a_started_task_raises(worker, tmp_path):
    started = tmp_path / "started"
    release = tmp_path / "release"
    running = qd_jobs.hold.enqueue(str(release), str(started))
    wait_until("the task to start", started.exists)
    other = qd_jobs.noop.enqueue_with(delay=3600)()
    with pytest.raises(qd.InvalidStateError) as e:
        running.dependent_tasks = other
    assert e.value.task_id == running.id and e.value.state == "running"
    release.touch()
    running.wait(10)
    with pytest.raises(qd.InvalidStateError):
        running.dependent_tasks = [other]


def test_waiting_releases_the_gil(db):
    t = qd_jobs.noop.enqueue_with(delay=3600)()
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    th = threading.Thread(target=count)
    th.start()
    try:
        time.sleep(0.05)
        before = counter[0]
        with pytest.raises(qd.WaitTimeout):
            t.wait(timeout=0.5)
        assert counter[0] - before > 10_000, "another Python thread ran while this one waited"
    finally:
        stop.set()
        th.join()


def test_worker_threads_release_the_gil_between_tasks(db):
    with qd.Worker(4) as w:
        counter = 0
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            counter += 1
        assert counter > 100_000, "idle worker threads do not hold the GIL"
        assert w.pool is not None and w.pool.busy == 0 and w.pool.alive == 4


def test_cli_defaults_to_ten_workers():
    from queue_dispatcher import cli

    args = cli._parser().parse_args(["worker", "--import", "x"])
    assert args.workers == 10 and args.processes == 1 and args.grace == 25.0


def test_async_tasks_run_to_completion(worker):
    assert qd_jobs.async_add.enqueue(2, 40).wait(10) == 42
    assert qd_jobs.AsyncJob.enqueue().compute(5).wait(10) == 15
