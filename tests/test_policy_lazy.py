"""Facts are gathered lazily: what each kind of session asks for (issue 16).

Every session here runs the real ``UpasESMTP`` over a StringTransport and
records everything it looks up outside itself:

* DNS: every question to the resolver, as (name, type);
* validators: every run of ``<lib>/validateaddress`` and
  ``<lib>/validatesender`` (real scripts that append their argv to a log);
* the state store: every ``IStateStore`` method called;
* the ``box/<user>/nospamfiltering`` opt-out files stat'ed;
* the stats of the policy files under ``<lib>`` (ratify lists, helper
  files, the validators' presence).

The expected values are what the server made before the policy moved into
tables; the refactored server must ask for exactly the same DNS names,
validator runs, store calls and opt-out files, and stat no lib file more
often.  Order is not compared (a Counter), only what is asked and how often.
"""

import base64
import os
import stat
import time
from collections import Counter

from twisted.internet import defer, reactor, task
from twisted.names import dns
from zope.interface import implementer

import test_antiabuse
from upasmail import server, service, testing
from upasmail.statestore import IStateStore, LocalStateStore

TYPE = {dns.ALL_RECORDS: "ANY", dns.A: "A", dns.AAAA: "AAAA", dns.MX: "MX", dns.PTR: "PTR"}

PEER = "127.0.0.2"  # untrusted: only 127.0.0.1 is ours by default
PTR = "2.0.0.127.in-addr.arpa"
ZONE = {
    "h.sender.net": [dns.Record_A("127.0.0.2")],
    "sender.net": [dns.Record_MX(10, "h.sender.net")],
    "gw.sender.net": [dns.Record_A("127.0.0.8")],
    PTR: [dns.Record_PTR("ptr.sender.net")],  # a name that exists only as a PTR target
    "empty.sender.net": [],  # exists, no records: ANY answers nothing (RFC 8482)
}

MESSAGE = ("Subject: lazy", "", "hello", ".")
TRANSACTION = ("HELO h.sender.net", "MAIL FROM:<alice@sender.net>", "RCPT TO:<bob>", "DATA")
CONNECT = ["isGranted", "acquireConnection", "releaseConnection"]  # an untrusted peer's
TRUSTED_CONNECT = ["acquireConnection", "releaseConnection"]

LIAR = "554 5.7.0 Liar!"
DIALUP = "554 5.7.1 We don't accept mail from dial-up ports."
GO_AHEAD = "354 Input message; end with <CRLF>.<CRLF>"
SENT = "250 2.5.0 sent"
BYE = "221 2.0.0 Successful termination"
GREY = "451 please try again soon from the same IP."
RELAY = "550 5.7.1 we don't relay.  send to your-path@[] for loopback."


def any_of(name):
    return (name, "ANY")


def lib(aliases, users, blocked, validateaddress=0, names_blocked=0, senders=0,
        validatesender=0, passwd=0):
    """How often each ``<lib>`` file was stat'ed (aliases and users: the
    local delivery's, once when the server starts and at each RCPT and DATA)."""
    counts = {"aliases": aliases, "users": users, "blocked": blocked,
              "validateaddress": validateaddress, "names.blocked": names_blocked,
              "senders": senders, "validatesender": validatesender, "passwd": passwd}
    return {"lib/" + name: n for name, n in counts.items() if n}


HELO_ONLY = lib(1, 1, 2)  # the server starting, and an untrusted peer's connect
ONE_RCPT = lib(3, 5, 3, 1, 1, 1, 1)  # HELO, MAIL, RCPT <bob>, DATA, message


class CountingResolver(testing.FakeResolver):
    def asked(self):
        return Counter((name, TYPE.get(t, t)) for name, t in self.queries)


@implementer(IStateStore)
class CountingStore:
    """An IStateStore that records the name of every method called."""

    def __init__(self, store):
        self.store = store
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self.store, name)
        if name.startswith("_") or not callable(method):
            return method

        def call(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)

        return call


class Facts:
    """What one session asked for, and the replies it got."""

    def __init__(self, replies, dns, validators, store, nospam, lib):
        self.replies = replies
        self.dns = dns
        self.validators = validators
        self.store = store
        self.nospam = nospam
        self.lib = lib


