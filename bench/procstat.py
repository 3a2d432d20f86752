"""What a server costs, read from /proc: CPU time and memory of a process tree.

CPU is user + system time of every thread of every process in the tree,
plus the time of children that have exited and been waited for
(``cutime``/``cstime``: Postfix's master reaps its smtpd, cleanup and
delivery processes, so their time lands there).  Memory is the sum of
RSS, PSS and USS (private pages) of every process, from ``smaps_rollup``.
"""

import os

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        text = f.read()
    # the command name may hold blanks and parentheses: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def children(pid):
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def tree(roots):
    """``roots`` and all their descendants that are alive now."""
    seen, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or not os.path.exists("/proc/%d" % pid):
            continue
        seen.append(pid)
        todo.extend(children(pid))
    return seen


def cpu_seconds(roots):
    """User + system seconds of the trees under ``roots``, reaped children included."""
    total = 0
    for pid in tree(roots):
        try:
            f = _stat(pid)
        except OSError:
            continue
        # fields 14-17 (utime stime cutime cstime), counted from 3 after the name
        total += sum(int(x) for x in f[11:15])
    return total / TICK


def memory_kib(roots):
    """{'rss': .., 'pss': .., 'uss': ..} in KiB, summed over the trees."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    for pid in tree(roots):
        try:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    value = rest.split()
                    if not value or not value[0].isdigit():
                        continue
                    if key == "Rss":
                        out["rss"] += int(value[0])
                    elif key == "Pss":
                        out["pss"] += int(value[0])
                    elif key in ("Private_Clean", "Private_Dirty"):
                        out["uss"] += int(value[0])
        except OSError:
            continue
    return out
