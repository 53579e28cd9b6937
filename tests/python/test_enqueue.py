"""Enqueuing: the decorator and class-proxy APIs, options, the stored JSON format, refusals,
batches and dependencies (no worker involved)."""

import datetime as dt
import json
import threading
import time

import pytest

import qd_jobs
from conftest import sql
import queue_dispatcher as qd
from queue_dispatcher import _native


def row(db, task_id):
    cols = ["target", "runtime", "args", "queue", "priority", "retries", "timeout_ms"]
    (values,) = sql(db, f"SELECT {', '.join(cols)} FROM tasks WHERE id = ?", task_id)
    return dict(zip(cols, values))


def test_decorated_function_still_runs_directly():
    assert qd_jobs.add(2, 3) == 5
    assert qd_jobs.add.name == "qd_jobs:add"
    assert qd_jobs.add.__name__ == "add" and qd_jobs.add.__doc__ is None


def test_enqueue_stores_the_call_as_json(db):
    t = qd_jobs.echo.enqueue("a@b.c", 3, [1.5, None, True], subject="hi", n={"k": [1]})
    assert isinstance(t, qd.Task) and t.id > 0
    r = row(db, t.id)
    assert r["target"] == "qd_jobs:echo" and r["runtime"] == "python"
    assert json.loads(r["args"]) == {"args": ["a@b.c", 3, [1.5, None, True]], "kwargs": {"subject": "hi", "n": {"k": [1]}}}
    assert r["args"].startswith('{"args":[') and '"kwargs":{' in r["args"]
    assert t.state == "new" and t.queue is None and t.priority == 100
    assert t.args == (["a@b.c", 3, [1.5, None, True]], {"subject": "hi", "n": {"k": [1]}})


def test_tuples_become_lists_and_unicode_survives(db):
    t = qd_jobs.echo.enqueue((1, 2), "zürich ✓ \"q\"\n")
    assert t.args == ([[1, 2], "zürich ✓ \"q\"\n"], {})


def test_decorator_options_and_enqueue_with(db):
    @qd.task(queue="mail", priority=10, retries=3, timeout=60, name="tests.inline:send_mail")
    def send_mail(to, subject):
        return to

    t = send_mail.enqueue("a@b.c", subject="hi")
    r = row(db, t.id)
    assert (r["queue"], r["priority"], r["retries"], r["timeout_ms"]) == ("mail", 10, 3, 60000)

    before = time.time()
    t2 = send_mail.enqueue_with(queue="other", depends_on=[t], delay=5, meta={"user": 7}, unique_key="k1")("x@y.z", subject="later")
    assert t2.queue == "other" and t2.depends_on == [t.id]
    assert t2.run_at.timestamp() >= before + 4.9
    assert t2.meta == {"user": 7} and t2.unique_key == "k1"
    again = send_mail.enqueue_with(unique_key="k1")("dup", subject="dup")
    assert again.id == t2.id, "an unfinished task holding the unique_key is returned"

    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    t3 = send_mail.enqueue_with(run_at=at, queue=None)("z", subject="s")
    assert t3.queue is None
    assert abs(t3.run_at.timestamp() - at.timestamp()) < 0.01
    with pytest.raises(TypeError, match="unknown task option"):
        send_mail.enqueue_with(colour="red")


def test_listing_filters_by_meta(db, store):
    a = qd_jobs.noop.enqueue_with(meta={"user": 1})()
    qd_jobs.noop.enqueue_with(meta={"user": 2})()
    assert [r.id for r in store.list(meta={"user": 1})] == [a.id]


@pytest.mark.parametrize(
    "args, kwargs, needle",
    [
        ((float("nan"),), {}, "argument 0"),
        ((1, [2, float("inf")]), {}, "argument 1[1]"),
        ((), {"subject": float("-inf")}, "keyword argument \"subject\""),
        ((2**63,), {}, "64-bit"),
        ((-(2**63) - 1,), {}, "argument 0"),
        ((object(),), {}, "a object cannot be stored"),
        (({1: "x"},), {}, "JSON object keys must be str"),
        ((), {"when": dt.datetime(2020, 1, 1)}, "keyword argument \"when\""),
        ((b"bytes",), {}, "bytes"),
        (({"a": {"b": {1, 2}}},), {}, "argument 0[\"a\"][\"b\"]"),
    ],
)
def test_non_json_arguments_are_refused_naming_the_argument(db, store, args, kwargs, needle):
    with pytest.raises(qd.InvalidInputError) as e:
        qd_jobs.echo.enqueue(*args, **kwargs)
    assert needle in str(e.value), str(e.value)
    assert e.value.field == "args"
    assert store.list() == [], "nothing stored"


def test_extreme_but_valid_values_round_trip(db):
    t = qd_jobs.echo.enqueue(2**63 - 1, -(2**63), 1e308, -0.0, 0.1, "", [], {})
    assert t.args[0] == [2**63 - 1, -(2**63), 1e308, -0.0, 0.1, "", [], {}]


