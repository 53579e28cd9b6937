"""`make demo`: one SQLite file, a Python and a Ruby dispatcher, one pipeline across both.

Starts `queue-dispatcher worker` (demo_jobs.py) and `queue_worker_dispatcher` (demo_jobs.rb) on a
fresh database, enqueues the pipeline below, shows live progress (a refreshing table on a terminal,
plain lines otherwise), prints a summary and stops both dispatchers with SIGTERM."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import queue_dispatcher as qd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import demo_jobs as jobs  # noqa: E402


def pipeline():
    with qd.batch():  # everything becomes visible to the dispatchers at once
        fetches = [jobs.fetch.enqueue(s) for s in ("sales", "stock", "web")]          # parallel, Python
        report = qd.ruby_task("ReportJob.render", depends_on=fetches).enqueue("Q3")   # Ruby after Python
        mail = qd.ruby_task("MailJob.send_mail", queue="mail")                         # serial queue 'mail'
        sms = jobs.notify.enqueue_with(queue="mail")                                   # ... shared with Python
        news = [mail.enqueue("ann@example.com"), sms("bob"), mail.enqueue("cy@example.com"), sms("dee")]
        done = jobs.notify.enqueue_with(depends_on=[report])("boss")                  # Python after Ruby
        legacy = jobs.import_legacy.enqueue("legacy.csv")                              # fails ...
        archive = qd.ruby_task("ReportJob.archive", depends_on=[legacy]).enqueue("legacy")  # ... so these
        thumb = jobs.thumbnail.enqueue_with(depends_on=[legacy])("legacy.png", 200)         # never run
    return fetches + [report] + news + [done, legacy, archive, thumb]


def label(t):
    args, kwargs = t.args
    return f"{t.target}({', '.join(repr(a) for a in args)})"


def bar(t, width=20):
    p = t.perc_finished or (100 if t.state == "successful" else 0)
    n = int(width * p / 100)
    return "[" + "#" * n + "." * (width - n) + f"] {p:3.0f}%"


def show(tasks, t0, tty, seen):
    rows = [f"{'id':>3}  {'task':<40} {'lang':<6} {'queue':<5} {'state':<10} progress"]
    for t in tasks:
        t.refresh()
        rows.append(f"{t.id:>3}  {label(t)[:40]:<40} {t.record.runtime:<6} {t.queue or '-':<5} {t.state:<10} "
                    f"{bar(t)} {(t.message or '')[:28]}")
        key = (t.state, t.message)
        if not tty and seen.get(t.id) != key:  # plain lines: one per change
            seen[t.id] = key
            print(f"{time.monotonic() - t0:5.1f}s  #{t.id} {label(t)} [{t.record.runtime}] {t.state}"
                  f"{': ' + t.message if t.message else ''}", flush=True)
    if tty:
        if seen.get("drawn"):
            sys.stdout.write(f"\x1b[{len(rows)}F\x1b[J")
        seen["drawn"] = True
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()


def summary(tasks):
    print(f"\n{'task':<40} {'language':<8} {'queue':<5} {'state':<10} {'duration':>8}  result / error")
    for t in tasks:
        t.refresh()
        took = f"{(t.finished_at - t.started_at).total_seconds():.2f}s" if t.started_at and t.finished_at else "-"
        out = repr(t.result) if t.state == "successful" else str(t.error)
        print(f"{label(t)[:40]:<40} {t.record.runtime:<8} {t.queue or '-':<5} {t.state:<10} {took:>8}  {out[:72]}")


def main():
    work = tempfile.mkdtemp(prefix="qd-demo-")
    db = os.path.join(work, "demo.db")
    qd.configure(db)
    log = open(os.path.join(work, "dispatchers.log"), "ab")
    dispatchers = [
        subprocess.Popen([sys.executable, "-m", "queue_dispatcher", "worker", "--import", "demo_jobs", "--db", db,
                          "--workers", "4"], cwd=HERE, stdout=log, stderr=log),
        subprocess.Popen(["queue_worker_dispatcher", "-r", os.path.join(HERE, "demo_jobs.rb"), "--db", db, "-w", "4"],
                         cwd=HERE, stdout=log, stderr=log),
    ]
    print(f"database {db}: Python dispatcher pid {dispatchers[0].pid}, Ruby dispatcher pid {dispatchers[1].pid}\n")
    t0, tty, seen = time.monotonic(), sys.stdout.isatty(), {}
    try:
        tasks = pipeline()
        while True:
            show(tasks, t0, tty, seen)
            if all(t.finished for t in tasks) or time.monotonic() - t0 > 60:
                break
            time.sleep(0.2)
        summary(tasks)
    finally:
        for d in dispatchers:
            d.send_signal(signal.SIGTERM)
        codes = [d.wait(timeout=60) for d in dispatchers]
        print(f"\ndispatchers stopped (exit {codes[0]}, {codes[1]}) after {time.monotonic() - t0:.1f}s; "
              f"logs in {work}/dispatchers.log")
    return 0 if all(t.finished for t in tasks) and codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