class LazyCase(test_antiabuse.Case):
    """Sessions against one mail root (``root``, ``lib``, ``write`` are the
    anti-abuse tests') and one clock; each records its facts."""

    def setUp(self):
        test_antiabuse.Case.setUp(self)
        self.runs = os.path.join(self.root, "validators.log")
        self.clock = task.Clock()
        self.clock.advance(time.time())  # greylist files carry real mtimes
        self.stats = []
        real_stat = os.stat
        prefix = os.path.join(self.root, "")

        def counting_stat(path, *args, **kwargs):
            if isinstance(path, str) and path.startswith(prefix):
                self.stats.append(path[len(prefix):])
            return real_stat(path, *args, **kwargs)

        # os.path.exists, isfile, getmtime... all come through os.stat
        self.patch(os, "stat", counting_stat)

    def validator(self, name, code=0):
        """A real ``<lib>/<name>`` that logs its argv and exits with ``code``."""
        path = os.path.join(self.lib, name)
        with open(path, "w") as f:
            f.write('#!/bin/sh\necho "%s $*" >> %s\nexit %d\n' % (name, self.runs, code))
        os.chmod(path, stat.S_IRWXU)

    @defer.inlineCallbacks
    def session(self, *lines, peer=PEER, **kw):
        """Run one connection to its end; fires with its Facts."""
        settings = testing.make_settings("", root=self.root, **kw)
        resolver = CountingResolver(ZONE)
        store = CountingStore(LocalStateStore(settings, self.clock))
        self.patch(testing, "makeSmtpdFactory",
                   lambda *a, **k: service.makeSmtpdFactory(*a, store=store, **k))
        if os.path.exists(self.runs):
            os.remove(self.runs)
        del self.stats[:]
        d = testing.Dialogue(settings, peer=peer, clock=self.clock, reactor=reactor,
                             resolver=resolver, mailboxes=("bob", "carol"))
        replies = d.send(*lines)  # what was answered at once
        # then what waited on a validator; whenQuiet may fire while the
        # pipelined commands behind it are still being read: a turn more
        while True:
            yield d.proto.whenQuiet()
            yield task.deferLater(reactor, 0, lambda: None)
            if not d.proto._busy:
                break
        replies += d.take()
        if d.proto._state is not server.GONE:  # a StringTransport never reports the close
            d.proto.connectionLost(None)
        d.proto.setTimeout(None)
        runs = []
        if os.path.exists(self.runs):
            with open(self.runs) as f:
                runs = f.read().splitlines()
        nospam = Counter(p.split("/")[1] for p in self.stats
                         if p.startswith("box/") and p.endswith("/nospamfiltering"))
        files = Counter(p for p in self.stats if p.startswith("lib/"))
        return Facts([r for r in replies if r[3:4] == " "], resolver.asked(), Counter(runs),
                     Counter(store.calls), nospam, files)

    def assertFacts(self, facts, files, dns=(), validators=(), store=CONNECT, nospam=()):
        self.assertEqual(facts.dns, Counter(dns), "DNS questions")
        self.assertEqual(facts.validators, Counter(validators), "validator runs")
        self.assertEqual(facts.store, Counter(store), "state store calls")
        self.assertEqual(facts.nospam, Counter(nospam), "nospamfiltering files")
        # no lib file stat'ed that was not, nor more often (fewer is fine:
        # how often a watched file is stat'ed is no policy)
        more = Counter(facts.lib)
        more.subtract(Counter(files))
        self.assertEqual({p: n for p, n in more.items() if n > 0}, {},
                         "lib files stat'ed beyond what the server did")


