"""Named crash points, a hook for crash-recovery tests (not a feature).

``UPASMAIL_CRASH_AT=<point>`` in the environment at start-up makes the
process kill itself (SIGKILL, as ``kill -9``) the first time it reaches
that point, so a test can stop a real server exactly between two durable
steps instead of racing it.  Unset (always, in production) each check
costs one comparison with a constant read once at import.  Points
(``mbox.mid-append``, ``queue.after-save``): see docs/configuration.rst.
"""

import os
import signal

_POINT = os.environ.get("UPASMAIL_CRASH_AT")


def reached(name):
    if _POINT == name:
        os.kill(os.getpid(), signal.SIGKILL)