def test_self_referencing_arguments_are_refused(db):
    loop = []
    loop.append(loop)
    with pytest.raises(qd.InvalidInputError, match="nested deeper"):
        qd_jobs.echo.enqueue(loop)


def test_functions_in_main_need_an_explicit_name():
    def f():
        pass

    f.__module__ = "__main__"
    f.__qualname__ = "f"
    with pytest.raises(qd.InvalidInputError, match="__main__"):
        qd.task(f)
    named = qd.task(name="scripts.tool:f")(f)
    assert named.name == "scripts.tool:f"
    assert "scripts.tool:f" in qd.registered_names()


def test_nested_and_private_functions_are_refused():
    def inner():
        pass

    with pytest.raises(qd.InvalidInputError, match="inside a function"):
        qd.task(inner)

    def _private():
        pass

    _private.__qualname__ = "_private"
    with pytest.raises(qd.InvalidInputError, match="private"):
        qd.task(_private)


def test_a_name_cannot_be_registered_twice_for_different_functions():
    with pytest.raises(qd.InvalidInputError, match="already registered"):
        qd.task(name="qd_jobs:add")(lambda: None)


def test_class_proxy_enqueues_registered_methods(db):
    t = qd_jobs.LongRunningMailJob.enqueue().send_mail("a@b.c", subject="hi")
    assert isinstance(t, qd.Task)
    assert (t.target, t.queue) == ("qd_jobs:LongRunningMailJob.send_mail", "mail")
    t2 = qd_jobs.LongRunningMailJob.enqueue(queue="x", priority=5).deliver("z@z")
    assert (t2.target, t2.queue, t2.priority) == ("qd_jobs:LongRunningMailJob.deliver", "x", 5)
    names = qd.registered_names()
    assert "qd_jobs:LongRunningMailJob.describe" in names
    assert not any("_private_helper" in n or n.endswith(".prefix") for n in names)
    with pytest.raises(AttributeError, match="no job method"):
        qd_jobs.LongRunningMailJob.enqueue()._private_helper()
    with pytest.raises(AttributeError):
        qd_jobs.LongRunningMailJob.enqueue().prefix()


def test_dependent_tasks_assignment(db):
    a = qd_jobs.noop.enqueue_with(delay=3600)()
    b = qd_jobs.noop.enqueue_with(delay=3600)()
    c = qd_jobs.noop.enqueue_with(delay=3600)()
    c.dependent_tasks = a
    c.dependent_tasks = [b]
    assert sorted(x.id for x in c.dependent_tasks) == sorted([a.id, b.id])
    with pytest.raises(TypeError):
        c.dependent_tasks = "nope"


def test_batch_tasks_become_visible_together(db, store):
    seen = []
    with qd.batch():
        first = qd_jobs.noop.enqueue()
        second = qd_jobs.noop.enqueue()
        first.dependent_tasks = second  # the original idiom, race-free inside a batch
        t = threading.Thread(target=lambda: seen.append(len(qd.Store(db).list())))
        t.start()
        t.join()
    assert seen == [0], "other connections see nothing until the batch ends"
    assert len(store.list()) == 2
    assert first.refresh().depends_on == [second.id]


def test_a_failing_batch_is_rolled_back(db, store):
    with pytest.raises(RuntimeError):
        with qd.batch():
            qd_jobs.noop.enqueue()
            raise RuntimeError("abort the batch")
    assert store.list() == []
    with qd.batch():
        with qd.batch():
            qd_jobs.noop.enqueue()
    assert len(store.list()) == 1


def test_cancel_a_new_task(db):
    t = qd_jobs.noop.enqueue()
    assert t.cancel() == "aborted"
    assert t.state == "aborted"


def test_handles_compare_by_id(db):
    t = qd_jobs.noop.enqueue()
    assert t == qd.Task(t.id) and hash(t) == hash(qd.Task(t.id))
    assert "Task" in repr(t)


def test_encode_json_helpers():
    assert _native.encode_json({"a": [1, 2.5, None]}) == '{"a":[1,2.5,null]}'
    assert _native.decode_json('{"b":1,"a":2}') == {"b": 1, "a": 2}
    assert list(_native.decode_json('{"b":1,"a":2}')) == ["b", "a"], "key order kept"
    assert _native.encode_args((1,), {"x": "y"}) == '{"args":[1],"kwargs":{"x":"y"}}'


def test_database_location_from_argument_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QUEUE_DISPATCHER_DB", str(tmp_path / "env.db"))
    assert qd.Store().path.endswith("env.db")
    assert qd.Store(str(tmp_path / "arg.db")).path.endswith("arg.db")
    monkeypatch.delenv("QUEUE_DISPATCHER_DB")
    monkeypatch.chdir(tmp_path)
    assert qd.Store().path == "queue_dispatcher.db"
    assert (tmp_path / "queue_dispatcher.db").exists()
