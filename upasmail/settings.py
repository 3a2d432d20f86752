"""Settings: the command line and smtpd.conf merged into one frozen object.

Identity (spec upas-behaviour.md §1.1 step 8, §1.4):

* ``sysname``: ``--sysname``, else the machine's host name (upas ``$site``)
* ``me``: the short name (before the first dot), used in ``Received:``
* ``dom``: ``-h``, else smtpd.conf ``defaultdomain``, else the host's FQDN,
  else ``me``; used in the greeting and HELO replies
* our names: sysname, its FQDN, ``me`` and ``dom``; recipients at these
  are local (as Postfix's mydestination; upas needs ``ourdomains``)

Flags win over smtpd.conf as upas does: the file can switch ``-f`` on but
never off.  Relay control itself is on unless ``norelay off``.
"""

import functools
import os
import socket
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .conf import SmtpdConf
from .relay import Ours


@dataclass(frozen=True)
class Identity:
    sysname: str
    me: str
    dom: str
    names: Tuple[str, ...]


def identity(sysname=None, domain=None, defaultdomain=None, fqdn=None):
    """Work out me/dom/names; consults the machine only for what is missing."""
    if not sysname:
        sysname = socket.gethostname()
        if fqdn is None:
            fqdn = socket.getfqdn(sysname)
    fqdn = fqdn or sysname
    me = sysname.split(".")[0]
    candidates = [n for n in (sysname, fqdn) if "." in n]
    dom = domain or defaultdomain or (candidates[0] if candidates else me)
    names = tuple(dict.fromkeys(n for n in (sysname, fqdn, me, dom) if n))
    return Identity(sysname, me, dom, names)


