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
    message_limit: int = 128 * 1024 * 1024
    quiet: bool = False
    conf: SmtpdConf = field(default_factory=SmtpdConf)

    @property
    def dom(self):
        return self.identity.dom

    @property
    def me(self):
        return self.identity.me

    @property
    def ours(self):
        return Ours(self.identity.names, self.ourdomains)


def merge(conf, *, sysname=None, domain=None, norelay_flag=False, fqdn=None, **rest):
    """Build Settings from smtpd.conf and flags (flags win)."""
    ident = identity(sysname, domain, conf.defaultdomain, fqdn)
    relay_control = True if norelay_flag else (conf.norelay is not False)
    return Settings(
        identity=ident,
        relay_control=relay_control,
        ournets=conf.ournets,
        ourdomains=conf.ourdomains,
        conf=conf,
        **rest,
    )
