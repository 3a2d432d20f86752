"""Defects found by the operations review of issue 15 (an administrator
following the docs, and a hostile client), each with its regression test."""

import os
import smtplib
import socket

from test_stdio import Session
from test_privdrop import NOBODY, DroppedServer, owners, python_for_nobody, world  # noqa: F401


def test_a_restart_as_root_with_uid_keeps_routing_json_the_run_users(world):  # noqa: F811
    """routing.json was rewritten as root before twistd's switch: the second
    start-up on the same mail root found it root's and stopped ("routing
    record ... is not writable by nobody")."""
    python = python_for_nobody(world)
    first = DroppedServer(world, python=python)
    first.stop()
    again = DroppedServer(world, "--sysname", "other.example.org", python=python)
    try:
        with smtplib.SMTP("127.0.0.1", again.port) as c:  # it serves: start-up passed
            assert c.noop()[0] == 250
        assert again.proc.poll() is None, again.output()
    finally:
        again.stop()
    assert owners(again.root)["routing.json"] == (NOBODY, NOBODY)


def test_a_link_planted_for_routing_json_tmp_is_not_followed_as_root(world):  # noqa: F811
    """Root rewrote routing.json before the switch, through whatever the run
    user had put at ``routing.json.tmp``: a root-owned file was overwritten."""
    python = python_for_nobody(world)
    first = DroppedServer(world, python=python)
    first.stop()
    victim = os.path.join(world, "victim")
    with open(victim, "w") as f:
        f.write("root's own\n")
    os.chmod(victim, 0o600)
    # the run user owns the mail root: it can put a link where root writes
    os.symlink(victim, os.path.join(first.root, "routing.json.tmp"))
    again = DroppedServer(world, "--sysname", "other.example.org", python=python)
    try:
        again.wait_for("cannot record the routing for upas-runq: Permission denied")
        assert again.proc.poll() is None
    finally:
        again.stop()
    with open(victim) as f:
        assert f.read() == "root's own\n"


def test_stdio_with_a_listening_socket_on_stdin_is_one_line_not_a_traceback(tmp_path):
    """inetd ``wait`` or systemd ``Accept=no`` (or systemd-socket-activate
    without ``-a``) hands over the listening socket: the session crashed
    with ENOTCONN in adoptStreamConnection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        session = Session(tmp_path, conn=listener)
        assert session.wait() == 64
    [line] = session.log().splitlines()
    assert line.startswith("upas-smtpd: standard input is a listening socket")
