"""The command-line tools' options: one place for what they share.

``SmtpdOptions`` is every flag of upas smtpd, as ``twistd upas-smtpd``,
``upas-smtpd`` (stdio mode), ``upas-smtpd --check-config`` and
``upas-policy explain``/``replay`` take them (each tool subclasses it),
with their value checks (``value_problems``, ``check_files``, the
endpoint checks) and the settings they give (``make_settings``,
``reloaded_settings`` on SIGHUP).  The queue options (``QUEUE_FLAGS``,
``QUEUE_PARAMETERS``, ``queue_settings``) are upas-smtpd's and
upas-runq's; ``parse_hostport`` reads ``--resolver`` for every tool.

Only the command-line modules (``tap_*``, ``stdio``, ``checkconfig``,
``policytool``, ``replay``) and a worker process's main import this
module, and it imports none of them: tests/test_import_graph.py.
It is long because upas smtpd has many flags; it is one table and its
checks, kept together so a flag, its default, help and check are read
in one place.
"""

import math
import os
import re
import sys

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.systemd import ListenFDs

from .. import conf as smtpdconf
from ..rules import decisionlog, ratify
from ..mailroot import local
from ..smtp import mxdial
from .. import passwd, service, settings
from ..smtpd import redisstate, tls
from ..mailroot.mailer import resolve as resolve_mailer

log = Logger(namespace="smtpd")


# upas-smtpd's and upas-runq's
QUEUE_FLAGS = [
    ["no-outbound-tls", None, "do not use STARTTLS when sending (default: when offered)"],
    ["ipv6", None, "also send to the IPv6 addresses of mail servers"],
]
QUEUE_PARAMETERS = [
    ["smarthost", None, None, "send all outbound mail through this relay, a dial string "
                              "such as tcp!relay.example.net!587 (also smtpd.conf smarthost)"],
    ["smarthost-user", None, None, "AUTH user name at the smarthost"],
    ["relay-auth-file", None, None, "file of 'server user password' lines (mode 0600) for "
                                    "AUTH at the smarthost"],
    ["mx-port", None, 25, "port mail servers are dialled on (labs and tests only)", int],
    ["max-deliveries", None, 20, "deliveries at once", int],
    ["max-per-destination", None, 20, "deliveries at once to one domain", int],
    ["retry-min", None, 300.0, "first retry after a temporary failure, seconds", float],
    ["retry-max", None, 3600.0, "longest wait between retries, seconds", float],
    ["max-queue-age", None, 172800.0, "seconds before an undeliverable message is returned "
                                      "(upas: 2 days)", float],
    ["queue-scan", None, 60.0, "seconds between looks at the queue", float],
]


def queue_settings(o):
    """Settings keywords from parsed queue options; UsageError for nonsense."""
    for name in ("max-deliveries", "max-per-destination", "retry-min", "retry-max",
                 "max-queue-age", "queue-scan"):
        if o[name] <= 0:
            raise usage.UsageError("--%s must be positive" % name)
    if not 0 < o["mx-port"] < 65536:
        raise usage.UsageError("--mx-port must be a port number")
    if o["smarthost"]:
        try:
            mxdial.parse_dial(o["smarthost"])
        except mxdial.DialError as e:
            raise usage.UsageError("--smarthost: %s" % e.text)
    auth_file = os.path.abspath(o["relay-auth-file"]) if o["relay-auth-file"] else None
    return dict(smarthost=o["smarthost"], relay_user=o["smarthost-user"],
                relay_auth_file=auth_file, outbound_tls=not o["no-outbound-tls"],
                ipv6=o["ipv6"], mx_port=o["mx-port"], max_deliveries=o["max-deliveries"],
                max_per_destination=o["max-per-destination"], retry_min=o["retry-min"],
                retry_max=o["retry-max"], max_queue_age=o["max-queue-age"],
                queue_scan=o["queue-scan"])


# per-client rate limits (Postfix anvil's), counted in the state store
RATE_FLAGS = [
    ["rate-trusted", None, "apply the rate limits to trusted and authenticated clients too"],
]
RATE_PARAMETERS = [
    ["conn-rate", None, 0, "connections one client may make per --rate-window (0: no "
                           "limit)", int],
    ["msg-rate", None, 0, "MAIL commands one client may give per --rate-window (0: no "
                          "limit)", int],
    ["rcpt-rate", None, 0, "RCPT commands one client may give per --rate-window (0: no "
                           "limit)", int],
    ["rate-window", None, 60.0, "seconds the rate limits count over", float],
]


