"""Python benchmark (`make bench`, after the engine's): prints one JSON line per figure,
`{"bench": NAME, "value": N, "unit": U, ...}`, and asserts nothing. BENCH_SHORT=1 is the quick
CI pass. Every database lives in a fresh temporary directory.

- py_sqlite_insert_tx: raw SQLite through Python's sqlite3 (WAL, synchronous=NORMAL, one ~100-byte
  row per BEGIN IMMEDIATE/INSERT/COMMIT), the baseline measured in this same run;
- py_enqueue: `task.enqueue(arg)` from Python, one task per call, each durable when it returns;
  compared with the engine's own enqueue loop (no Python) measured in interleaved rounds;
- py_drain_2w: a `queue-dispatcher worker --workers 2` process draining no-op tasks (first start
  to last finish, from the stored times), beside the engine's own 2-thread drain in this run;
- py_latency_p50_ms / py_latency_p99_ms: enqueue-to-start latency of an idle worker process.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_jobs  # noqa: E402

import queue_dispatcher as qd  # noqa: E402
from queue_dispatcher import _native  # noqa: E402

SHORT = os.environ.get("BENCH_SHORT", "") not in ("", "0")
ROUNDS = 1 if SHORT else 5
N_ENQUEUE = 5_000 if SHORT else 20_000
N_DRAIN = 5_000 if SHORT else 20_000
DRAIN_ROUNDS = 1 if SHORT else 3
LATENCY_SAMPLES = 300 if SHORT else 2_000
ARG = "x" * 76  # ~100-byte stored arguments, like the engine's benchmark


def report(name: str, value: float, unit: str, **extra: object) -> None:
    print(json.dumps({"bench": name, "value": value, "unit": unit, **extra}), flush=True)


def fresh_db() -> tuple[tempfile.TemporaryDirectory[str], str]:
    d = tempfile.TemporaryDirectory(prefix="qd-pybench-")
    return d, os.path.join(d.name, "queue.db")


def sqlite_insert_tx(n: int) -> float:
    d, path = fresh_db()
    with d:
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        payload = json.dumps({"args": [ARG], "kwargs": {}}, separators=(",", ":"))
        ex = con.execute
        for _ in range(max(n // 10, 50)):
            ex("BEGIN IMMEDIATE"); ex("INSERT INTO t (payload) VALUES (?)", (payload,)); ex("COMMIT")
        start = time.perf_counter()
        for _ in range(n):
            ex("BEGIN IMMEDIATE"); ex("INSERT INTO t (payload) VALUES (?)", (payload,)); ex("COMMIT")
        rate = n / (time.perf_counter() - start)
        con.close()
    return rate


def core_enqueue(n: int) -> float:
    d, path = fresh_db()
    with d:
        _native._core_enqueue_rate(path, max(n // 10, 50), json.dumps({"args": [ARG], "kwargs": {}}))
        return _native._core_enqueue_rate(path, n, json.dumps({"args": [ARG], "kwargs": {}}))


def py_enqueue(n: int) -> float:
    d, path = fresh_db()
    with d:
        qd.configure(path)
        enqueue = bench_jobs.noop.enqueue
        for _ in range(max(n // 10, 50)):
            enqueue(ARG)
        start = time.perf_counter()
        for _ in range(n):
            enqueue(ARG)
        rate = n / (time.perf_counter() - start)
        qd.configure(os.path.join(d.name, "idle.db"))
    return rate


def start_worker(path: str, workers: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "queue_dispatcher", "worker", "--workers", str(workers), "--import", "bench_jobs", "--db", path],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    store = qd.get_store()
    end = time.monotonic() + 60
    while not any(d.alive and d.pid == proc.pid for d in store.dispatchers()):
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"worker did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.01)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def drain(n: int) -> float:
    d, path = fresh_db()
    with d:
        store = qd.configure(path)
        template = bench_jobs.noop._template
        for _ in range(n // 5000):
            store.enqueue_many([(template, (), None)] * 5000)
        store.enqueue_many([(template, (), None)] * (n % 5000))
        proc = start_worker(path, 2)
        try:
            while True:
                counts = store.counts()
                if sum(c.successful for c in counts) >= n:
                    break
                if proc.poll() is not None:
                    raise SystemExit("worker died during the drain")
                time.sleep(0.1)
        finally:
            stop_worker(proc)
        done = store.list(states=["successful"])
        first = min(r.started_at for r in done if r.started_at)
        last = max(r.finished_at for r in done if r.finished_at)
        qd.configure(os.path.join(d.name, "idle.db"))
    return n / ((last - first) / 1e6)


def core_drain(n: int) -> float:
    d, path = fresh_db()
    with d:
        return _native._core_drain_rate(path, n, 2)


def latency(samples: int) -> list[float]:
    d, path = fresh_db()
    with d:
        qd.configure(path)
        proc = start_worker(path, 2)
        out = []
        try:
            warm = samples // 20 + 10
            for i in range(warm + samples):
                time.sleep(0.002)
                t = bench_jobs.stamp.enqueue(time.clock_gettime_ns(time.CLOCK_BOOTTIME))
                ms = t.wait(timeout=30)
                if i >= warm:
                    out.append(ms)
        finally:
            stop_worker(proc)
            qd.configure(os.path.join(d.name, "idle.db"))
    return out


def nearest_rank(values: list[float], p: int) -> float:
    v = sorted(values)
    return v[max(0, -(-len(v) * p // 100) - 1)]


def main() -> None:
    baseline, core, py = [], [], []
    for _ in range(ROUNDS):
        baseline.append(sqlite_insert_tx(N_ENQUEUE))
        core.append(core_enqueue(N_ENQUEUE))
        py.append(py_enqueue(N_ENQUEUE))
    b, c, p = statistics.median(baseline), statistics.median(core), statistics.median(py)
    report("py_sqlite_insert_tx", round(b), "tx/s", library=f"python sqlite3 {sqlite3.sqlite_version}", rounds=ROUNDS, n=N_ENQUEUE)
    report("py_enqueue", round(p), "tasks/s", core_enqueue=round(c), ratio=round(p / c, 3),
           sqlite_insert_tx=round(b), rounds=ROUNDS, n=N_ENQUEUE)
    rates, core_rates = [], []
    for _ in range(DRAIN_ROUNDS):
        core_rates.append(core_drain(N_DRAIN))
        rates.append(drain(N_DRAIN))
    r, cr = statistics.median(rates), statistics.median(core_rates)
    # core_claim_complete_2t: the engine alone, 2 Rust threads, same run (the ceiling for Python).
    report("py_drain_2w", round(r), "tasks/s", core_claim_complete_2t=round(cr), ratio=round(r / cr, 3),
           n=N_DRAIN, rounds=DRAIN_ROUNDS, workers=2)
    lat = latency(LATENCY_SAMPLES)
    report("py_latency_p50_ms", round(nearest_rank(lat, 50), 3), "ms", samples=len(lat))
    report("py_latency_p99_ms", round(nearest_rank(lat, 99), 3), "ms", samples=len(lat))


if __name__ == "__main__":
    main()
