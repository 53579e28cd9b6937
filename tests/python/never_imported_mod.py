"""Must never be imported by a worker: a row naming it runs nothing and imports nothing."""
import os

open(os.environ.get("QD_IMPORT_MARKER", "/tmp/qd-import-marker"), "w").close()


def run():
    return "should never run"
