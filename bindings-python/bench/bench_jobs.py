"""Tasks of the Python benchmark (imported by the bench script and by its worker process)."""

import time

import queue_dispatcher as qd


@qd.task
def noop(*args, **kwargs):
    return None


@qd.task
def stamp(enqueued_ns):
    """Enqueue-to-start latency in ms, from the enqueuer's CLOCK_BOOTTIME stamp (shared by every
    process of this boot)."""
    return (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - enqueued_ns) / 1e6
