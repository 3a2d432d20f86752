"""What an idle connection keeps (issue 14: 10,000 idle connections at
most 4 KiB each).  Structural checks, not measurements: the figures are
bench/run's ``idle`` scenario."""

import pytest

from upasmail import grammar, policy, relay
from upasmail.session import Envelope, Session
from upasmail.testing import Dialogue, make_settings


def test_session_and_envelope_have_no_instance_dictionary():
    s = policy.new_session(make_settings(""), "192.0.2.7", "192.0.2.1", "abc")
    for obj in (s, s.envelope, Envelope()):
        assert not hasattr(obj, "__dict__")
    with pytest.raises(AttributeError):
        s.not_a_field = 1


def test_refused_domains_start_shared_and_grow_per_session():
    a = Session(rsys="192.0.2.7", lsys="192.0.2.1")
    b = Session(rsys="192.0.2.8", lsys="192.0.2.1")
    assert a.refused_domains is b.refused_domains  # no empty set each
    a.refused_domains |= {"nx.example"}
    assert "nx.example" in a.refused_domains and not b.refused_domains


def test_commands_without_parameters_share_one_empty_mapping():
    helo = grammar.parse(b"EHLO client.example.net")
    noop = grammar.parse(b"NOOP")
    assert helo.params is noop.params is grammar.NO_PARAMS
    assert not hasattr(helo, "__dict__")
    mail = grammar.parse(b"MAIL FROM:<a@b.example> SIZE=12")
    assert mail.params == {"SIZE": "12"}


def test_a_normal_address_is_kept_not_copied():
    text = "".join(["192.0.2.", "7"])  # not a constant the compiler shares
    assert relay.normalize_ip(text) is text
    assert relay.normalize_ip("::ffff:192.0.2.7") == "192.0.2.7"
    assert relay.normalize_ip("2001:DB8::1") == "2001:db8::1"


def test_the_helo_pair_is_made_when_asked():
    d = Dialogue(make_settings("ournets 127.0.0.1\n"), peer="127.0.0.1")
    p = d.proto
    assert p._heloPair() == (None, "127.0.0.1")
    d.raw(b"EHLO client.example.net\r\n")
    assert p._heloPair() == (b"client.example.net", b"127.0.0.1")
    assert "_helo" not in vars(p)


def _dialogue(**kw):
    settings = make_settings("ournets 127.0.0.1\n", idle_timeout=300, session_timeout=600, **kw)
    return Dialogue(settings, peer="127.0.0.1")


def test_one_timer_for_the_idle_limit_and_the_session_alarm():
    d = _dialogue()
    d.raw(b"EHLO client.example.net\r\n")
    assert len(d.clock.getDelayedCalls()) == 1


def test_data_moves_the_idle_limit_without_a_timer_of_its_own():
    d = _dialogue()
    d.raw(b"EHLO client.example.net\r\n")
    d.clock.advance(200)
    d.raw(b"NOOP\r\n")
    d.clock.advance(200)  # 400 s in, 200 s since the NOOP: not idle for 300 s yet
    assert not d.transport.disconnecting
    assert len(d.clock.getDelayedCalls()) == 1
    d.clock.advance(100)
    assert d.take()[-1].startswith("421")
    assert d.transport.disconnecting


def test_the_session_alarm_still_ends_a_busy_session():
    d = _dialogue()
    d.raw(b"EHLO client.example.net\r\n")
    for _ in range(5):  # never idle for long
        d.clock.advance(120)
        d.raw(b"NOOP\r\n")
    d.take()
    d.clock.advance(1)  # 601 s since the greeting: upas's alarm, no reply
    assert d.transport.disconnecting
    assert d.take() == []
