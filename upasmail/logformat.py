"""How a log event becomes a line: twistd's classic text (the same bytes,
made faster), JSON (``--log-json``) and journald's plain lines.  Pure:
functions of one event.
"""

import json
import string

from twisted.logger import (FileLogObserver, LogLevel, formatEvent, formatEventAsClassicLogText,
                            formatTime)


# A format string's parts, parsed once: twisted.logger parses every format
# again for every event (string.Formatter in Python), which was a tenth of
# the server's time per message.  None: a format the fast path leaves to
# Twisted (attribute or index lookups, calls, nested specs).
_PARTS = {}
_PARTS_MAX = 4096  # formats are the program's constants; this only bounds a leak
_CONVERT = {None: None, "s": str, "r": repr, "a": ascii}


def _parts(fmt):
    try:
        return _PARTS[fmt]
    except KeyError:
        pass
    parts = []
    try:
        for literal, name, spec, conversion in string.Formatter().parse(fmt):
            if name is not None and (not name.isidentifier() or "{" in spec
                                     or conversion not in _CONVERT):
                parts = None
                break
            parts.append((literal, name, spec, _CONVERT.get(conversion)))
    except ValueError:  # unbalanced braces: Twisted says how it failed
        parts = None
    if parts is not None:
        parts = tuple(parts)
    if len(_PARTS) < _PARTS_MAX:
        _PARTS[fmt] = parts
    return parts


def format_event(event):
    """``twisted.logger.formatEvent``, the same text, without parsing the
    format again for each event."""
    fmt = event.get("log_format")
    if fmt is None or "log_flattened" in event or not isinstance(fmt, str):
        return formatEvent(event)
    parts = _parts(fmt)
    if parts is None:
        return formatEvent(event)
    out = []
    try:
        for literal, name, spec, convert in parts:
            out.append(literal)
            if name is not None:
                value = event[name]
                if convert is not None:
                    value = convert(value)
                out.append(format(value, spec))
    except Exception:  # a missing field, a bad spec: Twisted's own words for it
        return formatEvent(event)
    return "".join(out)


class ClassicText:
    """``formatEventAsClassicLogText`` with twistd's time format, the same
    text, faster: the format parsed once (``format_event``) and the time
    stamp made once a second rather than for every line."""

    def __init__(self, time_format=None):
        self._time = (lambda when: formatTime(when)) if time_format is None else (
            lambda when: formatTime(when, time_format))
        self._second = None
        self._stamp = None

    def _stamp_for(self, when):
        if when is None or when < 0:
            return self._time(when)
        second = int(when)
        if when - second >= 0.9999995:  # rounds up to the next second
            return self._time(when)
        if second != self._second:
            self._stamp = self._time(second)
            self._second = second
        return self._stamp

    def __call__(self, event):
        if "log_failure" in event or "log_system" in event:  # tracebacks, legacy systems
            return formatEventAsClassicLogText(event, formatTime=self._time)
        text = format_event(event)
        if not text:
            return None
        level = event.get("log_level")
        line = "%s [%s#%s] %s" % (self._stamp_for(event.get("log_time")),
                                  event.get("log_namespace", "-"),
                                  "-" if level is None else level.name, text)
        return line.replace("\n", "\n\t") + "\n"


def faster_text_observer(observer):
    """A ``FileLogObserver`` writing the same lines as ``observer`` (twistd's
    text log) through ``ClassicText``, or None when ``observer`` does not
    write classic text lines (a --logger of the administrator's, say): a
    probe event must come out the same both ways."""
    fmt = getattr(observer, "formatEvent", None)
    out = getattr(observer, "_outFile", None)
    if not isinstance(observer, FileLogObserver) or fmt is None or out is None:
        return None
    mine = ClassicText()
    probe = {"log_format": "probe {n} {t!r}", "n": 1, "t": "x", "log_time": 1764460800.25,
             "log_namespace": "smtpd", "log_level": LogLevel.info}
    try:
        if fmt(dict(probe)) != mine(dict(probe)):
            return None
    except Exception:
        return None
    return FileLogObserver(out, mine)


# keys the legacy bridge (twisted.python.log) writes into shared events
_LEGACY_KEYS = frozenset(("message", "time", "system", "format", "isError", "log_legacy",
                          "failure", "printed"))
# journald's priority prefixes (sd-daemon(3)) by level
_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}


def event_fields(event):
    """An event's own fields: no ``log_*`` key, nothing the legacy bridge added."""
    legacy = _LEGACY_KEYS if "log_legacy" in event else ()
    failure = "log_failure" in event  # the bridge's ``why`` then, not ours
    return {k: v for k, v in event.items()
            if not k.startswith("log_") and k not in legacy and not (failure and k == "why")}


def event_text(event):
    """The line's text, with the traceback of a failure after it."""
    text = format_event(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def json_line(event):
    """One event as one line of JSON (the ``--log-json`` format)."""
    level = event.get("log_level") or LogLevel.info
    record = {"time": event.get("log_time"), "level": level.name,
              "namespace": event.get("log_namespace")}
    record.update(event_fields(event))
    record["text"] = event_text(event)
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def journal_line(event):
    """A plain line for journald: its priority prefix, no time (journald adds it)."""
    level = event.get("log_level") or LogLevel.info
    text = event_text(event).replace("\n", "\n  ")
    return "<%d>%s\n" % (_PRIORITY.get(level, 6), text)