@dataclass(frozen=True)
class Settings:
    identity: Identity
    root: str = "mail"
    relay_control: bool = True
    ournets: Optional[tuple] = None  # None: the loopback default
    ourdomains: Tuple[str, ...] = ()
    mailer: Optional[str] = None
    mailer_timeout: float = 600.0
    idle_timeout: float = 300.0
    message_limit: int = 128 * 1024 * 1024  # SIZE; upas send's MSGLIMIT
    max_command_line: int = 4096  # RFC 5321: at least 512; AUTH needs more
    max_data_line: int = 64 * 1024  # RFC 5321 asks senders for 1000
    max_recipients: int = 1000  # RFC 5321: at least 100
    hop_limit: int = 32  # Received:/Delivered-To: fields (upas send refuses past 32)
    max_path: int = 256  # RFC 5321 4.5.3.1: octets of a MAIL/RCPT path, at least
    max_local_part: int = 64
    max_domain: int = 255
    max_connections: int = 20000  # in all (also bounded by the fd limit)
    max_connections_per_peer: int = 50  # per untrusted peer address
    data_block_timeout: float = 300.0  # silence allowed inside DATA
    shutdown_grace: float = 60.0  # SIGTERM: how long DATA may go on
    quiet: bool = False
    conf: SmtpdConf = field(default_factory=SmtpdConf)
    # anti-abuse (spec §1.7, §1.9-1.17); see docs/configuration.rst
    relax_helo: bool = False  # -e
    helo_lie_auth: bool = False  # -E
    helo_delay: bool = False  # -D: 15 tarpit units before HELO replies
    verify_sender: bool = False  # -r or verifysenderdom on
    greylist: bool = False  # -g
    greylist_min: float = 5 * 60.0  # an earlier attempt passes once this old (upas: 5 min)
    greylist_max: float = 14 * 60 * 60.0  # ... and until this old (upas: 14 h)
    # per-client rate limits (Postfix anvil's; not upas's): attempts per window, 0 = off
    conn_rate: int = 0  # --conn-rate: connections
    msg_rate: int = 0  # --msg-rate: MAIL commands
    rcpt_rate: int = 0  # --rcpt-rate: RCPT commands
    rate_window: float = 60.0  # --rate-window: seconds (Postfix anvil_rate_time_unit)
    rate_trusted: bool = False  # --rate-trusted: trusted and authenticated clients count too
    save_blocked: bool = False  # -s or saveblockedmsg on
    require_auth: bool = False  # -a
    clear_passwords: bool = False  # -p: PLAIN and LOGIN without TLS
    passwd: Optional[str] = None  # password file; default <lib>/passwd
    cert: Optional[str] = None  # -c: PEM certificate (and key)
    key: Optional[str] = None  # --key: a separate PEM key
    smtps: bool = False  # --smtps: the listener is TLS from the first byte
    auth_fail_delay: float = 1.0  # first failed AUTH waits this, doubling
    auth_max_failures: int = 3  # failed AUTHs before the connection closes
    # the outbound queue (upas runq + remotemail); see docs/configuration.rst
    queue_runner: bool = True  # run the queue inside upas-smtpd
    smarthost: Optional[str] = None  # dial string for all outbound mail
    relay_user: Optional[str] = None  # AUTH user at the smarthost
    relay_auth_file: Optional[str] = None  # "server user password" lines
    outbound_tls: bool = True  # STARTTLS when offered (upas smtp -s)
    mx_port: int = 25  # port MX hosts are dialled on (labs and tests change it)
    ipv6: bool = False  # also dial AAAA addresses
    max_deliveries: int = 20  # concurrent deliveries in all
    max_per_destination: int = 20  # concurrent deliveries to one domain (Postfix: 20)
    retry_min: float = 300.0  # first retry after a temporary failure
    retry_max: float = 3600.0  # longest wait between retries
    max_queue_age: float = 2 * 86400.0  # then the message is returned (upas runq)
    queue_scan: float = 60.0  # how often the queue is looked at
    evil: Tuple[object, ...] = ()  # -k networks
    # --proxy-from: the load balancers a PROXY (haproxy:) listener takes headers from
    proxy_from: Tuple[object, ...] = ()
    debug: bool = False  # -d
    lib: Optional[str] = None  # upas /mail/lib; default <root>/lib
    blocked: Optional[str] = None  # ratify file; default <lib>/blocked
    trusted_dir: Optional[str] = None  # grants; default <lib>/trusted.d
    log_dir: Optional[str] = None  # -d traces; default <root>/log
    tarpit_unit: float = 1.0  # seconds per upas tarpit second
    tarpit_max: float = 300.0  # longest single tarpit wait
    session_timeout: float = 45 * 60.0  # upas: command phase until first DATA
    data_timeout: float = 145 * 60.0  # upas: one DATA transfer
    validator_timeout: float = 60.0
    dns_timeout: float = 20.0
    # shared state (issue 18): see docs/configuration.rst "Shared state (Redis)"
    state: str = "local"  # or redis://HOST:PORT/DB
    state_failure: str = "tempfail"  # or local: answer from this node's state
    node: Optional[str] = None  # this node's lease name; None: host name + pid
    state_lease: float = 30.0  # how long a dead node's connections keep counting

    def path(self, name):
        """Where a file lives: the explicit setting, else upas's place."""
        lib = self.lib or os.path.join(self.root, "lib")
        defaults = {
            "lib": lib,
            "blocked": self.blocked or os.path.join(lib, "blocked"),
            "passwd": self.passwd or os.path.join(lib, "passwd"),
            "trusted_dir": self.trusted_dir or os.path.join(lib, "trusted.d"),
            "log_dir": self.log_dir or os.path.join(self.root, "log"),
            "grey": os.path.join(self.root, "grey"),
        }
        return defaults[name]

    @property
    def dom(self):
        return self.identity.dom

    @property
    def me(self):
        return self.identity.me

    @functools.cached_property
    def ours(self):
        # one per settings: connections share it and its per-address copies
        return Ours(self.identity.names, self.ourdomains)


def merge(conf, *, sysname=None, domain=None, norelay_flag=False, fqdn=None, **rest):
    """Build Settings from smtpd.conf and flags (flags win)."""
    ident = identity(sysname, domain, conf.defaultdomain, fqdn)
    relay_control = True if norelay_flag else (conf.norelay is not False)
    # the file may switch these on, never off (upas)
    rest["verify_sender"] = rest.get("verify_sender", False) or conf.verifysenderdom
    rest["save_blocked"] = rest.get("save_blocked", False) or conf.saveblockedmsg
    rest["smarthost"] = rest.get("smarthost") or conf.smarthost
    return Settings(
        identity=ident,
        relay_control=relay_control,
        ournets=conf.ournets,
        ourdomains=conf.ourdomains,
        conf=conf,
        **rest,
    )
