"""Named crash points for the crash tests (a test hook, not a feature).

``UPASMAIL_CRASH_AT=<point>`` in the environment, read once at start-up,
makes the process SIGKILL itself when it reaches that point, so a test
can kill a real server exactly between two durable steps.  Points:
``queue.after-save`` (the queue runner has saved a delivery's outcome and
not yet acted on it).  Unset, ``reached`` does nothing.
"""

import os
import signal

_POINT = os.environ.get("UPASMAIL_CRASH_AT")


def reached(name):
    if _POINT == name:
        os.kill(os.getpid(), signal.SIGKILL)
