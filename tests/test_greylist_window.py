"""--greylist-min and --greylist-max: upas's 5-minute and 14-hour windows,
configurable (so that tests and clusters need not wait)."""

import pytest
from twisted.internet import task
from twisted.python import usage

from upasmail.cli.options import SmtpdOptions, reloaded_settings
from upasmail.rules import greylist
from upasmail.smtpd.statestore import LocalStateStore
from upasmail.testing import make_settings


def attempts(g, clock, *waits):
    out = []
    for wait in waits:
        clock.advance(wait)
        out.append(g.attempt("192.0.2.1", "198.51.100.7", ["bob@example.org"])[0][1])
    return out


def test_the_upas_window_by_default(tmp_path):
    clock = task.Clock()
    clock.advance(1000)
    g = greylist.Greylist(str(tmp_path), clock)
    assert attempts(g, clock, 0, 299, 301) == [greylist.NEW, greylist.OTHER, greylist.RECENT]


def test_a_shorter_window(tmp_path):
    clock = task.Clock()
    clock.advance(1000)
    g = greylist.Greylist(str(tmp_path), clock, min_age=2, max_age=10)
    assert attempts(g, clock, 0, 1, 2, 11) == [greylist.NEW, greylist.OTHER,
                                              greylist.RECENT, greylist.OTHER]


def test_the_store_takes_the_window_from_the_settings(tmp_path):
    settings = make_settings("", root=str(tmp_path / "mail"), greylist_min=2.0,
                             greylist_max=10.0)
    store = LocalStateStore(settings, task.Clock())
    assert (store.greylist.min_age, store.greylist.max_age) == (2.0, 10.0)


def parse(*args):
    o = SmtpdOptions()
    o.parseOptions(["--root", "mail"] + list(args))
    return o


def test_the_options_reach_the_settings():
    s = reloaded_settings(parse("--greylist-min", "1.5", "--greylist-max", "60"))
    assert (s.greylist_min, s.greylist_max) == (1.5, 60.0)
    s = reloaded_settings(parse())
    assert (s.greylist_min, s.greylist_max) == (300.0, 50400.0)


@pytest.mark.parametrize("args, text", [
    (["--greylist-min", "-1"], "--greylist-min cannot be negative"),
    (["--greylist-min", "100", "--greylist-max", "100"],
     "--greylist-max must be more than --greylist-min"),
    (["--greylist-max", "abc"], "--greylist-max"),
])
def test_bad_windows_are_usage_errors(args, text):
    with pytest.raises(usage.UsageError, match=text):
        parse(*args)
