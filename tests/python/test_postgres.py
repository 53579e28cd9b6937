"""The PostgreSQL store from Python: a postgres:// URL goes through the engine's own URL handling,
end to end (enqueue, in-process worker, result). Skipped unless QUEUE_DISPATCHER_TEST_PG is set."""

import os
import subprocess
import uuid

import pytest

import qd_jobs
import queue_dispatcher as qd

PG = os.environ.get("QUEUE_DISPATCHER_TEST_PG", "")


@pytest.mark.skipif(not PG, reason="PostgreSQL store skipped: QUEUE_DISPATCHER_TEST_PG is not set")
def test_a_postgres_url_runs_tasks_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    schema = f"qd_py_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = f"{PG}{'&' if '?' in PG else '?'}schema={schema}"
    monkeypatch.setenv("QUEUE_DISPATCHER_DB", url)
    try:
        store = qd.configure(url)
        assert store.path == url
        with qd.Worker(2):
            t = qd_jobs.add.enqueue(2, 3)
            assert t.wait(timeout=20) == 5
        assert t.state == "successful"
        with pytest.raises(qd.Error, match="not a valid PostgreSQL URL"):
            qd.Store("postgres://u@h:notaport/db")
    finally:
        subprocess.run(["psql", PG, "-qc", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'], check=False)
