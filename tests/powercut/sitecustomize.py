"""Test hook for tests/test_durability_load.py, never installed: a server
started with this directory on PYTHONPATH and ``UPASMAIL_TEST_FSYNC_LOG``
set logs what each fsync made durable, so the test can take away what a
power cut would (``kill -9`` alone leaves the page cache in place).

One JSON line per fsync or fdatasync that succeeded: device, inode and the
size before the call (bytes written during the call may not be covered),
and for a directory the names it held before the call.
"""

import os

_LOG = os.environ.get("UPASMAIL_TEST_FSYNC_LOG")


def _logged(real):
    import json
    import stat

    def sync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        st = os.fstat(fd)
        names = os.listdir("/proc/self/fd/%d" % fd) if stat.S_ISDIR(st.st_mode) else None
        real(fd)
        line = json.dumps([st.st_dev, st.st_ino, st.st_size, names]) + "\n"
        out = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(out, line.encode())  # before the caller can answer 250
        finally:
            os.close(out)

    return sync


if _LOG:
    os.fsync = _logged(os.fsync)
    os.fdatasync = _logged(os.fdatasync)
