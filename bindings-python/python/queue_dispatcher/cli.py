"""The command line: ``queue-dispatcher worker|status|reset|purge`` (also ``python -m
queue_dispatcher``). The worker's main thread owns signal handling and the shutdown wait; tasks
run on native worker threads. ``-b`` daemonizes before anything is opened; ``--processes``
starts children by exec (never a bare fork) and restarts any that dies."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from queue_dispatcher import _native
from queue_dispatcher._native import Error, PidFile
from queue_dispatcher._store import configure
from queue_dispatcher._worker import Worker

log = logging.getLogger("queue_dispatcher.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return n


def _seconds(text: str) -> float:
    x = float(text)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds >= 0")
    return x


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="queue-dispatcher", description="Run and inspect queue_dispatcher tasks.")
    p.add_argument("--version", action="version", version=f"queue_dispatcher {_native.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def db_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--db", metavar="PATH", help="database path, sqlite:///abs/path or postgres://user@host/db[?schema=S] (default: $QUEUE_DISPATCHER_DB, else ./queue_dispatcher.db)")

    w = sub.add_parser("worker", help="run tasks (a dispatcher with worker threads)",
                       description="Runs the registered tasks of the imported modules on worker threads until SIGTERM/SIGINT "
                                   "(a second signal leaves at once; unfinished tasks go back to the queue).")
    w.add_argument("-w", "--workers", type=_positive_int, default=10, help="worker threads per process (default 10)")
    w.add_argument("-i", "--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="module(s) defining the tasks (repeat, or comma-separate)")
    w.add_argument("-q", "--queues", metavar="A,B", help="serve only these named queues (default: all)")
    w.add_argument("--parallel", dest="parallel", action="store_true", default=None,
                   help="also run tasks without a queue (the default unless --queues is given)")
    w.add_argument("--no-parallel", dest="parallel", action="store_false", help="do not run tasks without a queue")
    db_option(w)
    w.add_argument("-p", "--processes", type=_positive_int, default=1,
                   help="worker processes under one supervisor that restarts any that dies (default 1)")
    w.add_argument("-b", "--background", action="store_true", help="daemonize (with a pid file and a log file)")
    w.add_argument("--pidfile", metavar="FILE", help="pid file, locked while running: a second start is refused (default with -b: ./queue-dispatcher.pid)")
    w.add_argument("--logfile", metavar="FILE", help="append logs here (default with -b: ./queue-dispatcher.log)")
    w.add_argument("--grace", type=_seconds, default=25.0, help="on SIGTERM/SIGINT, seconds running tasks may take to finish (default 25)")
    w.add_argument("--lease", type=_seconds, default=15.0, help="seconds without heartbeat before others recover this worker's tasks (default 15)")
    w.add_argument("--heartbeat", type=_seconds, default=1.0, help="heartbeat interval in seconds (default 1)")
    w.add_argument("--max-lost", type=_positive_int, default=5,
                   help="lost runs (dispatcher died) before a task is given up as aborted (default 5)")
    w.add_argument("--retry-base", type=_seconds, default=1.0, help="first retry delay in seconds, doubled per attempt (default 1)")
    w.add_argument("--name", help="dispatcher name shown by status (default host:pid)")
    w.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="INFO (default) logs lifecycle and failures; DEBUG adds a start and a finish line per task")
    w.set_defaults(run=cmd_worker)

    s = sub.add_parser("status", help="dispatchers alive, per-queue counts, running tasks with progress")
    db_option(s)
    s.set_defaults(run=cmd_status)

    r = sub.add_parser("reset", help="abort every unfinished task (running ones when their code returns)")
    db_option(r)
    r.set_defaults(run=cmd_reset)

    g = sub.add_parser("purge", help="delete finished tasks older than an age")
    g.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 90s, 15m, 12h, 7d, 2w")
    db_option(g)
    g.set_defaults(run=cmd_purge)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except Error as e:
        print(f"queue-dispatcher: {e}", file=sys.stderr)
        return 1


# -- admin commands ------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    sys.stdout.write(configure(args.db).status_report())
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    n = configure(args.db).reset()
    print(f"reset: {n} unfinished task(s) aborted")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    age = _native.parse_age(args.older_than)
    n = configure(args.db).purge(age)
    print(f"purge: {n} finished task(s) older than {args.older_than} deleted")
    return 0


# -- the worker ----------------------------------------------------------------------------------

class _Ready:
    """Tells the process that started a daemon whether it came up (through a pipe)."""

    fd: Optional[int] = None

    @classmethod
    def send(cls, message: str) -> None:
        if cls.fd is not None:
            try:
                os.write(cls.fd, message.encode())
                os.close(cls.fd)
            except OSError:
                pass
            cls.fd = None


def _daemonize(pidfile: str, logfile: str) -> PidFile:
    """Detaches (double fork, new session) before the engine opens anything; the original
    process exits once the daemon holds its pid file and has started, or reports why not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        msg = b"".join(chunks).decode(errors="replace")
        if msg.startswith("ok"):
            print(f"queue-dispatcher: started in the background, pid {msg[3:].strip()}, log {logfile}")
            os._exit(0)
        print(f"queue-dispatcher: {msg or 'the background process exited during startup; see ' + logfile}", file=sys.stderr)
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    _Ready.fd = w
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    try:
        return PidFile(pidfile)
    except Error as e:
        _Ready.send(f"error: {e}")
        os._exit(1)


