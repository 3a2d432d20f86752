"""The state store in Redis (``--state redis://HOST:PORT/DB``): one state
for every node behind a load balancer.

``RedisStateStore`` answers every ``IStateStore`` question with the same
meaning as ``statestore.LocalStateStore`` (the greylist of
``rules/greylist.py``, the AUTH budget of ``auth.Throttle``, the grants of
``ratify.TrustedGrants``, the fixed rate windows of ``countAttempt``), each
update one Lua script run atomically inside Redis (loaded once, called by
``EVALSHA``, loaded again on ``NOSCRIPT``), so two nodes never
read-modify-write the same key.  Decisions use the node's injected clock,
passed to the scripts as an argument (so ``task.Clock`` drives them in
tests; the nodes' clocks must agree, as NTP keeps them); the keys' TTLs,
in Redis's real time and generous, only collect garbage.

Keys (all under ``upas:``; the part in braces is the Redis Cluster hash
tag, so each script's keys live in one slot):

``upas:grey:{LSYS/RSYS}:USER``     time of the last attempt; TTL 2·max + 1 h
``upas:white:RSYS``                a peer the server whitelisted (its PTR
                                   name); TTL 35 days, renewed when seen
``upas:grant:IP``                  when a trusted grant ends; TTL its end + 1 h
``upas:auth:IP``                   hash failures, pending, answered (Throttle),
                                   begun (checks under way that old are dead)
``upas:rate:KIND:WINDOW:N:IP``     attempts in the N-th window; TTL 2 windows
``upas:{conn}:nodes``              sorted set: node name -> lease end
``upas:{conn}:node:NAME``          hash: ``*`` -> connections of that node in
                                   all, IP -> its connections from IP

The whitelist file (``grey/whitelist``) and the trusted directory stay
files read on each node: they are the administrator's configuration.
What the server adds itself (a peer that passed the greylist, a grant)
goes to Redis, seen by every node; ``upas-grant`` writes grants there for
POP/IMAP servers that used to write the files.

Connections over nodes: each node renews a lease (every lease/3 on its
clock) and keeps its counts under its own name; ``acquireConnection``
sums the counts of the nodes whose lease is in force, deleting the dead
nodes' counts in the same script, so a node killed with ``kill -9`` stops
counting once its lease ends.  The node also keeps what it holds in
memory (``held``) and writes it back whole when Redis may have lost or
missed it (after a failure, a lost lease, or at start: a node restarting
under the same name never inherits its earlier life's counts).  A clean
stop deletes them.

Failure: every call fails at once with ``StateUnavailable`` while no
connection to Redis is up, and after ``timeout`` seconds (default 2) when
Redis does not answer; the client reconnects with backoff (txredisapi's,
1 s growing to 10 s).  One log line says the state is unavailable, one
that it is back.  ``FallbackStateStore`` answers from this node's
``LocalStateStore`` meanwhile (``--state-failure local``).

The client: ``txredisapi`` (a Twisted protocol) rather than ``redis``'s
asyncio client, by measurement (bench/redis_client.py: the same EVALSHA
3000 times, medians of 3 interleaved runs on this 2-core machine):
txredisapi 7 240 ops/s and 0.117 CPU ms/op with 1 caller, 12 760 ops/s
and 0.063 ms/op with 10; redis.asyncio under Twisted's asyncio reactor
5 800 ops/s, 0.170 ms/op and 7 200 ops/s, 0.140 ms/op.  It also runs on
twistd's default (epoll) reactor, where redis.asyncio would need ``-r
asyncio`` from every administrator, and it reconnects by itself
(``ClientService``).  redis-py is the better-kept project; the numbers
and the reactor decided.
"""

import hashlib
import ipaddress
import math
import os
import socket
from collections import Counter
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IReloadable, IStateStore, StateUnavailable
from ..relay import normalize_ip
from ..rules import greylist as greylisting
from ..rules.auth import Throttle
from ..rules.greylist import Greylist
from ..rules.ratify import GRANT_LIFETIME, TrustedGrants
from .statestore import take_one

log = Logger(namespace="smtpd")

