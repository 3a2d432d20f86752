"""The fast log formatter (logs.format_event, logs.ClassicText) writes
exactly what twisted.logger writes, for every kind of event."""

import io

from hypothesis import given, settings, strategies as st
from twisted.logger import (FileLogObserver, LogLevel, formatEvent,
                            formatEventAsClassicLogText, textFileLogObserver)
from twisted.python.failure import Failure

from upasmail import logs


def classic(event):
    return formatEventAsClassicLogText(event)


class _Thing:
    attr = "attribute"

    def method(self):
        return "called"

    def __repr__(self):
        return "<thing>"


EVENTS = [
    {"log_format": "plain"},
    {"log_format": "{a} and {b!r} and {c:.3f} and {d:>6}", "a": "x", "b": "y", "c": 1.5,
     "d": 42},
    {"log_format": "{a!s} {a!a}", "a": "h\u00e9"},
    {"log_format": "{{escaped}} {a}", "a": 1},
    {"log_format": "missing {nothere}"},
    {"log_format": "{t.attr} {t.method()} {m()}", "t": _Thing(), "m": lambda: "made"},
    {"log_format": "{0}"},
    {"log_format": "{d[k]}", "d": {"k": "v"}},
    {"log_format": "{a:{w}}", "a": 1, "w": 5},
    {"log_format": "unbalanced {"},
    {"log_format": "bad spec {a:q}", "a": 1},
    {"log_format": b"bytes {a}", "a": 1},
    {"log_format": "two\nlines {a}", "a": "and\nthree"},
    {"log_format": ""},
    {"log_format": None},
    {},
    {"log_format": "{a}", "a": "x", "log_system": "legacy-system"},
    {"log_format": "{a}", "a": "x", "log_flattened": {"a": "flat"}},
    {"log_format": "{a}", "a": None, "log_level": None},
]


def with_meta(event, when=1764460800.5, level=LogLevel.info, namespace="smtpd"):
    e = dict(event)
    e.setdefault("log_time", when)
    if "log_level" not in e:
        e["log_level"] = level
    if namespace is not None:
        e.setdefault("log_namespace", namespace)
    return e


def test_format_event_is_twisteds():
    for event in EVENTS:
        assert logs.format_event(dict(event)) == formatEvent(dict(event)), event


def test_classic_text_is_twisteds():
    mine = logs.ClassicText()
    for event in EVENTS:
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            for namespace in ("smtpd", None):
                e = with_meta(event, level=level, namespace=namespace)
                assert mine(dict(e)) == classic(dict(e)), e


def test_failure_keeps_the_traceback():
    try:
        1 / 0
    except ZeroDivisionError:
        f = Failure()
    e = with_meta({"log_format": "it failed", "log_failure": f})
    assert logs.ClassicText()(dict(e)) == classic(dict(e))


def test_time_stamps_across_seconds():
    """The stamp made once a second is the stamp Twisted makes each time,
    also at the edges where microseconds round up to the next second."""
    mine = logs.ClassicText()
    base = 1764460799.0
    times = [base, base + 0.5, base + 0.9999994, base + 0.9999995, base + 0.9999999,
             base + 1.0, base + 1.0000001, base + 3600 * 5, 0.0, 0.9999997, None, -1.5,
             base + 0.25]
    for when in times + list(reversed(times)):
        e = with_meta({"log_format": "x"}, when=when)
        if when is None:
            del e["log_time"]
        assert mine(dict(e)) == classic(dict(e)), when


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}!:.ar sx0123()[]\n\u00e9", max_size=30),
       st.floats(min_value=0, max_value=4e9, allow_nan=False),
       st.dictionaries(st.sampled_from(["a", "s", "x", "r"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.floats(), st.none()),
                       max_size=4))
def test_any_format_as_twisted(fmt, when, fields):
    e = with_meta(dict(fields, log_format=fmt), when=when)
    assert logs.format_event(dict(e)) == formatEvent(dict(e))
    assert logs.ClassicText()(dict(e)) == classic(dict(e))


def test_twistds_observer_is_replaced_by_one_writing_the_same():
    out = io.StringIO()
    theirs = textFileLogObserver(out)
    mine = logs.faster_text_observer(theirs)
    assert isinstance(mine, FileLogObserver)
    for event in EVENTS:
        e = with_meta(event)
        theirs(dict(e))
        expected = out.getvalue()
        out.seek(0)
        out.truncate()
        mine(dict(e))
        assert out.getvalue() == expected, e
        out.seek(0)
        out.truncate()


def test_other_observers_are_left_alone():
    out = io.StringIO()
    assert logs.faster_text_observer(textFileLogObserver(out, timeFormat="%H:%M")) is None
    assert logs.faster_text_observer(FileLogObserver(out, lambda e: "other\n")) is None
    assert logs.faster_text_observer(lambda e: None) is None
