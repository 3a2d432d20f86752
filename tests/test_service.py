"""The embedding API and the twistd Options, without listening."""

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python import usage

from upasmail import service, tap_smtpd, testing


@pytest.mark.parametrize("desc,loopback", [
    ("tcp:2525:interface=127.0.0.1", True),
    ("tcp:2525:interface=127.0.0.5", True),
    ("tcp6:2525:interface=\\:\\:1", True),
    ("tcp:25", False),
    ("tcp:25:interface=0.0.0.0", False),
    ("tcp:25:interface=192.0.2.1", False),
    ("unix:/tmp/smtp.sock", True),
])
def test_listens_on_loopback_only(desc, loopback):
    assert service.listens_on_loopback_only(desc) is loopback


def test_open_relay_warning_when_exposed(tmp_path):
    s = testing.make_settings("norelay off\n", root=str(tmp_path / "mail"))
    with capturedLogs() as events:
        service.makeSmtpdService(s, "tcp:25", reactor=MemoryReactorClock(),
                                 resolver=testing.FakeResolver())
    assert any("OPEN RELAY" in e.get("log_format", "") for e in events)


def test_no_warning_on_loopback_or_with_relay_control(tmp_path):
    for conf, listen in (("norelay off\n", "tcp:2525:interface=127.0.0.1"), ("", "tcp:25")):
        s = testing.make_settings(conf, root=str(tmp_path / "mail"))
        with capturedLogs() as events:
            svc = service.makeSmtpdService(s, listen, reactor=MemoryReactorClock(),
                                           resolver=testing.FakeResolver())
        assert not any("OPEN RELAY" in e.get("log_format", "") for e in events)
        assert svc.factory.settings is s


def test_service_listens_where_told(tmp_path):
    reactor = MemoryReactorClock()
    s = testing.make_settings("", root=str(tmp_path / "mail"))
    svc = service.makeSmtpdService(s, "tcp:2626:interface=127.0.0.1", reactor=reactor,
                                   resolver=testing.FakeResolver())
    svc.startService()
    [(port, factory, backlog, iface)] = reactor.tcpServers
    assert (port, iface) == (2626, "127.0.0.1")
    assert factory is svc.factory
    assert (tmp_path / "mail" / "box").is_dir()


def test_options_defaults_and_flags(tmp_path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("defaultdomain Example.ORG\nnorelay off\nourdomains *.example.org\n")
    o = tap_smtpd.Options()
    o.parseOptions(["--conf", str(conf), "--sysname", "gnot", "-f", "-q",
                    "--root", str(tmp_path / "m")])
    s = o["settings"]
    assert (s.dom, s.me, s.relay_control, s.quiet) == ("example.org", "gnot", True, True)
    assert s.ourdomains == ("*.example.org",)
    o = tap_smtpd.Options()
    o.parseOptions(["-h", "mail.example.net", "--sysname", "gnot"])
    assert o["settings"].dom == "mail.example.net"
    assert o["listen"] == "tcp:2525:interface=127.0.0.1"
    assert o["settings"].root.endswith("/mail")


@pytest.mark.parametrize("argv,msg", [
    (["-c", "nonexistent.pem"], "nonexistent.pem: cannot read: No such file or directory"),
    (["-a"], "mail/lib/passwd: cannot read: No such file or directory"),
    (["--passwd", "pw"], "pw: cannot read: No such file or directory"),
    (["-m", "/nonexistent/mailer"], "-m /nonexistent/mailer: no such executable"),
])
def test_options_refuse_clearly(argv, msg):
    with pytest.raises(SystemExit) as e:
        tap_smtpd.Options().parseOptions(argv)
    assert msg in str(e.value)


def test_password_file_checked_at_startup(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("# nobody yet\n")
    tap_smtpd.Options().parseOptions(["--passwd", str(pw), "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        tap_smtpd.Options().parseOptions(["--passwd", str(pw), "-a"])
    assert "pw: no users, so -a would refuse all mail" in str(e.value)
    pw.write_text("alice\n")
    with pytest.raises(SystemExit) as e:
        tap_smtpd.Options().parseOptions(["--passwd", str(pw)])
    assert "pw:1: expected user:secret" in str(e.value)


@pytest.mark.parametrize("argv,msg", [
    (["--smtps"], "--smtps needs a certificate (-c)"),
    (["--key", "k.pem"], "--key needs -c"),
    (["--auth-max-failures", "0"], "--auth-max-failures must be at least 1"),
    (["--hop-limit", "0"], "--hop-limit must be at least 1"),
])
def test_tls_and_auth_usage_errors(argv, msg):
    with pytest.raises(usage.UsageError) as e:
        tap_smtpd.Options().parseOptions(argv)
    assert msg in str(e.value)


def test_options_anti_abuse_flags(tmp_path):
    o = tap_smtpd.Options()
    o.parseOptions(["-d", "-r", "-s", "-g", "-e", "-E", "-D", "-k", "192.0.2.0/24",
                    "-k", "2001:db8::/32", "--tarpit-unit", "0", "--root", str(tmp_path),
                    "--lib", str(tmp_path / "etc")])
    s = o["settings"]
    assert (s.debug, s.verify_sender, s.save_blocked, s.greylist) == (True,) * 4
    assert (s.relax_helo, s.helo_lie_auth, s.helo_delay) == (True,) * 3
    assert [str(n) for n in s.evil] == ["192.0.2.0/24", "2001:db8::/32"]
    assert s.tarpit_unit == 0
    assert s.path("blocked") == str(tmp_path / "etc" / "blocked")
    assert s.path("grey") == str(tmp_path / "grey")


def test_conf_switches_on_r_and_s(tmp_path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("verifysenderdom on\nsaveblockedmsg on\n")
    o = tap_smtpd.Options()
    o.parseOptions(["--conf", str(conf), "--root", str(tmp_path)])
    assert o["settings"].verify_sender and o["settings"].save_blocked


def test_broken_blocked_file_stops_startup(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "blocked").write_text("block 10.0.0.1\nblokc 10.0.0.2\n")
    with pytest.raises(SystemExit) as e:
        tap_smtpd.Options().parseOptions(["--root", str(tmp_path)])
    assert "blocked:2: unknown verb 'blokc'" in str(e.value)


def test_options_usage_errors():
    from twisted.python import usage
    with pytest.raises(usage.UsageError):
        tap_smtpd.Options().parseOptions(["-k", "not-an-ip"])
    with pytest.raises(usage.UsageError):
        tap_smtpd.Options().parseOptions(["--resolver", "nocolon"])