class Sessions(LazyCase):
    @defer.inlineCallbacks
    def test_trusted_peer_looks_nothing_up(self):
        self.validator("validatesender", 1)  # would refuse: it must not run
        f = yield self.session(*TRANSACTION + MESSAGE + ("QUIT",), peer="127.0.0.1",
                               greylist=True, verify_sender=True)
        self.assertEqual(f.replies[-3:], [GO_AHEAD, SENT, BYE])
        # no grant is asked for: ournets already trusts the peer
        self.assertFacts(f, lib(3, 5, 1, 1, 1, 1), store=TRUSTED_CONNECT)

    @defer.inlineCallbacks
    def test_helo_name_that_exists(self):
        f = yield self.session("HELO h.sender.net", "QUIT")
        self.assertEqual(f.replies, ["250 gnot.example.org you are h.sender.net", BYE])
        self.assertFacts(f, HELO_ONLY, dns=[any_of("h.sender.net")])

    @defer.inlineCallbacks
    def test_helo_name_that_does_not_exist(self):
        f = yield self.session("HELO ghost.sender.net", "MAIL FROM:<a@sender.net>")
        self.assertEqual(f.replies, [LIAR])  # and the connection is closed
        self.assertFacts(f, HELO_ONLY, dns=[any_of("ghost.sender.net"), (PTR, "PTR")])

    @defer.inlineCallbacks
    def test_helo_name_that_is_only_the_ptr_name(self):
        f = yield self.session("HELO ptr.sender.net", "QUIT")
        self.assertEqual(f.replies, ["250 gnot.example.org you are ptr.sender.net", BYE])
        self.assertFacts(f, HELO_ONLY, dns=[any_of("ptr.sender.net"), (PTR, "PTR")])

    @defer.inlineCallbacks
    def test_helo_name_without_records_falls_back_to_a_aaaa_mx(self):
        f = yield self.session("HELO empty.sender.net", "QUIT")
        self.assertEqual(f.replies, [LIAR])
        self.assertFacts(f, HELO_ONLY, dns=[
            any_of("empty.sender.net"), ("empty.sender.net", "A"), ("empty.sender.net", "AAAA"),
            ("empty.sender.net", "MX"), (PTR, "PTR")])

    @defer.inlineCallbacks
    def test_static_lies_need_no_dns(self):
        # dotless, reserved, no letter, and our own name
        for name in ("mailer", "localhost", "mx.sender.test", "192.0.2.1", "gnot.example.org"):
            f = yield self.session("HELO " + name, "MAIL FROM:<a@sender.net>",
                                   "RCPT TO:<bob>", "DATA")
            self.assertEqual(f.replies, [LIAR], name)
            self.assertFacts(f, HELO_ONLY)

    @defer.inlineCallbacks
    def test_relaxed_helo_asks_no_dns(self):
        # -e: the name is neither checked statically nor looked up
        for name, him in (("ghost.sender.net", "ghost.sender.net"), ("mailer", "127.0.0.2")):
            f = yield self.session("HELO " + name, "QUIT", relax_helo=True)
            self.assertEqual(f.replies, ["250 gnot.example.org you are " + him, BYE])
            self.assertFacts(f, HELO_ONLY)

    @defer.inlineCallbacks
    def test_helo_lie_with_E_looks_up_then_asks_for_auth(self):
        f = yield self.session("HELO ghost.sender.net", "MAIL FROM:<a@sender.net>", "QUIT",
                               helo_lie_auth=True)
        self.assertEqual(f.replies, ["250 gnot.example.org you are ghost.sender.net",
                                     "530 5.7.0 Authentication required", BYE])
        self.assertFacts(f, HELO_ONLY, dns=[any_of("ghost.sender.net"), (PTR, "PTR")])

    @defer.inlineCallbacks
    def test_sender_domains_with_r(self):
        f = yield self.session(
            "HELO h.sender.net",
            "MAIL FROM:<a@sender.net>", "RSET",  # exists: one lookup
            "MAIL FROM:<a@nowhere.net>", "RSET",  # NXDOMAIN: looked up once...
            "MAIL FROM:<b@nowhere.net>", "RSET",  # ...and refused from memory after
            "MAIL FROM:<a@[192.0.2.1]>", "RSET",  # a literal: nothing to look up
            "MAIL FROM:<>", "RSET",  # the null sender: nothing either
            "MAIL FROM:<alice>", "QUIT",  # qualified with the HELO name: looked up again
            verify_sender=True)
        self.assertEqual([r[:3] for r in f.replies], ["250"] * 5 + ["554"] + ["250"] * 6
                         + ["221"])
        self.assertEqual(f.replies[5], "554 5.1.8 Sender domain must exist: nowhere.net!b")
        self.assertFacts(f, lib(1, 1, 2 + 6), dns=[
            any_of("h.sender.net"), any_of("sender.net"), any_of("nowhere.net"),
            any_of("h.sender.net")])

    @defer.inlineCallbacks
    def test_without_r_no_sender_lookup(self):
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<a@nowhere.net>", "QUIT")
        self.assertEqual(f.replies[1], "250 2.0.0 sender is nowhere.net!a")
        self.assertFacts(f, lib(1, 1, 3), dns=[any_of("h.sender.net")])

    @defer.inlineCallbacks
    def test_r_is_not_asked_for_a_ratified_sender(self):
        # a state other than ACCEPT is refused at DATA: the domain is not looked up
        self.write("lib/blocked", "*deny nowhere.net!*\n")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<a@nowhere.net>",
                               "RCPT TO:<bob>", "DATA", "QUIT", verify_sender=True)
        self.assertEqual([r[:4] for r in f.replies], ["250 ", "250 ", "250 ", "554 ", "221 "])
        self.assertFacts(f, lib(2, 3, 3, 1, 1, 1, 1), dns=[any_of("h.sender.net")],
                         nospam=["bob"])

    @defer.inlineCallbacks
    def test_relay_refused_recipient(self):
        self.validator("validateaddress")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<a@sender.net>",
                               "RCPT TO:<x@foreign.net>", "QUIT")
        self.assertEqual(f.replies[2], RELAY)
        # validateaddress and the senders file come before the relay check
        self.assertFacts(f, lib(1, 1, 3, 1, 1, 1), dns=[any_of("h.sender.net")],
                         validators=["validateaddress foreign.net!x"])

    @defer.inlineCallbacks
    def test_validateaddress_refusal_stops_the_recipient_checks(self):
        self.validator("validateaddress", 1)
        self.write("lib/senders", "bob gw.sender.net\n")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<a@sender.net>",
                               "RCPT TO:<bob>", "QUIT")
        self.assertEqual(f.replies[2], "550 5.1.1 bob ... user unknown")
        self.assertFacts(f, lib(1, 1, 3, 1), dns=[any_of("h.sender.net")],
                         validators=["validateaddress bob"])

    @defer.inlineCallbacks
    def test_senders_file_looks_up_the_listed_name(self):
        self.write("lib/senders", "bob gw.sender.net\ncarol 127.0.0.2\n")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<a@sender.net>",
                               "RCPT TO:<bob>", "RCPT TO:<carol>", "QUIT")
        self.assertEqual(f.replies[2], "550 5.7.1 bob ... sending system not allowed")
        self.assertEqual(f.replies[3], "250 2.0.0 receiver is carol")  # an IP: no lookup
        self.assertFacts(f, lib(2, 3, 3, 2, 2, 2), dns=[
            any_of("h.sender.net"), ("gw.sender.net", "A"), ("gw.sender.net", "AAAA")])

    @defer.inlineCallbacks
    def test_validatesender_runs_once_for_an_untrusted_peer(self):
        self.validator("validatesender")
        f = yield self.session(*TRANSACTION + MESSAGE + ("QUIT",))
        self.assertEqual(f.replies[-3:], [GO_AHEAD, SENT, BYE])
        self.assertFacts(f, ONE_RCPT, dns=[any_of("h.sender.net")], validators=[
            "validatesender -n /net sender.net alice 127.0.0.2 h.sender.net"])

    @defer.inlineCallbacks
    def test_null_sender_to_many_is_refused_before_validatesender(self):
        self.validator("validatesender")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<>", "RCPT TO:<bob>",
                               "RCPT TO:<carol>", "DATA", "QUIT")
        self.assertEqual(f.replies[4],
                         "554 5.7.1 rejected: /dev/null sending to multiple recipients")
        self.assertFacts(f, lib(3, 5, 3, 2, 2, 2), dns=[any_of("h.sender.net")])

    @defer.inlineCallbacks
    def test_authenticated_peer_is_asked_what_a_trusted_one_is(self):
        # -p: PLAIN without TLS; the passwd file is read when AUTH is offered
        self.write("lib/passwd", "alice:s3cret\n")
        self.validator("validatesender", 1)  # would refuse: it must not run
        login = base64.b64encode(b"\0alice\0s3cret").decode()
        f = yield self.session("EHLO h.sender.net", "AUTH PLAIN " + login,
                               "HELO ghost.sender.net",  # not looked up any more
                               "MAIL FROM:<a@nowhere.net>", "RCPT TO:<bob>", "DATA",
                               *MESSAGE + ("QUIT",),
                               clear_passwords=True, greylist=True, verify_sender=True)
        self.assertEqual(f.replies[1:], [
            "235 2.0.0 Authentication successful",
            "250 gnot.example.org you are ghost.sender.net",
            "250 2.0.0 sender is nowhere.net!a", "250 2.0.0 receiver is bob",
            GO_AHEAD, SENT, BYE])
        self.assertFacts(f, lib(3, 5, 2, 1, 1, 1, passwd=8), dns=[any_of("h.sender.net")],
                         store=CONNECT + ["authBegin", "authSucceeded"])


