"""Bounds a hostile or careless set-up cannot pass: connections waiting for
their PROXY header count with the sessions against the open-file limit
(they cannot use up the files kept for mailboxes and the queue), and a
state lease short enough to renew thousands of times a second is refused."""

from twisted.internet import task
from twisted.logger import capturedLogs

from test_proxy import named, node, v1  # noqa: F401 (node: a fixture)
from upasmail import service
from upasmail.smtpd import proxylistener


def test_past_the_cap_a_connection_is_closed_before_its_header(node, monkeypatch):  # noqa: F811
    monkeypatch.setattr(proxylistener, "OVER_CAP", 1)
    n = node()
    n.listening.cap = 2
    waiting = [n.connect() for _ in range(3)]  # the cap and the room for a 421
    assert not any(c.transport.disconnecting for c in waiting)
    with capturedLogs() as events:
        late = n.connect()
    assert late.transport.disconnecting and late.transport.value() == b""
    [e] = named(events, "smtpd.proxy")
    assert e["status"] == "limit"
    late.proto.connectionLost(None)  # what the closed transport would do
    waiting[0].lose()  # one gone: room again
    again = n.connect()
    assert not again.transport.disconnecting
    assert again.raw(v1())[0].startswith("220 ")
    for c in waiting[1:] + [again]:
        c.lose()


def test_the_listener_gets_the_open_file_limits_cap():
    endpoint = service.listener_endpoint(task.Clock(), "haproxy:tcp:0:interface=127.0.0.1",
                                         proxy_from=("127.0.0.1/32",))
    assert endpoint.cap == service.fd_cap() and endpoint.wrap(None).cap == endpoint.cap


def test_a_state_lease_under_a_second_is_refused(tmp_path):
    from upasmail.cli.options import SmtpdOptions
    from twisted.python import usage
    import pytest
    for lease in ("0.001", "0", "-5"):
        o = SmtpdOptions()
        with pytest.raises(usage.UsageError, match="--state-lease must be at least 1 seconds"):
            o.parseOptions(["--root", str(tmp_path), "--state-lease", lease])
