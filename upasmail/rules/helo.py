"""HELO/EHLO lie checks (upas smtpd.c ``heloclaims``, ``ckhello``).

Spec upas-behaviour.md §1.7.  For untrusted peers only:

* ``claims_to_be_us``: the name is our ``dom`` (exactly), one of our host
  names (any case), or has no letter and is not an address literal;
  connections from our own address are exempt.
* ``static_lie`` (skipped with ``-e``): a dotless name, a reserved name
  (``localhost``, ``.test``, ``.local``, ``.lan``, ``.invalid``,
  ``.localdomain``, ``.example``, ``example.com/net/org`` and below), or
  no letter at all (so address literals too: upas's quirk, kept).
* Then (also skipped with ``-e``) the name must exist in DNS, unless it is
  the peer's PTR name (``dnscheck``).

A lie gets ``554 5.7.0 Liar!`` and the connection is closed, or with
``-E`` the line ``250-you lie.  authentication required.`` before the
normal reply and MAIL needs AUTH (``policy.helo_lie`` puts it together).
These functions only decide.
"""

RESERVED_TLDS = frozenset(
    ["localdomain", "localhost", "local", "example", "invalid", "lan", "test"]
)
RESERVED_SLDS = frozenset(["example.com", "example.net", "example.org"])


def _has_letter(name):
    return any("a" <= c.lower() <= "z" for c in name)


def claims_to_be_us(him, rsys, lsys, dom, names):
    if rsys == lsys:
        return False
    if him == dom:
        return True
    if him.lower() in (n.lower() for n in names):
        return True
    return not him.startswith("[") and not _has_letter(him)


def static_lie(him):
    """The checks of ckhello that need no DNS; True when the name lies."""
    name = him[:-1] if him.endswith(".") else him
    if "." not in name:
        return True
    labels = name.lower().split(".")
    if labels[-1] in RESERVED_TLDS:
        return True
    if ".".join(labels[-2:]) in RESERVED_SLDS:
        return True
    return not _has_letter(name)