class RatifyAndGreylist(LazyCase):
    @defer.inlineCallbacks
    def test_greylist_first_attempt_then_retry(self):
        first = yield self.session(*TRANSACTION, greylist=True)
        self.assertEqual(first.replies[-1], GREY)
        # no PTR: the name is only wanted for a new whitelist line
        self.assertFacts(first, lib(2, 3, 3, 1, 1, 1, 1), dns=[any_of("h.sender.net")],
                         store=CONNECT + ["isWhitelisted", "greylistAttempt"])
        self.clock.advance(6 * 60)
        again = yield self.session(*TRANSACTION + MESSAGE + ("QUIT",), greylist=True)
        self.assertEqual(again.replies[-3:], [GO_AHEAD, SENT, BYE])
        self.assertFacts(again, ONE_RCPT, dns=[any_of("h.sender.net"), (PTR, "PTR")],
                         store=CONNECT + ["isWhitelisted", "greylistAttempt", "addToWhitelist"])
        white = yield self.session(*TRANSACTION + MESSAGE + ("QUIT",), greylist=True)
        self.assertEqual(white.replies[-3:], [GO_AHEAD, SENT, BYE])
        self.assertFacts(white, ONE_RCPT, dns=[any_of("h.sender.net")],
                         store=CONNECT + ["isWhitelisted"])

    @defer.inlineCallbacks
    def test_greylist_is_not_asked_for_a_refused_transaction(self):
        self.write("lib/blocked", "*block sender.net!*\n")
        f = yield self.session(*TRANSACTION + MESSAGE + ("QUIT",), greylist=True)
        self.assertEqual(f.replies[-3:], [GO_AHEAD, "554 5.7.1 we believe this is spam.", BYE])
        self.assertFacts(f, lib(2, 3, 3, 1, 1, 1, 1), dns=[any_of("h.sender.net")],
                         nospam=["bob"])

    @defer.inlineCallbacks
    def test_nospamfiltering_is_asked_per_recipient_only_when_refused(self):
        self.write("box/bob/nospamfiltering", "")
        self.write("lib/blocked", "*deny sender.net!*\n")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<alice@sender.net>",
                               "RCPT TO:<bob>", "RCPT TO:<carol>", "DATA", "RSET",
                               "MAIL FROM:<alice@sender.net>", "RCPT TO:<carol>",
                               "RCPT TO:<bob>", "DATA", "RSET",
                               "MAIL FROM:<alice@sender.net>", "RCPT TO:<bob>",
                               *("DATA",) + MESSAGE + ("QUIT",))
        codes = [r[:3] for r in f.replies]
        self.assertEqual(codes, ["250"] * 4 + ["554"] + ["250"] * 4 + ["554"] + ["250"] * 3
                         + ["354", "250", "221"])
        # asked in RCPT order; the first recipient without the file ends the question
        self.assertFacts(f, lib(7, 13, 5, 5, 5, 5, 3), dns=[any_of("h.sender.net")],
                         nospam=["bob", "carol", "carol", "bob"])

    @defer.inlineCallbacks
    def test_accepted_transaction_asks_for_no_optout(self):
        self.write("box/bob/nospamfiltering", "")
        f = yield self.session(*TRANSACTION + MESSAGE + ("QUIT",))
        self.assertEqual(f.replies[-3:], [GO_AHEAD, SENT, BYE])
        self.assertFacts(f, ONE_RCPT, dns=[any_of("h.sender.net")])

    @defer.inlineCallbacks
    def test_dialup_hard_reject_asks_nothing_after(self):
        self.validator("validatesender")
        self.validator("validateaddress")
        self.write("lib/blocked", "dial 127.0.0.2\n")
        f = yield self.session("HELO h.sender.net", "MAIL FROM:<a@nowhere.net>",
                               "RCPT TO:<bob>", "DATA", "RSET", "HELO h.sender.net",
                               "MAIL FROM:<b@nowhere.net>", "RCPT TO:<carol>", "DATA", "QUIT",
                               greylist=True, verify_sender=True)
        self.assertEqual(f.replies, [
            "250 gnot.example.org you are h.sender.net",
            "250 2.0.0 sender is nowhere.net!a",
            "250 2.0.0 receiver is bob",
            DIALUP] + [DIALUP] * 5 + [BYE])
        # a dial-up peer is not ACCEPT: no -r lookup, no greylist; upas runs
        # validatesender before the filterstate action all the same
        self.assertFacts(f, lib(2, 3, 2, 1, 1, 1, 1), dns=[any_of("h.sender.net")],
                         validators=["validateaddress bob",
                                     "validatesender -n /net nowhere.net a 127.0.0.2 "
                                     "h.sender.net"],
                         nospam=["bob"])
