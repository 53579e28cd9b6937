"""Crash soak: two Python and two Ruby dispatchers on one SQLite file run ~5,000 tasks (serial queues
mixing both languages, parallel tasks, dependency chains across queues and languages, a few tasks
designed to fail with dependents), every task with 2 retries, a 2 s lease and a lost-run limit far
above the kill rate. A controller SIGKILLs a random dispatcher about every second and starts a
replacement. Each run appends start/end records (CLOCK_MONOTONIC µs) to a per-process log
(xjobs.py / xjobs.rb). A control run without kills must show no re-run at all.

    python3 tests/cross/soak.py [--tasks 5000] [--control-tasks 1000] [--seed N]

Needs the Python package installed and `queue_worker_dispatcher` on PATH (`make test-cross`).
The controller uses the engine in-process only to enqueue and read; the integrity check runs in a
separate process (Python's sqlite3 must never open the file inside this process)."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import queue_dispatcher as qd  # noqa: E402
import xjobs  # noqa: E402

LEASE = 2.0
HEARTBEAT = 0.4
MAX_LOST = 1000
RETRIES = 2
WORKERS = 4
QUEUES = 10
WAL_LIMIT = 64 * 1024 * 1024
RUBY_EXE = os.environ.get("QD_RUBY_EXE", "queue_worker_dispatcher")


def now_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass
class Spec:
    key: int
    runtime: str
    queue: Optional[str]
    deps: list[int]
    doomed: bool
    ms: int
    downstream: bool = False  # of a doomed task: must fail without running
    id: int = 0


def plan(n: int, rng: random.Random) -> list[Spec]:
    """Serial queues (~40%), parallel tasks, 4-step chains across queues and languages (~16%),
    and one doomed task per ~500 with a 2-step chain of dependents in other queues/languages."""
    specs: list[Spec] = []

    def add(runtime: str, queue: Optional[str], deps: list[int], doomed: bool = False, ms: int = 0) -> Spec:
        s = Spec(len(specs), runtime, queue, deps, doomed, ms or rng.randint(30, 350))
        specs.append(s)
        return s

    def lang() -> str:
        return rng.choice(("python", "ruby"))

    def some_queue() -> Optional[str]:
        return f"s{rng.randrange(QUEUES)}" if rng.random() < 0.5 else None

    doomed_n = max(2, n // 500)
    chains = n * 16 // 100 // 4
    serial = n * 40 // 100
    for _ in range(doomed_n):
        d = add(lang(), None, [], doomed=True, ms=5)
        a = add("ruby" if d.runtime == "python" else "python", f"s{rng.randrange(QUEUES)}", [d.key])
        b = add(lang(), some_queue(), [a.key])
        a.downstream = b.downstream = True
    for _ in range(chains):
        prev: Optional[Spec] = None
        for _ in range(4):
            prev = add(lang(), some_queue(), [prev.key] if prev else [])
    for _ in range(serial):
        add(lang(), f"s{rng.randrange(QUEUES)}", [], ms=rng.randint(10, 80))
    while len(specs) < n:
        add(lang(), None, [])
    # Interleave the kinds so every part of the mix is in flight while dispatchers die.
    order = list(range(len(specs)))
    rng.shuffle(order)
    # Dependencies must be enqueued first: stable topological order over the shuffled keys.
    placed: set[int] = set()
    out: list[Spec] = []
    pending = [specs[i] for i in order]
    while pending:
        rest = []
        for s in pending:
            if all(d in placed for d in s.deps):
                out.append(s)
                placed.add(s.key)
            else:
                rest.append(s)
        pending = rest
    return out


def enqueue_all(specs: list[Spec]) -> None:
    by_key = {s.key: s for s in specs}
    for start in range(0, len(specs), 500):
        with qd.batch():
            for s in specs[start:start + 500]:
                opts: dict[str, Any] = {"queue": s.queue, "retries": RETRIES,
                                        "depends_on": [by_key[d].id for d in s.deps]}
                if s.runtime == "python":
                    fn = xjobs.fail_now if s.doomed else xjobs.stamp
                    t = fn.enqueue_with(**opts)(s.key, ms=s.ms)
                else:
                    t = qd.ruby_task("XJob.fail_now" if s.doomed else "XJob.stamp", **opts).enqueue(s.key, ms=s.ms)
                s.id = t.id


@dataclass
class Proc:
    runtime: str
    popen: subprocess.Popen[bytes]
    started: float
    killed_at: Optional[int] = None


@dataclass
class Kill:
    pid: int
    runtime: str
    at: int                      # monotonic µs, right after SIGKILL
    in_flight: set[int] = field(default_factory=set)


class Soak:
    def __init__(self, name: str, n: int, kills: bool, seed: int, root: Path) -> None:
        self.name = name
        self.n = n
        self.kills_on = kills
        self.rng = random.Random(seed)
        self.dir = root / name
        self.dir.mkdir()
        self.db = str(self.dir / "queue.db")
        self.xlog = self.dir / "xlog"
        self.xlog.mkdir()
        self.procs: list[Proc] = []
        self.kills: list[Kill] = []
        self.wal_max = 0
        self.store = qd.configure(self.db)

    # -- dispatchers ---------------------------------------------------------------------------

    def spawn(self, runtime: str) -> Proc:
        env = dict(os.environ, QD_XLOG_DIR=str(self.xlog), PYTHONWARNINGS="error",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
        if runtime == "python":
            cmd = [sys.executable, "-m", "queue_dispatcher", "worker", "--import", "xjobs", "--db", self.db,
                   "--workers", str(WORKERS), "--lease", str(LEASE), "--heartbeat", str(HEARTBEAT),
                   "--max-lost", str(MAX_LOST), "--retry-base", "0.05", "--grace", "5", "--log-level", "WARNING"]
        else:
            cmd = [RUBY_EXE, "-r", str(HERE / "xjobs.rb"), "--db", self.db, "-w", str(WORKERS), "--lease", str(LEASE),
                   "--heartbeat", str(HEARTBEAT), "--max-lost", str(MAX_LOST), "--grace", "5"]
        out = open(self.dir / f"{runtime}-dispatchers.out", "ab")
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        proc = Proc(runtime, p, time.monotonic())
        self.procs.append(proc)
        return proc

    def live(self) -> list[Proc]:
        return [p for p in self.procs if p.killed_at is None and p.popen.poll() is None]

    def kill_one(self) -> None:
        registered = {d.pid: d.id for d in self.store.dispatchers() if d.alive}
        candidates = [p for p in self.live() if p.popen.pid in registered]
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        pid = victim.popen.pid
        # Frozen, the victim can neither commit nor log: what it runs now is exactly what the
        # kill interrupts (its committed running rows, and runs whose start it logged but not end).
        os.kill(pid, signal.SIGSTOP)
        running = {t.id for t in self.store.list(states=["running"]) if t.dispatcher_id == registered[pid]}
        open_runs = set()
        log = self.xlog / f"{victim.runtime}-{pid}.log"
        if log.exists():
            state: dict[int, int] = defaultdict(int)
            for line in log.read_text().splitlines():
                kind, tid = line.split(" ")[:2]
                state[int(tid)] += 1 if kind == "S" else -1
            open_runs = {t for t, v in state.items() if v > 0}
        os.kill(pid, signal.SIGKILL)
        at = now_us()
        victim.popen.wait()
        victim.killed_at = at
        self.kills.append(Kill(pid, victim.runtime, at, running | open_runs))
        self.spawn(victim.runtime)

    def sample_wal(self) -> None:
        try:
            self.wal_max = max(self.wal_max, os.path.getsize(self.db + "-wal"))
        except FileNotFoundError:
            pass

    # -- the run -------------------------------------------------------------------------------

    def run(self, cap: float) -> dict[str, Any]:
        specs = plan(self.n, self.rng)
        t0 = time.monotonic()
        enqueue_all(specs)
        for runtime in ("python", "python", "ruby", "ruby"):
            self.spawn(runtime)
        next_kill = time.monotonic() + 1.0
        while True:
            self.sample_wal()
            counts = self.store.counts()
            unfinished = sum(c.new + c.running for c in counts)
            if unfinished == 0:
                break
            if time.monotonic() - t0 > cap:
                self.fail(f"{unfinished} tasks unfinished after {cap:.0f}s", specs)
            for p in self.live():
                if p.popen.poll() is not None:
                    self.fail(f"a {p.runtime} dispatcher exited by itself with {p.popen.returncode}", specs)
            if self.kills_on and time.monotonic() >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.uniform(0.8, 1.2)
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        for p in self.live():
            p.popen.send_signal(signal.SIGTERM)
        for p in self.live():
            if p.popen.wait(timeout=60) != 0:
                self.fail(f"{p.runtime} dispatcher {p.popen.pid} stopped with {p.popen.returncode}", specs)
        self.sample_wal()
        return self.verify(specs, elapsed)

    def fail(self, why: str, specs: list[Spec]) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
        print(f"\nsoak {self.name} FAILED: {why}", file=sys.stderr)
        for f in sorted(self.dir.glob("*.out")):
            print(f"--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
        sys.stdout.write(self.store.status_report())
        raise SystemExit(1)

    # -- the checks ----------------------------------------------------------------------------

    def verify(self, specs: list[Spec], elapsed: float) -> dict[str, Any]:
        problems: list[str] = []

        def check(ok: bool, what: str) -> None:
            if not ok:
                problems.append(what)

        records = {t.id: t for t in self.store.list()}
        by_id = {s.id: s for s in specs}
        by_key = {s.key: s for s in specs}
        check(len(records) == len(specs), f"{len(records)} rows for {len(specs)} tasks")
        killed = {k.pid: k.at for k in self.kills}

        # Runs from the logs: (task id) -> [(start, end or None, pid, outcome)] in time order.
        runs: dict[int, list[tuple[int, Optional[int], int, str]]] = defaultdict(list)
        per: dict[tuple[int, int], list[tuple[str, int, str]]] = defaultdict(list)
        for f in self.xlog.glob("*.log"):
            for line in f.read_text().splitlines():
                kind, tid, at, pid, *rest = line.split(" ")
                per[(int(pid), int(tid))].append((kind, int(at), rest[0] if rest else ""))
        for (pid, tid), recs in per.items():
            recs.sort(key=lambda r: (r[1], r[0] == "S"))
            open_start: Optional[int] = None
            for kind, at, outcome in recs:
                if kind == "S":
                    check(open_start is None, f"task {tid}: two starts without an end in pid {pid}")
                    open_start = at
                else:
                    check(open_start is not None, f"task {tid}: an end without a start in pid {pid}")
                    runs[tid].append((open_start or at, at, pid, outcome))
                    open_start = None
            if open_start is not None:
                check(pid in killed, f"task {tid}: a run in pid {pid} never ended, and that dispatcher was not killed")
                runs[tid].append((open_start, None, pid, "killed"))
        for r in runs.values():
            r.sort()

        # 1. terminal states; 2. the expected outcome of every task.
        reruns = 0
        lost = 0
        for s in specs:
            rec = records.get(s.id)
            if rec is None:
                continue
            check(rec.state in ("successful", "error", "aborted"), f"task {s.id} ended {rec.state}")
            err = rec.error
            if s.doomed:
                check(rec.state == "error" and err is not None and "designed to fail" in err.message
                      and rec.attempts == RETRIES + 1,
                      f"doomed task {s.id}: {rec.state} after {rec.attempts} attempts ({err and err.message})")
            elif s.downstream:
                check(rec.state == "error" and err is not None and err.class_name == "DependencyFailed",
                      f"downstream task {s.id}: {rec.state} ({err and err.class_name})")
                check(not runs.get(s.id), f"downstream task {s.id} ran")
            else:
                check(rec.state == "successful",
                      f"task {s.id} ({s.runtime}, queue {s.queue}) ended {rec.state}: {err and (err.class_name, err.message)}")
            # 3. a successful task ran to its end at least once.
            if rec.state == "successful":
                check(any(o == "ok" for _, _, _, o in runs.get(s.id, [])), f"task {s.id} is successful but never ran to its end")
            # Re-runs: code starts beyond the attempts the store counted (lost runs are not attempts).
            starts = len(runs.get(s.id, []))
            reruns += max(0, starts - rec.attempts)
            lost += rec.lost

        # 4. re-runs bounded by what the kills interrupted.
        in_flight = sum(len(k.in_flight) for k in self.kills)
        check(reruns <= in_flight, f"{reruns} re-runs but only {in_flight} tasks were in flight at the kills")
        if not self.kills:
            check(reruns == 0 and lost == 0, f"control run: {reruns} re-runs, {lost} lost runs")

        # 5. no overlap within a serial queue (a killed run lasts until its kill).
        per_queue: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        for tid, rs in runs.items():
            q = by_id[tid].queue if tid in by_id else None
            if q is None:
                continue
            for start, end, pid, _ in rs:
                per_queue[q].append((start, end if end is not None else killed[pid], tid))
        for q, rs in per_queue.items():
            rs.sort()
            for (s1, e1, t1), (s2, e2, t2) in zip(rs, rs[1:]):
                check(s2 >= e1, f"queue {q}: task {t2} started {(e1 - s2) / 1000:.1f} ms before task {t1} ended")

        # 6. no task started before all its dependencies finished successfully.
        for s in specs:
            if not s.deps or not runs.get(s.id):
                continue
            first = runs[s.id][0][0]
            for d in s.deps:
                dep = by_key[d]
                check(records[dep.id].state == "successful", f"task {s.id} ran though dependency {dep.id} is {records[dep.id].state}")
                ends = [e for _, e, _, o in runs.get(dep.id, []) if e is not None and o == "ok"]
                check(bool(ends) and first > max(ends),
                      f"task {s.id} started before its dependency {dep.id} finished")

        # 7. tasks of killed dispatchers were recovered (claimed again) within lease + 2 s.
        recovered = 0
        slow: list[str] = []
        raced = 0
        for k in self.kills:
            for tid in k.in_flight:
                later = [start for start, _, pid, _ in runs.get(tid, []) if start > k.at]
                if not later:
                    # The stop can land inside the commit of an outcome (WAL frames written, not yet
                    # visible): SQLite keeps that commit, so the task is done and is not re-run. That
                    # is only possible for a run that reached its end in the killed process.
                    ended = any(pid == k.pid and end is not None for _, end, pid, _ in runs.get(tid, []))
                    check(ended and records[tid].state in ("successful", "error"),
                          f"task {tid} of killed dispatcher {k.pid} never ran again ({records[tid].state})")
                    raced += 1
                    continue
                delay = (min(later) - k.at) / 1e6
                if delay <= LEASE + 2.0:
                    recovered += 1
                else:
                    slow.append(f"task {tid}: {delay:.2f}s")
        check(not slow, f"recovered later than lease + 2 s: {', '.join(slow[:10])}")

        # 8. WAL bounded; 9. integrity.
        check(self.wal_max < WAL_LIMIT, f"-wal reached {self.wal_max} bytes")
        integrity = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])",
             self.db], capture_output=True, text=True, timeout=120)
        check(integrity.stdout.strip() == "ok", f"integrity_check: {integrity.stdout.strip()} {integrity.stderr.strip()}")

        summary = {"run": self.name, "tasks": len(specs), "kills": len(self.kills), "in_flight_at_kills": in_flight,
                   "recovered": recovered, "outcome_committed_at_kill": raced, "re_run": reruns, "lost_runs": lost, "seconds": round(elapsed, 1),
                   "wal_max_mib": round(self.wal_max / 2**20, 2),
                   "successful": sum(1 for r in records.values() if r.state == "successful"),
                   "error": sum(1 for r in records.values() if r.state == "error"),
                   "aborted": sum(1 for r in records.values() if r.state == "aborted")}
        print(json.dumps(summary), flush=True)
        if problems:
            print(f"soak {self.name} FAILED ({len(problems)} problems):", file=sys.stderr)
            for p in problems[:40]:
                print("  " + p, file=sys.stderr)
            raise SystemExit(1)
        return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--control-tasks", type=int, default=1000)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--cap", type=float, default=150.0, help="fail if the kill run takes longer (s)")
    p.add_argument("--keep", action="store_true", help="keep the databases and logs")
    args = p.parse_args()
    print(f"soak: seed {args.seed}, lease {LEASE}s, heartbeat {HEARTBEAT}s, max-lost {MAX_LOST}, {WORKERS} workers x 2 "
          f"dispatchers per language", flush=True)
    root = Path(tempfile.mkdtemp(prefix="qd-soak-"))
    try:
        for name, n, kills in (("control", args.control_tasks, False), ("kills", args.tasks, True)):
            Soak(name, n, kills, args.seed, root).run(args.cap)
    finally:
        if args.keep:
            print(f"soak: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
