"""Run a command in a process group of its own that ends with its parent.

``python influence/process_group.py CMD ARG...`` starts CMD as the leader of a new process
group and waits for it. When this process's parent dies (even by SIGKILL: Linux's
parent-death signal, with a once-a-second check of the parent as a fallback) or it is told
to stop (SIGTERM, SIGINT, SIGHUP), it kills CMD's whole group, workers included, so no
orphan keeps writing into an output folder. Its exit status is CMD's. ``reproduce_all``
runs every experiment through it. Imports nothing of the library, so it starts at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent(sig=signal.SIGTERM) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        except (OSError, AttributeError):
            pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: process_group.py CMD [ARG...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    child = subprocess.Popen(argv, start_new_session=True)

    def stop(signum, _frame):
        _kill_group(child.pid)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)

    def watch_parent():  # where the parent-death signal is not available
        while child.poll() is None:
            if os.getppid() != parent:
                stop(signal.SIGTERM, None)
            time.sleep(1.0)

    threading.Thread(target=watch_parent, daemon=True).start()
    rc = child.wait()
    _kill_group(child.pid)  # whatever the command left running in its group goes with it
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