DEFAULT_PORT = 6379
TIMEOUT = 2.0  # seconds a call may wait for Redis before StateUnavailable
LEASE = 30.0
WHITELIST_TTL = 35 * 86400  # Postgrey's auto-whitelist max-age
SLACK = 3600  # added to every TTL: they collect garbage, never decide


def parse_url(url):
    """``redis://HOST[:PORT][/DB]`` -> (host, port, db); ValueError says why."""
    try:
        parts = urlsplit(url)
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError as e:
        raise ValueError("%s: %s" % (url, e)) from None
    if port == 0:  # no server listens there: not the default port either
        raise ValueError("%s: port 0" % url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("%s: not redis://HOST:PORT/DB" % url)
    if parts.username is not None or parts.password is not None:
        # not passed to Redis, whose every answer would then be NOAUTH;
        # the URL is not repeated: it holds a password
        raise ValueError("redis://%s: a user or password is not supported (Redis AUTH)"
                         % parts.hostname)
    db = parts.path.strip("/") or "0"
    if not db.isdigit() or parts.query or parts.fragment:
        raise ValueError("%s: the database must be a number (redis://HOST:PORT/DB)" % url)
    return parts.hostname, port, int(db)


def default_node():
    """This node's name unless ``--node``: host name and pid."""
    return "%s-%d" % (socket.gethostname(), os.getpid())


class Script:
    """A Lua script and its SHA1, the name EVALSHA calls it by."""

    def __init__(self, text):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


# KEYS: the nodes, this node's counts; ARGV: now, node, ip, exempt, per peer,
# total, lease end, the prefix of a node's counts, ttl.  The lease is
# extended only while in force: one that lapsed (the node stalled, nothing
# failed) had its counts dropped as a dead node's, and is left for RENEW,
# which sees it lost and writes back all the node holds.
ACQUIRE = Script("""
local mine = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]))
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])) do
  redis.call('DEL', ARGV[8] .. dead)
  redis.call('ZREM', KEYS[1], dead)
end
if mine and mine >= tonumber(ARGV[1]) then redis.call('ZADD', KEYS[1], ARGV[7], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[9])
local total, peer = 0, 0
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local counts = redis.call('HMGET', ARGV[8] .. node, '*', ARGV[3])
  total = total + (tonumber(counts[1]) or 0)
  peer = peer + (tonumber(counts[2]) or 0)
end
if total >= tonumber(ARGV[6]) then return 'total' end
if ARGV[4] == '0' and peer >= tonumber(ARGV[5]) then return 'peer' end
redis.call('HINCRBY', KEYS[2], '*', 1)
if ARGV[4] == '0' then redis.call('HINCRBY', KEYS[2], ARGV[3], 1) end
redis.call('EXPIRE', KEYS[2], ARGV[9])
return false
""")

# KEYS: this node's counts; ARGV: ip, exempt
RELEASE = Script("""
local function down(field)
  if redis.call('HINCRBY', KEYS[1], field, -1) <= 0 then
    redis.call('HDEL', KEYS[1], field)
  end
end
down('*')
if ARGV[2] == '0' then down(ARGV[1]) end
return false
""")

# KEYS: the nodes, this node's counts; ARGV: node, lease end, ttl, now,
# rewrite (1: write the counts that follow whatever Redis holds), then
# field, count pairs.  A node whose lease had ended (its counts may be
# gone) writes them too.
RENEW = Script("""
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local lost = (not score) or tonumber(score) < tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if lost or ARGV[5] == '1' then
  redis.call('DEL', KEYS[2])
  for i = 6, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return false
""")

# KEYS: the nodes, this node's counts; ARGV: node
LEAVE = Script("""
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return false
""")

# KEYS: auth:IP; ARGV: begin|failed|succeeded|abandoned, now, memory, limit,
# unit, cap, ttl.  auth.Throttle's record, kept in a hash, and when the
# last check began: checks under way that old never end (their node was
# killed, or Redis missed their end) and are forgotten with the record,
# or they would refuse the address for as long as it keeps trying.
AUTH = Script("""
local now, memory = tonumber(ARGV[2]), tonumber(ARGV[3])
local r = redis.call('HMGET', KEYS[1], 'failures', 'pending', 'answered', 'begun')
local failures, pending, answered = tonumber(r[1]), tonumber(r[2]), tonumber(r[3])
local begun = tonumber(r[4]) or answered
if not failures or (now - answered >= memory and (pending == 0 or now - begun >= memory)) then
  failures, pending, answered, begun = 0, 0, now, now
end
local result = false
if ARGV[1] == 'begin' then
  if failures + pending >= tonumber(ARGV[4]) then
    result = 0
  else
    pending = pending + 1
    begun = now
    result = 1
  end
else
  pending = math.max(pending - 1, 0)
  if ARGV[1] == 'failed' then
    failures = failures + 1
    local unit, cap, wait = tonumber(ARGV[5]), tonumber(ARGV[6]), 0
    if unit > 0 then wait = math.min(unit * 2 ^ math.min(failures - 1, 64), cap) end
    answered = math.max(now, answered) + wait
    result = {tostring(answered - now), failures}
  elseif ARGV[1] == 'succeeded' then
    failures = 0
  end
end
redis.call('HSET', KEYS[1], 'failures', failures, 'pending', pending,
           'answered', tostring(answered), 'begun', tostring(begun))
redis.call('EXPIRE', KEYS[1], math.ceil(math.max(answered - now, 0) + tonumber(ARGV[7])))
return result
""")

# KEYS: one per recipient; ARGV: now, min, max, ttl, record (1) or peek (0).
# greylist.Greylist.attempt / peek.
GREYLIST = Script("""
local now, out = tonumber(ARGV[1]), {}
for i, key in ipairs(KEYS) do
  local t = tonumber(redis.call('GET', key))
  if not t then
    out[i] = 'new'
  elseif now - t >= tonumber(ARGV[2]) and now - t <= tonumber(ARGV[3]) then
    out[i] = 'recent'
  else
    out[i] = 'other'
  end
  if ARGV[5] == '1' then redis.call('SET', key, ARGV[1], 'EX', ARGV[4]) end
end
return out
""")

# KEYS: the window's counter; ARGV: ttl
COUNT = Script("""
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
""")

PREFIX = "upas:"
NODES = PREFIX + "{conn}:nodes"
NODE = PREFIX + "{conn}:node:"


def _seconds(value):
    """A TTL for Redis: whole seconds, at least 1."""
    return max(int(math.ceil(value)), 1)


@implementer(IStateStore, IReloadable)
class RedisStateStore(service.Service):
    """The shared store.  As a service it connects at start and renews this
    node's lease; stopped, it deletes this node's counts and disconnects.
    ``connect``/``disconnect`` alone (no lease) serve tools (``upas-grant``).

    ``clock`` times decisions and the lease; ``reactor`` the network
    (connecting, the ``timeout``).  ``backoff`` (initial, most): seconds
    between reconnection attempts.
    """

    def __init__(self, url, settings, clock, reactor=None, node=None, lease=LEASE,
                 timeout=TIMEOUT, backoff=(1.0, 10.0)):
        self.url = url
        self.host, self.port, self.db = parse_url(url)
        self.settings = settings
        self.clock = clock
        self.reactor = reactor or clock
        self.node = node or default_node()
        self.lease = lease
        self.timeout = timeout
        self.backoff = backoff
        # the administrator's files, read on this node as with local state
        self.files = Greylist(settings.path("grey"), clock, settings.greylist_min,
                              settings.greylist_max)
        self.grantFiles = TrustedGrants(settings.path("trusted_dir"), clock)
        self.throttle = Throttle.configured(clock, settings)  # its parameters only
        self.held = Counter()  # (ip, exempt) -> connections this node holds
        self.rewrite = True  # Redis may not hold ``held``: write it whole
        self.renewals = 0  # renewals sent (an admission answered after one rewrites)
        self.unavailable = None  # why, while Redis cannot answer
        self.factory = self.redis = None
        self.connecting = None
        self.renewal = None

    # -- connecting ------------------------------------------------------

    def connect(self, first=None):
        """Connect (and keep reconnecting); a Deferred that fires once
        connected or after ``timeout`` (then the calls fail until it is).
        ``first()`` is called then, before the calls made meanwhile go."""
        import txredisapi  # it imports the global reactor: only when used

        self.factory = txredisapi.RedisFactory(
            self.url, self.db, 1, isLazy=True, replyTimeout=self.timeout)
        self.factory.initialDelay, self.factory.maxDelay = self.backoff
        self.factory.startConnecting(endpoints.HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeout))
        self.redis = self.factory.handler
        connected = defer.Deferred()  # the factory's own must not be cancelled
        self.factory.deferred.addBoth(
            lambda r: None if connected.called else connected.callback(r))
        connected.addTimeout(self.timeout, self.reactor)
        self.connecting = []  # calls made meanwhile wait for the first connection

        def made(result):
            if first is not None:
                first()
            waiting, self.connecting = self.connecting, None
            for d in waiting:
                d.callback(None)
            return result

        connected.addCallbacks(self._up, self._down).addBoth(made)
        return connected.addErrback(lambda f: f.trap(StateUnavailable))

    def disconnect(self):
        if self.factory is None:
            return defer.succeed(None)
        factory, self.factory = self.factory, None
        return factory.disconnect()

    def startService(self):
        service.Service.startService(self)
        self.renewal = task.LoopingCall(self.renew)
        self.renewal.clock = self.clock

        def renewing():
            # before the questions that waited for the connection: the first
            # renewal writes this node's counts whole, and after an
            # admission sent ahead of it would wipe that admission
            if self.renewal is not None:
                self.renewal.start(self.lease / 3.0, now=True).addErrback(
                    lambda f: log.failure("lease renewal", f))

        self.started = self.connect(first=renewing).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self.renewal is not None and self.renewal.running:
            self.renewal.stop()
        self.renewal = None
        try:  # a clean stop: this node's connections count no more
            yield self._call(LEAVE, [NODES, NODE + self.node], [self.node])
        except StateUnavailable:
            pass  # the lease ends them
        yield self.disconnect()

    def renew(self):
        """This node is alive (every lease/3): its lease, and its counts
        when Redis may have lost them."""
        # cleared now, not on the answer: a failure meanwhile (which sets it
        # again) must not be forgotten; a renewal that fails sets it again
        rewrite, self.rewrite = self.rewrite, False
        self.renewals += 1
        counts = Counter()
        for (ip, exempt), n in self.held.items():
            counts["*"] += n
            if not exempt:
                counts[ip] += n
        pairs = [str(x) for item in counts.items() for x in item]
        now = self.clock.seconds()
        d = self._call(RENEW, [NODES, NODE + self.node],
                       [self.node, repr(now + self.lease), self._countsTTL(), repr(now),
                        "1" if rewrite else "0"] + pairs)
        # a renewal that fails is retried at the next tick (and logged once)
        return d.addCallbacks(lambda _: None, lambda f: f.trap(StateUnavailable))

    def _countsTTL(self):
        return _seconds(3 * self.lease + 60)

    # -- calling Redis ---------------------------------------------------

    def _call(self, script, keys, args):
        """Run ``script`` (loaded again if Redis lost it)."""
        return self._send(lambda: self.redis.evalsha(script.sha, keys, args).addErrback(
            self._loadAndCall, script, keys, args))

    def redis_command(self, *args):
        """One plain command (no script needed: it is atomic by itself)."""
        return self._send(lambda: self.redis.execute_command(*args))

    def _send(self, request):
        """``request()``'s Deferred; StateUnavailable at once when not
        connected (but for the first connection, being made: it is waited
        for), or after ``timeout``."""
        if self.factory is None or not self.factory.size:
            if self.connecting is not None:
                waiting = defer.Deferred()
                self.connecting.append(waiting)
                return waiting.addCallback(lambda _: self._send(request))
            return self._unconnected()
        d = request()
        d.addTimeout(self.timeout + 0.5, self.reactor)  # txredisapi's own comes first
        return d.addCallbacks(self._up, self._down)

    def _unconnected(self):
        return defer.fail(self._failed(StateUnavailable("not connected to %s:%d"
                                                        % (self.host, self.port))))

    def _loadAndCall(self, failure, script, keys, args):
        import txredisapi

        failure.trap(txredisapi.ScriptDoesNotExist)  # NOSCRIPT: Redis restarted
        return self.redis.script_load(script.text).addCallback(
            lambda _: self.redis.evalsha(script.sha, keys, args))

    def _up(self, result):
        if self.unavailable is not None:
            log.info("shared state at {url} available again", url=self.url,
                     event="state.store", ok=True)
            self.unavailable = None
        return result

    def _down(self, failure):
        why = failure.value
        raise self._failed(why if isinstance(why, StateUnavailable)
                           else StateUnavailable(str(why) or type(why).__name__))

    def _failed(self, error):
        """Log the first failure of an outage only; Redis may have missed
        an update of this node's counts, so they are written at the next
        renewal."""
        self.rewrite = True
        if self.unavailable is None:
            self.unavailable = str(error)
            log.error("shared state at {url} unavailable: {why}", url=self.url,
                      why=self.unavailable, event="state.store", ok=False)
        return error

    # -- IStateStore -----------------------------------------------------

    def reread(self):
        """SIGHUP: the whitelist file is read again."""
        self.files.reread()

    def acquireConnection(self, ip, exempt, perPeer, total):
        now = self.clock.seconds()
        renewals = self.renewals

        def counted(refused):
            if refused is None:
                self.held[ip, exempt] += 1
                if self.renewals != renewals:
                    # a renewal sent meanwhile ran after this admission in
                    # Redis and may have written the counts without it
                    self.rewrite = True
            return refused

        return self._call(ACQUIRE, [NODES, NODE + self.node],
                          [repr(now), self.node, ip, "1" if exempt else "0", perPeer, total,
                           repr(now + self.lease), NODE, self._countsTTL()]).addCallback(counted)

    def releaseConnection(self, ip, exempt):
        if not take_one(self.held, (ip, exempt)):
            return defer.succeed(None)  # never release what this node does not hold
        # a release Redis misses is made good by the next renewal
        return self._call(RELEASE, [NODE + self.node], [ip, "1" if exempt else "0"]).addCallbacks(
            lambda _: None, lambda f: f.trap(StateUnavailable))

    def _auth(self, op, ip):
        t = self.throttle
        return self._call(AUTH, [PREFIX + "auth:" + ip],
                          [op, repr(self.clock.seconds()), repr(t.memory), t.limit,
                           repr(t.unit), repr(t.cap), _seconds(t.memory + SLACK)])

    def authBegin(self, ip):
        return self._auth("begin", ip).addCallback(bool)

    def authFailed(self, ip):
        return self._auth("failed", ip).addCallback(
            lambda r: (float(r[0]), int(r[1]), self.throttle.limit))

    def authSucceeded(self, ip):
        return self._auth("succeeded", ip).addCallback(lambda _: None)

    def authAbandoned(self, ip):
        return self._auth("abandoned", ip).addCallback(lambda _: None)

    def isWhitelisted(self, rsys):
        if self.files.whitelisted(rsys):
            return defer.succeed(True)
        # seen: kept another 35 days (EXPIRE answers 0 for no such key)
        return self.redis_command("EXPIRE", PREFIX + "white:" + rsys, WHITELIST_TTL).addCallback(
            lambda n: n == 1)

    def _greylist(self, lsys, rsys, recipients, record):
        rcpts, keys = [], []
        for rcpt in recipients:
            user = greylisting.user_of(rcpt)
            if user is not None:
                rcpts.append(rcpt)
                keys.append("%sgrey:{%s/%s}:%s" % (PREFIX, lsys, rsys, user))
        if not keys:
            return defer.succeed([])
        g = self.files
        return self._call(GREYLIST, keys,
                          [repr(self.clock.seconds()), repr(g.min_age), repr(g.max_age),
                           _seconds(2 * g.max_age + SLACK), "1" if record else "0"]).addCallback(
            lambda states: list(zip(rcpts, states)))

    def greylistAttempt(self, lsys, rsys, recipients):
        return self._greylist(lsys, rsys, recipients, True)

    def greylistPeek(self, lsys, rsys, recipients):
        """``greylistAttempt``'s outcomes, nothing recorded (upas-policy explain)."""
        return self._greylist(lsys, rsys, recipients, False)

    def addToWhitelist(self, rsys, name):
        return self.redis_command("SET", PREFIX + "white:" + rsys, name or "", "EX",
                                  WHITELIST_TTL).addCallback(lambda _: None)

    def isGranted(self, ip):
        if self.grantFiles.is_trusted(ip):  # the trusted directory's files count too
            return defer.succeed(True)
        now = self.clock.seconds()
        return self.redis_command("GET", PREFIX + "grant:" + normalize_ip(ip)).addCallback(
            lambda end: end is not None and now < float(end))

    def grant(self, ip, duration=GRANT_LIFETIME):
        """Trust ``ip`` for ``duration`` seconds (the files' 2 hours by default)."""
        try:
            ip = str(ipaddress.ip_address(normalize_ip(ip)))
        except ValueError as e:
            return defer.fail(e)
        end = self.clock.seconds() + duration
        return self.redis_command("SET", PREFIX + "grant:" + ip, repr(end), "EX",
                                  _seconds(duration + SLACK)).addCallback(lambda _: None)

    def countAttempt(self, kind, ip, window):
        index = int(self.clock.seconds() // window)
        return self._call(COUNT, ["%srate:%s:%g:%d:%s" % (PREFIX, kind, window, index, ip)],
                          [_seconds(2 * window)]).addCallback(int)


@implementer(IStateStore, IReloadable)
class FallbackStateStore:
    """``--state-failure local``: ``shared``'s answers, or, while it is
    unavailable, ``local``'s (this node's own state), said in the log once
    per outage.  Connections the local store admitted are released to it."""

    def __init__(self, shared, local):
        self.shared = shared
        self.local = local
        self.localHeld = Counter()  # (ip, exempt) -> connections ``local`` admitted
        self.falling = False

    def reread(self):
        for store in (self.shared, self.local):
            if IReloadable.providedBy(store):
                store.reread()

    def _ask(self, name, *args, admitted=None):
        """``shared``'s answer, else ``local``'s (then ``admitted`` sees it)."""
        def fallBack(failure):
            failure.trap(StateUnavailable)
            if not self.falling:
                self.falling = True
                log.warn("shared state unavailable ({why}): answering from this node's "
                         "local state (--state-failure local)", why=failure.value,
                         event="state.store", ok=False)
            d = getattr(self.local, name)(*args)
            return d if admitted is None else d.addCallback(admitted)

        def answered(result):
            # the shared store answers some questions from files, without
            # Redis: only Redis answering again ends the outage
            if self.falling and self.shared.unavailable is None:
                self.falling = False
                log.info("shared state answering again: local state no longer used",
                         event="state.store", ok=True)
            return result

        return getattr(self.shared, name)(*args).addCallbacks(answered, fallBack)

    def acquireConnection(self, ip, exempt, perPeer, total):
        def admitted(refused):
            if refused is None:  # the local store's to release
                self.localHeld[ip, exempt] += 1
            return refused

        return self._ask("acquireConnection", ip, exempt, perPeer, total, admitted=admitted)

    def releaseConnection(self, ip, exempt):
        if take_one(self.localHeld, (ip, exempt)):
            return self.local.releaseConnection(ip, exempt)
        return self.shared.releaseConnection(ip, exempt)

    def authBegin(self, ip):
        return self._ask("authBegin", ip)

    def authFailed(self, ip):
        return self._ask("authFailed", ip)

    def authSucceeded(self, ip):
        return self._ask("authSucceeded", ip)

    def authAbandoned(self, ip):
        return self._ask("authAbandoned", ip)

    def isWhitelisted(self, rsys):
        return self._ask("isWhitelisted", rsys)

    def greylistAttempt(self, lsys, rsys, recipients):
        return self._ask("greylistAttempt", lsys, rsys, recipients)

    def greylistPeek(self, lsys, rsys, recipients):
        return self._ask("greylistPeek", lsys, rsys, recipients)

    def addToWhitelist(self, rsys, name):
        return self._ask("addToWhitelist", rsys, name)

    def isGranted(self, ip):
        return self._ask("isGranted", ip)

    def grant(self, ip):
        return self._ask("grant", ip)

    def countAttempt(self, kind, ip, window):
        return self._ask("countAttempt", kind, ip, window)
