"""RFC 822 header handling as upas's rfc822.y does it, token by token.

Used by smtpd when it writes a message for the mailer (pipemsg), and by
the smtp client (``convert``), which passes its own rewriting of a bare
address (``bangtoat``, then ``@hostdomain``).  Whitespace and comments are
kept exactly; only address tokens change.

* Field names are case-insensitive.  ``Return-Path`` is an ordinary field
  (upas spells its key ``return_path``, so it is not an originator: a
  message with only Return-Path still gets a From: added).
* Originators: From, Sender, Reply-To, Resent-From, Resent-Sender,
  Resent-Reply-To.  Destinations: To, Cc, Bcc, Resent-To, Resent-Cc,
  Resent-Bcc.
* In those fields every address without ``@`` gets ``@<him>`` appended,
  and ``<>`` becomes ``pOsTmAsTeR@<him>`` (quirk Q13, kept).
* A line that is not a field becomes ``BadHeader: <line>``, except a
  ``From `` line, which is dropped.  A field name containing white space
  (``X Foo: bar``) stops the parse: the rest passes through verbatim.
"""

import re

ORIGINATORS = frozenset(
    ["from", "sender", "reply-to", "resent-from", "resent-sender", "resent-reply-to"]
)
DESTINATIONS = frozenset(["to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"])
ADDRESS_FIELDS = ORIGINATORS | DESTINATIONS

_SPECIALS = "@<>:,;"
_FIELD = re.compile(r"([^\s:]+):")
_NAMED_FIELD = re.compile(r"([^:]*):")


class HeaderSyntaxError(ValueError):
    pass


def tokenize(value):
    """Split a field value into (kind, text) tokens.

    kinds: ws, comment, quoted, special, atom.  Joining the texts gives the
    value back unchanged.
    """
    tokens = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t\r\n":
            j = i
            while j < n and value[j] in " \t\r\n":
                j += 1
            tokens.append(("ws", value[i:j]))
            i = j
        elif c == "(":
            depth, j = 0, i
            while j < n:
                if value[j] == "\\":
                    j += 2
                    continue
                if value[j] == "(":
                    depth += 1
                elif value[j] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= n:
                raise HeaderSyntaxError("unclosed comment")
            tokens.append(("comment", value[i : j + 1]))
            i = j + 1
        elif c == '"':
            j = i + 1
            while j < n and value[j] != '"':
                j += 2 if value[j] == "\\" else 1
            if j >= n:
                raise HeaderSyntaxError("unclosed quoted string")
            tokens.append(("quoted", value[i : j + 1]))
            i = j + 1
        elif c in _SPECIALS:
            tokens.append(("special", c))
            i += 1
        elif c == ")":
            raise HeaderSyntaxError("unbalanced parenthesis")
        else:
            j = i
            while j < n and value[j] not in _SPECIALS + ' \t\r\n()"':
                j += 1
            tokens.append(("atom", value[i:j]))
            i = j
    return tokens


def _significant(tokens, indices):
    return [i for i in indices if tokens[i][0] not in ("ws", "comment")]