def rate_problems(o):
    for name in ("conn-rate", "msg-rate", "rcpt-rate"):
        if o[name] < 0:
            yield "--%s cannot be negative (0: no limit)" % name
    if o["rate-window"] <= 0:
        yield "--rate-window must be positive"


def rate_settings(o):
    return dict(conn_rate=o["conn-rate"], msg_rate=o["msg-rate"], rcpt_rate=o["rcpt-rate"],
                rate_window=o["rate-window"], rate_trusted=o["rate-trusted"])


def _coercion(name, kind):
    """int or float for ``--name``; a bad value is a usage error naming it
    (Twisted's own says only "could not convert string to float")."""
    what = "an integer" if kind is int else "a number"

    def coerce(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise usage.UsageError("--%s wants %s, not %r" % (name, what, text))
        return value

    return coerce


def named_coercions(parameters):
    """``optParameters`` rows with their int/float coercions naming the option."""
    return [row[:4] + [_coercion(row[0], row[4])] if row[4:5] in ([int], [float]) else row
            for row in parameters]


# the sizes every SMTP server must at least accept
RFC5321_MINIMUMS = (("max-command-line", 512), ("max-recipients", 100), ("max-path", 256),
                    ("max-local-part", 64), ("max-domain", 255))


class SmtpdOptions(usage.Options):
    synopsis = ("[-dDeEafgpqrs] [-c cert] [-h mydom] [-k ip] [-m mailer] [-n netdir] "
                "[--conf smtpd.conf] [--listen ENDPOINT] [--root DIR] [--passwd FILE] "
                "[--key key.pem] [--smtps]")
    longdesc = ("Plan 9 upas smtpd: an ESMTP server with upas's relay rules. "
                "Mail for local users goes to <root>/box/<user>/mbox, relayed mail "
                "to <root>/queue/, or everything to the -m mailer.")

    optFlags = [
        ["debug", "d", "trace every byte of every connection to <log-dir>/smtpdb/"],
        ["verify-sender-domain", "r", "refuse senders whose domain does not exist in DNS "
                                      "(upas's historic check)"],
        ["norelay", "f", "refuse relaying for untrusted peers (the default here; "
                         "also overrides 'norelay off' in smtpd.conf)"],
        ["save-blocked", "s", "save blocked messages under <root>/queue.dump/<MonD>/"],
        ["greylist", "g", "greylist untrusted peers (state in <root>/grey/)"],
        ["relax-helo", "e", "skip the extra HELO checks (reserved names, literals, DNS)"],
        ["helo-lie-auth", "E", "a HELO lie requires AUTH instead of a hang-up"],
        ["delay", "D", "wait 15 tarpit units before HELO replies to untrusted peers"],
        ["require-auth", "a", "require AUTH before MAIL (530 until then)"],
        ["clear-passwords", "p", "offer and accept PLAIN/LOGIN without TLS"],
        ["smtps", None, "implicit TLS: the listener speaks TLS from the first byte "
                        "(port 465 style), with the -c certificate"],
        ["quiet", "q", "log HELO only after it passes"],
        ["no-queue-runner", None, "do not deliver the outbound queue in this process "
                                  "(use upas-runq)"],
    ] + QUEUE_FLAGS + RATE_FLAGS
    optParameters = [
        ["domain", "h", None, "our mail domain (greeting, HELO replies)"],
        ["netdir", "n", None, "stdio mode (upas-smtpd): the connection's address, "
                              "ip[!port] or a directory with upas remote and local files; "
                              "ignored by twistd, where each connection has its own"],
        ["cert", "c", None, "PEM certificate (chain, and the key unless --key) for "
                            "STARTTLS; STARTTLS is offered only with -c"],
        ["key", None, None, "PEM private key, when -c holds only certificates"],
        ["passwd", None, None, "AUTH password file, user:secret lines "
                               "(default: <lib>/passwd)"],
        ["mailer", "m", None, "deliver by running MAILER -r rcpt... instead of the mail root"],
        ["conf", None, None, "upas smtpd.conf file (default: built-in defaults)"],
        ["listen", None, service.DEFAULT_LISTEN, "Twisted server endpoint to listen on"],
        ["metrics", None, None, "serve Prometheus metrics at /metrics on this Twisted "
                                "endpoint (e.g. tcp:9125:interface=127.0.0.1); needs "
                                "prometheus_client (the 'metrics' extra)"],
        ["root", None, "mail", "mail root directory"],
        ["sysname", None, None, "our host name (upas $site); default: the machine's"],
        ["resolver", None, None, "DNS server HOST:PORT for every lookup (default: resolv.conf)"],
        ["lib", None, None, "upas /mail/lib: blocked, validateaddress, validatesender, "
                            "names.blocked, senders (default: <root>/lib)"],
        ["blocked", None, None, "ratify list file (default: <lib>/blocked)"],
        ["trusted-dir", None, None, "temporary trusted grants, one file per IP "
                                    "(default: <lib>/trusted.d)"],
        ["log-dir", None, None, "directory for -d traces (default: <root>/log)"],
        ["log-json", None, None, "also write every log event as a JSON line to this file "
                                 "('-': standard output); see docs/logging.rst"],
        ["decision-log", None, None, "write one JSON line per session to this file: "
                                     "the facts and decisions 'upas-policy replay' "
                                     "runs again (docs/policy.rst)"],
        ["tarpit-unit", None, 1.0, "seconds per upas tarpit second (0 turns waits off)", float],
        ["tarpit-max", None, 300.0, "longest single tarpit wait, in seconds", float],
        ["mailer-timeout", None, 600.0, "seconds a -m mailer may run", float],
        ["validator-timeout", None, 60.0, "seconds a validator hook may run", float],
        ["dns-timeout", None, 20.0, "seconds a DNS check may take", float],
        ["auth-fail-delay", None, 1.0, "seconds a failed AUTH waits after the client "
                                       "address's previous one, doubling per recent "
                                       "failure (at most 30)", float],
        ["auth-max-failures", None, 3, "failed AUTHs from one client address, over all "
                                       "its connections, before it is cut off", int],
        ["greylist-min", None, 300.0, "seconds before a greylisted retry passes "
                                      "(upas: 5 min)", float],
        ["greylist-max", None, 50400.0, "seconds after which an attempt is forgotten "
                                        "(upas: 14 h)", float],
        ["idle-timeout", None, 300.0, "seconds a client may stay silent", float],
        ["session-timeout", None, 2700.0, "seconds from connect until DATA must have "
                                          "started (upas: 45 min)", float],
        ["data-timeout", None, 8700.0, "seconds one DATA transfer may take "
                                       "(upas: 145 min)", float],
        ["data-block-timeout", None, 300.0, "seconds a client may be silent inside DATA",
         float],
        ["message-size-limit", None, 128 * 1024 * 1024, "largest message in bytes "
                                                        "(advertised as SIZE)", int],
        ["max-command-line", None, 4096, "longest command line (at least 512)", int],
        ["max-data-line", None, 65536, "longest line inside a message", int],
        ["max-recipients", None, 1000, "recipients per message (at least 100)", int],
        ["hop-limit", None, 32, "Received: and Delivered-To: fields a message may have, "
                                "ours counted (a mail loop)", int],
        ["max-path", None, 256, "longest MAIL/RCPT path in octets, brackets included "
                                "(at least 256)", int],
        ["max-local-part", None, 64, "longest local part of a path (at least 64)", int],
        ["max-domain", None, 255, "longest domain of a path (at least 255)", int],
        ["max-connections", None, 20000, "connections at once, in all (also bounded by "
                                         "the open-file limit)", int],
        ["max-connections-per-peer", None, 50, "connections at once from one untrusted "
                                               "address", int],
        ["shutdown-grace", None, 60.0, "SIGTERM: seconds a message in DATA may take to "
                                       "finish", float],
        # shared state (issue 18)
        ["state", None, "local", "where the anti-abuse state lives: local (memory and "
                                 "files under the mail root) or redis://HOST:PORT/DB, "
                                 "shared by every node"],
        ["state-failure", None, "tempfail", "when Redis cannot answer: tempfail (4xx) or "
                                            "local (this node's own state)"],
        ["node", None, None, "this node's name for its connection lease "
                             "(default: host name and pid)"],
        ["state-lease", None, 30.0, "seconds a dead node's connections keep counting", float],
        ["workers", None, 1, "processes serving the listener (tcp:, ssl: or haproxy:tcp:), "
                             "this one included; recommended: the number of CPU cores", int],
    ] + QUEUE_PARAMETERS + RATE_PARAMETERS
    optParameters = named_coercions(optParameters)

    def __init__(self):
        usage.Options.__init__(self)
        self["evil"] = []
        self["proxy-from"] = []

    def opt_k(self, value):
        """banned peer IP or CIDR, dropped at connect; may be repeated"""
        try:
            self["evil"].append(smtpdconf.parse_network(value))
        except ValueError as e:
            raise usage.UsageError("-k: %s" % e)

    opt_evil = opt_k

    def opt_proxy_from(self, value):
        """load balancer IP or CIDR whose PROXY headers a haproxy: listener
        believes (required with one); comma-separated and/or repeated"""
        try:
            self["proxy-from"].extend(smtpdconf.parse_network(v.strip())
                                      for v in value.split(","))
        except ValueError as e:
            raise usage.UsageError("--proxy-from: %s" % e)

    def parseOptions(self, options=None):
        # the workers (--workers) parse the same options again
        self["argv"] = list(sys.argv[1:] if options is None else options)
        # Under twistd (a sub-command: ``parent`` is twistd's options) a
        # usage error is one line and exit 1, as a config error is; twistd
        # itself would print the whole usage text before it.
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit("upas-smtpd: %s" % e)

    def postOptions(self):
        try:
            self["settings"] = self.make_settings()
        except smtpdconf.ConfigError as e:
            raise SystemExit("upas-smtpd: %s" % e)

    def make_settings(self):
        """The settings these options give, every file start-up reads read
        (``upas-policy explain`` builds its settings here too): ConfigError
        for a file or ``-m`` start-up cannot use, UsageError for a value."""
        config = smtpdconf.SmtpdConf()
        if self["conf"]:
            config = smtpdconf.load(self["conf"])
        for problem in self.value_problems():
            raise usage.UsageError(problem)
        if self["mailer"] and resolve_mailer(self["mailer"]) is None:
            raise smtpdconf.ConfigError("-m %s: no such executable" % self["mailer"])
        self["mergeArgs"] = self.merge_args()
        s = settings.merge(config, **self["mergeArgs"])
        # a broken ratify file stops start-up; later edits that break it are
        # logged and the last good version stays in force
        check_files(s, self["require-auth"], bool(self["passwd"]))
        return s

    def value_problems(self):
        """Each option value the server refuses, as its one-line reason
        (start-up stops at the first; ``--check-config`` lists them all)."""
        if self["key"] and not self["cert"]:
            yield "--key needs -c"
        if self["smtps"] and not self["cert"]:
            yield "--smtps needs a certificate (-c)"
        for name, least in RFC5321_MINIMUMS:
            if self[name] < least:
                yield "--%s must be at least %d (RFC 5321 4.5.3.1)" % (name, least)
        for name in ("message-size-limit", "max-data-line", "max-connections",
                     "max-connections-per-peer", "data-block-timeout"):
            if self[name] <= 0:
                yield "--%s must be positive" % name
        if self["shutdown-grace"] < 0:
            yield "--shutdown-grace cannot be negative"
        if self["auth-fail-delay"] < 0:
            yield "--auth-fail-delay cannot be negative"
        for name in ("auth-max-failures", "hop-limit"):  # 0 would refuse everything
            if self[name] < 1:
                yield "--%s must be at least 1" % name
        try:
            if self["resolver"]:
                self["resolverAddress"] = parse_hostport(self["resolver"])
            check_endpoint(self["listen"])
        except usage.UsageError as e:
            yield str(e)
        else:
            problem = service.proxy_from_problem(self["listen"], self["proxy-from"])
            if problem:
                yield problem
        if self["metrics"]:
            try:
                check_metrics(self["metrics"])
            except usage.UsageError as e:
                yield str(e)
        if self["workers"] < 1:
            yield "--workers must be at least 1"
        elif self["workers"] > 1 and not self._adoptable_listener():
            yield ("--workers %d: the workers can share only a tcp: or ssl: "
                   "listener, not %s" % (self["workers"], self["listen"]))
        for name in ("idle-timeout", "mailer-timeout", "validator-timeout", "dns-timeout",
                     "session-timeout", "data-timeout"):
            if self[name] <= 0:
                yield "--%s must be positive" % name
        for name in ("tarpit-unit", "tarpit-max"):
            if self[name] < 0:
                yield "--%s cannot be negative" % name
        if self["greylist-min"] < 0:
            yield "--greylist-min cannot be negative"
        if self["greylist-max"] <= self["greylist-min"]:
            yield "--greylist-max must be more than --greylist-min"
        yield from rate_problems(self)
        yield from state_problems(self)

    def _adoptable_listener(self):
        try:
            return service.adoptable(listener(self["listen"]))
        except Exception:  # --listen itself is reported as broken
            return True

    def merge_args(self):
        """The ``settings.merge`` keywords these options give; UsageError
        for a queue option that makes no sense."""
        root = os.path.abspath(self["root"])
        paths = {k: os.path.abspath(self[o]) if self[o] else None
                 for k, o in (("lib", "lib"), ("blocked", "blocked"),
                              ("trusted_dir", "trusted-dir"), ("log_dir", "log-dir"),
                              ("passwd", "passwd"), ("cert", "cert"), ("key", "key"))}
        return dict(
            sysname=self["sysname"],
            domain=self["domain"],
            norelay_flag=self["norelay"],
            root=root,
            mailer=self["mailer"],
            mailer_timeout=self["mailer-timeout"],
            idle_timeout=self["idle-timeout"],
            quiet=self["quiet"],
            relax_helo=self["relax-helo"],
            helo_lie_auth=self["helo-lie-auth"],
            helo_delay=self["delay"],
            verify_sender=self["verify-sender-domain"],
            greylist=self["greylist"],
            greylist_min=self["greylist-min"],
            greylist_max=self["greylist-max"],
            save_blocked=self["save-blocked"],
            evil=tuple(self["evil"]),
            proxy_from=tuple(self["proxy-from"]),
            debug=self["debug"],
            tarpit_unit=self["tarpit-unit"],
            tarpit_max=self["tarpit-max"],
            validator_timeout=self["validator-timeout"],
            dns_timeout=self["dns-timeout"],
            session_timeout=self["session-timeout"],
            data_timeout=self["data-timeout"],
            require_auth=self["require-auth"],
            clear_passwords=self["clear-passwords"],
            smtps=self["smtps"],
            auth_fail_delay=self["auth-fail-delay"],
            auth_max_failures=self["auth-max-failures"],
            queue_runner=not self["no-queue-runner"],
            data_block_timeout=self["data-block-timeout"],
            message_limit=self["message-size-limit"],
            max_command_line=self["max-command-line"],
            max_data_line=self["max-data-line"],
            max_recipients=self["max-recipients"],
            hop_limit=self["hop-limit"],
            max_path=self["max-path"],
            max_local_part=self["max-local-part"],
            max_domain=self["max-domain"],
            max_connections=self["max-connections"],
            max_connections_per_peer=self["max-connections-per-peer"],
            shutdown_grace=self["shutdown-grace"],
            state=self["state"],
            state_failure=self["state-failure"],
            node=self["node"] or redisstate.default_node(),
            state_lease=self["state-lease"],
            **queue_settings(self),
            **rate_settings(self),
            **paths,
        )


def state_problems(o):
    """The shared-state options' problems, each one line (a URL that does
    not parse; an unreachable Redis is no start-up error)."""
    if o["state"] != "local":
        try:
            redisstate.parse_url(o["state"])
        except ValueError as e:
            yield "--state: %s (local or redis://HOST:PORT/DB)" % e
    if o["state-failure"] not in ("tempfail", "local"):
        yield "--state-failure wants tempfail or local, not %r" % o["state-failure"]
    if not o["state-lease"] >= MIN_LEASE:  # NaN too
        # renewed every third of it: shorter would be thousands of renewals a second
        yield "--state-lease must be at least %g seconds" % MIN_LEASE


MIN_LEASE = 1.0


def check_files(s, require_auth=False, passwd_named=False, errors=None):
    """Read every file start-up reads: the ratify list, aliases and users,
    the password file (when AUTH is asked for, or the file is named or
    there), the certificate and key.  ConfigError for the first problem,
    or, with a list ``errors``, each problem added to it (``conf.report``)."""
    def parsed(path, parse):
        try:
            return parse(smtpdconf.read_text(path), path, errors=errors)
        except smtpdconf.ConfigError as e:
            smtpdconf.report(errors, str(e))

    if os.path.exists(s.path("blocked")):
        parsed(s.path("blocked"), ratify.parse)
    # the same for aliases and users: a broken one would make every
    # alias, or every listed user, unknown (a permanent 550)
    for name, parse in (("aliases", local.parse_aliases), ("users", local.parse_users)):
        path = os.path.join(s.path("lib"), name)
        if os.path.exists(path):
            parsed(path, parse)
    # AUTH that cannot work is a start-up error when asked for
    if require_auth or passwd_named or os.path.exists(s.path("passwd")):
        users = parsed(s.path("passwd"), passwd.parse)
        if require_auth and users == {}:
            smtpdconf.report(errors, "%s: no users, so -a would refuse all mail"
                             % s.path("passwd"))
    if s.cert:
        try:
            tls.CertificateFile(s.cert, s.key).load()
        except smtpdconf.ConfigError as e:
            smtpdconf.report(errors, str(e))


def listener(description):
    """The endpoint Twisted builds for ``--listen`` (not listening yet)."""
    from twisted.internet import reactor

    return service.listener_endpoint(reactor, description)


def check_endpoint(description, option="listen", build=listener):
    """An endpoint (``--listen``, or ``option``) Twisted cannot parse, or a
    PROXY one, is a usage error naming it, not a traceback."""
    try:
        build(description)
    except smtpdconf.ConfigError as e:
        raise usage.UsageError(str(e))
    except Exception as e:  # endpoint parsers raise TypeError, IndexError, ... too
        raise usage.UsageError("--%s %s: %s" % (option, description,
                                                parse_error_text(e, description)))


def metrics_endpoint(description):
    from twisted.internet import reactor

    return endpoints.serverFromString(reactor, description)


def check_metrics(description):
    """--metrics needs prometheus_client, which is optional, and an endpoint."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise SystemExit("upas-smtpd: --metrics needs prometheus_client "
                         "(pip install 'upasmail[metrics]')")
    check_endpoint(description, "metrics", metrics_endpoint)


def parse_error_text(e, description):
    """Why Twisted could not parse an endpoint string, for one line."""
    kind = description.split(":", 1)[0].lower()
    if isinstance(e, TypeError):  # the parts do not fit the parser's parameters
        why = re.sub(r"^[\w.]+\(\) ", "", str(e))
        if re.match(r"takes .* positional arguments? but", why):  # counts self, reactor
            why = "too many ':'-separated parts"
        text = "wrong parameters for %s: %s" % (kind, why)
        parts = service.endpoint_parts(description)
        named = [i for i, part in enumerate(parts) if "=" in part]
        if named and any("=" not in part for part in parts[named[0]:]):
            # a value's own colon made the rest of it a positional part
            text += " (write a ':' inside a value as '\\:', as in interface=\\:\\:1)"
        return text
    if isinstance(e, LookupError) and kind == "systemd":
        return "no such socket inherited from systemd (%d inherited)" % len(
            ListenFDs.fromEnvironment().inheritedDescriptors())
    return str(e) or type(e).__name__


def parse_hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError("--resolver wants HOST:PORT, not %r" % text)
    return host.strip("[]"), int(port)


def reloaded_settings(options):
    """Settings with smtpd.conf read again (SIGHUP); ConfigError if it is broken."""
    config = smtpdconf.load(options["conf"]) if options["conf"] else smtpdconf.SmtpdConf()
    return settings.merge(config, **options["mergeArgs"])


def reload_service(top, options):
    """SIGHUP: smtpd.conf read again; a broken one keeps the running settings."""
    try:
        top.reload(reloaded_settings(options))
    except smtpdconf.ConfigError as e:
        log.error("SIGHUP: {err}; keeping the running settings", err=e, event="smtpd.reload",
                  ok=False)


def failure_reason(e):
    """``no such file or directory: /x/sock.lock`` for an OSError, else its text."""
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror[:1].lower() + e.strerror[1:]
        path = e.filename2 or e.filename  # symlink(pid, lock): the lock is the second
        return why + (": %s" % os.fsdecode(path) if path else "")
    return str(e) or type(e).__name__


def open_decision_log(factory, options, clock):
    """--decision-log: opened at start-up (before twistd's --uid switch);
    one that cannot be opened stops start-up with one line."""
    try:
        decisionlog.attach(factory, options["decision-log"], clock)
    except OSError as e:
        raise SystemExit("upas-smtpd: --decision-log %s: %s" % (options["decision-log"],
                                                                failure_reason(e)))
