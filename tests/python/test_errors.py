"""One package error base; every engine error variant maps to its own subclass."""

import subprocess
import sys

import pytest

import queue_dispatcher as qd
from queue_dispatcher import _native

from conftest import sql

VARIANTS = {
    "InvalidInput": qd.InvalidInputError,
    "NotFound": qd.TaskNotFoundError,
    "MissingDependency": qd.MissingDependencyError,
    "DependencyCycle": qd.DependencyCycleError,
    "InvalidState": qd.InvalidStateError,
    "StaleToken": qd.StaleTokenError,
    "NotADatabase": qd.NotADatabaseError,
    "SchemaTooNew": qd.SchemaTooNewError,
    "Busy": qd.BusyError,
    "Stopped": qd.StoppedError,
    "Storage": qd.StorageError,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_engine_variant_has_its_own_subclass(variant):
    cls = VARIANTS[variant]
    assert issubclass(cls, qd.Error) and cls is not qd.Error
    with pytest.raises(cls) as e:
        _native._raise_engine_error(variant)
    assert type(e.value) is cls
    assert str(e.value)


def test_the_classes_are_distinct():
    assert len(set(VARIANTS.values())) == len(VARIANTS)
    assert issubclass(qd.Error, Exception)
    for extra in (qd.TaskFailed, qd.TaskAborted, qd.WaitTimeout):
        assert issubclass(extra, qd.Error)


def test_variant_fields_become_attributes():
    with pytest.raises(qd.InvalidStateError) as e:
        _native._raise_engine_error("InvalidState")
    assert (e.value.task_id, e.value.state) == (1, "running")
    with pytest.raises(qd.SchemaTooNewError) as e2:
        _native._raise_engine_error("SchemaTooNew")
    assert (e2.value.found, e2.value.supported) == (99, 1)


def test_real_engine_errors_arrive_mapped(store, tmp_path):
    with pytest.raises(qd.TaskNotFoundError) as nf:
        store.task(424242)
    assert nf.value.task_id == 424242
    a = qd.Task(store.enqueue(_native.Template("qd_jobs:noop"), ()))
    with pytest.raises(qd.MissingDependencyError):
        a.dependent_tasks = 999999
    b = qd.Task(store.enqueue(_native.Template("qd_jobs:noop"), ()))
    b.dependent_tasks = a
    with pytest.raises(qd.DependencyCycleError):
        a.dependent_tasks = b
    with pytest.raises(qd.InvalidInputError) as bad:
        _native.Template("no colon here")
    assert bad.value.field == "target"

    not_db = tmp_path / "not-a-db"
    not_db.write_text("hello, this is not SQLite " * 100)
    with pytest.raises(qd.NotADatabaseError):
        qd.Store(str(not_db))

    newer = tmp_path / "newer.db"
    qd.Store(str(newer))  # created, then closed again (the handle is dropped)
    sql(str(newer), "PRAGMA user_version = 9999")
    with pytest.raises(qd.SchemaTooNewError):
        qd.Store(str(newer))


def test_busy_database_raises_busy_error(tmp_path):
    path = tmp_path / "busy.db"
    s = qd.Store(str(path), busy_timeout=0.2)
    # Another process holds the write lock (never Python's sqlite3 in this process: see conftest.sql).
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(qd.BusyError):
            s.enqueue(_native.Template("qd_jobs:noop"), ())
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    s.enqueue(_native.Template("qd_jobs:noop"), ())