def _configure_logging(level: str, logfile: Optional[str]) -> None:
    handler: logging.Handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def _import_tasks(modules: list[str]) -> None:
    # Like `python -m`: the working directory is importable. Modules come from this command
    # line only, never from the database.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for spec in modules:
        for name in filter(None, (m.strip() for m in spec.split(","))):
            importlib.import_module(name)


def _queues(args: argparse.Namespace) -> tuple[Optional[list[str]], bool]:
    queues = None if args.queues is None else [q for q in (x.strip() for x in args.queues.split(",")) if q]
    parallel = args.parallel if args.parallel is not None else queues is None
    return queues, parallel


def cmd_worker(args: argparse.Namespace) -> int:
    pid_lock: Optional[PidFile] = None
    logfile = args.logfile
    if args.background:
        pidfile = os.path.abspath(args.pidfile or "queue-dispatcher.pid")
        logfile = os.path.abspath(logfile or "queue-dispatcher.log")
        pid_lock = _daemonize(pidfile, logfile)
        logfile = None  # stderr is the log file now
    _configure_logging(args.log_level, logfile)
    try:
        if pid_lock is None and args.pidfile:
            pid_lock = PidFile(args.pidfile)
        if args.processes > 1:
            return _supervise(args)
        return _run_worker(args)
    except BaseException as e:
        _Ready.send(f"error: {e}")
        raise
    finally:
        if pid_lock is not None:
            pid_lock.release()


def _title(text: str) -> None:
    _native.set_process_title(text)


def _run_worker(args: argparse.Namespace) -> int:
    try:
        _import_tasks(args.imports)
    except Exception:
        log.exception("cannot import the task modules %s", ", ".join(args.imports))
        _Ready.send("error: cannot import the task modules (see the log)")
        return 2
    store = configure(args.db)
    queues, parallel = _queues(args)
    worker = Worker(args.workers, queues=queues, parallel=parallel, store=store, name=args.name,
                    lease=args.lease, heartbeat=args.heartbeat, max_lost=args.max_lost, retry_base=args.retry_base)
    signals = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            log.info("%s: claiming nothing more; running tasks may finish within %.0fs (signal again to leave at once)", name, args.grace)
            worker.stop_claiming()
        else:
            log.warning("%s again: leaving at once; unfinished tasks go back to the queue", name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    pool = worker.pool
    assert pool is not None
    if signals:
        worker.stop_claiming()  # the signal came while starting
    _Ready.send(f"ok {os.getpid()}")
    deadline: Optional[float] = None
    last_title = 0.0
    while True:
        if pool.wait(0.25):
            break
        if signals >= 2:
            break
        now = time.monotonic()
        if signals == 1:
            if deadline is None:
                deadline = now + args.grace
            elif now >= deadline:
                log.warning("grace period of %.0fs is over: leaving; unfinished tasks go back to the queue", args.grace)
                break
        if now - last_title >= 1.0:
            last_title = now
            state = "stopping" if signals else "running"
            _title(f"queue-dispatcher worker [{state}: {pool.busy}/{pool.workers} busy, {pool.done} done] {store.path}")
    clean = worker.stop(grace=0.0)
    if not clean:
        # Some task code is still running on a worker thread: its task was handed back to the
        # queue; leave without waiting for that code (threads cannot be killed).
        logging.shutdown()
        os._exit(0)
    return 0


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "queue_dispatcher", "worker", "--workers", str(args.workers),
            "--grace", str(args.grace), "--lease", str(args.lease), "--heartbeat", str(args.heartbeat),
            "--max-lost", str(args.max_lost), "--retry-base", str(args.retry_base), "--log-level", args.log_level]
    for m in args.imports:
        argv += ["--import", m]
    if args.queues is not None:
        argv += ["--queues", args.queues]
    if args.parallel is not None:
        argv.append("--parallel" if args.parallel else "--no-parallel")
    if args.db:
        argv += ["--db", args.db]
    if args.name:
        argv += ["--name", args.name]
    return argv


def _supervise(args: argparse.Namespace) -> int:
    """Runs ``--processes`` worker processes (started by exec) and restarts any that dies until
    told to stop; signals are passed on to the children."""
    argv = _child_argv(args)
    if "" not in sys.path and os.getcwd() not in sys.path:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    children: list[Optional[subprocess.Popen[bytes]]] = [None] * args.processes
    started: list[float] = [0.0] * args.processes
    signals = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        log.info("%s: stopping %d worker processes", signal.Signals(signum).name, args.processes)
        for c in children:
            if c is not None and c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn(i: int) -> None:
        children[i] = subprocess.Popen(argv)
        started[i] = time.monotonic()
        log.info("worker process %d started (pid %d)", i, children[i].pid)  # type: ignore[union-attr]

    for i in range(args.processes):
        spawn(i)
    _Ready.send(f"ok {os.getpid()}")
    while True:
        alive = 0
        for i, c in enumerate(children):
            if c is None:
                continue
            rc = c.poll()
            if rc is None:
                alive += 1
                continue
            if signals:
                children[i] = None
                continue
            log.warning("worker process %d (pid %d) exited with %s: restarting it", i, c.pid, rc)
            if time.monotonic() - started[i] < 1.0:
                time.sleep(1.0)  # do not spin on a child that cannot start
            spawn(i)
            alive += 1
        if signals and alive == 0:
            return 0
        _title(f"queue-dispatcher supervisor [{alive}/{args.processes} worker processes{', stopping' if signals else ''}]")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