def qualify(value, him, rewrite=None):
    """Append ``@him`` to every address without ``@`` in an address-list value.

    ``rewrite(word, bracketed)``, when given, replaces an address that is
    one word without ``@`` (the smtp client's bang-to-at conversion)
    instead; ``bracketed`` says whether it stands inside ``<>``.
    """
    tokens = tokenize(value)
    after = {}  # token index -> text to insert after it
    replace = {}  # token index -> text to put in its place

    def bare(indices, bracketed):
        if rewrite is not None and len(indices) == 1 and tokens[indices[0]][0] == "atom":
            replace[indices[0]] = rewrite(tokens[indices[0]][1], bracketed)
        else:
            after[indices[-1]] = "@" + him

    def finish(indices):
        sig = _significant(tokens, indices)
        if not sig:
            return
        opens = [i for i in sig if tokens[i] == ("special", "<")]
        if opens:
            if len(opens) > 1:
                raise HeaderSyntaxError("nested angle brackets")
            lt = opens[0]
            closes = [i for i in sig if tokens[i] == ("special", ">")]
            if len(closes) != 1 or closes[0] < lt:
                raise HeaderSyntaxError("unbalanced angle brackets")
            inner = [i for i in sig if lt < i < closes[0]]
            colons = [i for i in inner if tokens[i] == ("special", ":")]
            if colons:  # source route <@a,@b:user@c>
                inner = [i for i in inner if i > colons[-1]]
            if not inner:
                after[lt] = "pOsTmAsTeR@" + him
            elif not any(tokens[i] == ("special", "@") for i in inner):
                bare(inner, True)
            return
        words = [i for i in sig if tokens[i][0] != "special" or tokens[i][1] == "@"]
        if any(tokens[i][0] == "special" and tokens[i][1] != "@" for i in sig):
            raise HeaderSyntaxError("stray special character")
        if not any(tokens[i] == ("special", "@") for i in words):
            bare(words, False)

    depth = 0
    item = []
    for i, (kind, text) in enumerate(tokens):
        if kind == "special":
            if text == "<":
                depth += 1
            elif text == ">":
                depth -= 1
                if depth < 0:
                    raise HeaderSyntaxError("unbalanced angle brackets")
            elif depth == 0 and text == ",":
                finish(item)
                item = []
                continue
            elif depth == 0 and text == ":":
                item = []  # group name: a phrase, not an address
                continue
            elif depth == 0 and text == ";":
                finish(item)
                item = []
                continue
        item.append(i)
    if depth != 0:
        raise HeaderSyntaxError("unbalanced angle brackets")
    finish(item)
    return "".join(replace.get(i, text) + after.get(i, "")
                   for i, (_, text) in enumerate(tokens))


class Header:
    """A parsed header: output lines in order plus what the message had."""

    def __init__(self):
        self.lines = []  # text lines, each ending in "\n"
        self.has_originator = False
        self.has_destination = False
        self.has_message_id = False
        self.fields = []  # (lowercased name, raw value) of parsed fields


def _split_fields(lines):
    """Group physical lines into (kind, lines): field, bad, verbatim, blank."""
    items = []
    for idx, line in enumerate(lines):
        body = line.rstrip("\n")
        if body == "":
            items.append(("blank", [line]))
            items.append(("verbatim", lines[idx + 1 :]))
            return items
        if body[0] in " \t":
            if items and items[-1][0] in ("field", "bad"):
                items[-1][1].append(line)
            else:
                items.append(("bad", [line]))
            continue
        if _FIELD.match(body):
            items.append(("field", [line]))
            continue
        if body.startswith("From "):
            items.append(("drop", [line]))
            continue
        if _NAMED_FIELD.match(body):  # a name with white space: stop here
            items.append(("verbatim", lines[idx:]))
            return items
        items.append(("bad", [line]))
    return items


def parse(lines, him, rewrite=None):
    """Parse header lines (str, each ending in newline) and rewrite them."""
    header = Header()
    for kind, group in _split_fields(lines):
        text = "".join(group)
        if kind == "drop":
            continue
        if kind in ("verbatim", "blank"):
            header.lines.extend(group)
            continue
        if kind == "bad":
            header.lines.append("BadHeader: " + text.lstrip(" \t"))
            continue
        name, value = text.split(":", 1)
        lname = name.lower()
        if lname in ADDRESS_FIELDS:
            try:
                value = qualify(value, him, rewrite)
            except HeaderSyntaxError:
                header.lines.append("BadHeader: " + text)
                continue
            if lname in ORIGINATORS:
                header.has_originator = True
            else:
                header.has_destination = True
        elif lname == "message-id":
            header.has_message_id = True
        header.fields.append((lname, value))
        header.lines.append(name + ":" + value)
    return header
