"""The Python half of `make demo`: tasks the Python dispatcher runs (`queue-dispatcher worker
--import demo_jobs`). The Ruby half is demo_jobs.rb; examples/demo.py enqueues both."""

import time

import queue_dispatcher as qd


def _work(steps: int, what: str, pause: float) -> None:
    t = qd.current_task()
    for i in range(1, steps + 1):
        time.sleep(pause)
        if t is not None:
            t.update_message(msg=f"{what} {i}/{steps}", perc_finished=100 * i / steps)


@qd.task(retries=1)
def fetch(source: str) -> dict:
    _work(6, f"fetching {source}", 0.4)
    return {"source": source, "rows": 100 * len(source)}


@qd.task
def notify(user: str) -> str:
    _work(2, f"texting {user}", 0.4)
    return f"sms to {user}"


@qd.task
def import_legacy(path: str) -> None:
    _work(2, f"reading {path}", 0.3)
    raise FileNotFoundError(f"{path}: no such file")


@qd.task
def thumbnail(image: str, width: int) -> str:
    _work(3, f"resizing {image}", 0.2)
    return f"{image}@{width}px"
