"""The folders by role, and the old flat module names that still import."""

import importlib
import os
import subprocess
import sys

import upasmail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_old_name_is_the_same_module_as_the_new():
    for old, new in upasmail.MOVED.items():
        a = importlib.import_module("upasmail." + old)
        b = importlib.import_module(new)
        assert a is b, old
        assert a.__name__ == new and a.__spec__.name == new, old


def test_every_moved_module_exists_where_it_is_said_to_be():
    for new in upasmail.MOVED.values():
        path = os.path.join(ROOT, *new.split(".")) + ".py"
        assert os.path.exists(path), new
    top = {n[:-3] for n in os.listdir(os.path.join(ROOT, "upasmail")) if n.endswith(".py")}
    assert not top & set(upasmail.MOVED), "a moved name is also a module at the top"


def test_from_imports_and_attributes_through_old_names():
    from upasmail.store import MailRoot
    from upasmail import server, queue
    assert MailRoot.__module__ == "upasmail.mailroot.store"
    assert server.UpasESMTP.__module__ == "upasmail.smtpd.server"
    assert queue.QueueRunner.__module__ == "upasmail.runq.queue"


def test_python_dash_m_under_an_old_name():
    """``python -m upasmail.checkconfig`` runs the module where it lives now."""
    proc = subprocess.run([sys.executable, "-m", "upasmail.checkconfig", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--check-config" in proc.stdout or "check" in proc.stdout


def test_a_name_that_never_was_is_not_found():
    try:
        importlib.import_module("upasmail.no_such_module")
    except ImportError:
        pass
    else:
        raise AssertionError("imported a module that does not exist")
