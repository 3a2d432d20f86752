"""One reply table: every text the server and the client send is spelled
in upasmail/replies.py, once, and nowhere else.

Walks the source of every other module, so a reply text typed into a
module (a new one, or one copied back) fails here with its file and line.
"""

import ast
import os
import re
import string
from collections import defaultdict

import upasmail
from upasmail import replies

PACKAGE = os.path.dirname(os.path.abspath(upasmail.__file__))

# a text shorter than this inside another string proves nothing
MIN_SHARED = 12
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3} ")

# names in replies.py that are the same text on purpose (none yet)
ALIASES = frozenset()


def _texts(value):
    if isinstance(value, (str, bytes)):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _texts(v)


def table():
    """{name: text} of replies.py (tuple members as name[i])."""
    out = {}
    for name, value in vars(replies).items():
        if name.isupper():
            for i, text in enumerate(_texts(value)):
                out[name if isinstance(value, (str, bytes)) else "%s[%d]" % (name, i)] = text
    return out


def pieces(text):
    """The fixed parts of a reply template (between its ``{fields}``), long enough to count."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        parts = [literal for literal, _, _, _ in string.Formatter().parse(text)]
    except ValueError:
        parts = [text]
    for part in parts:
        code = ENHANCED.match(part)
        part = part[code.end():] if code else part  # the same words behind another code
        if len(part.strip()) >= MIN_SHARED:
            yield part


def _docstrings(tree):
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def spelled_replies(source, filename, known):
    """``file:line: text`` for each string constant of ``source`` that is a reply text."""
    tree = ast.parse(source, filename)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docs:
            continue
        value = node.value
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str):
            continue
        if ENHANCED.match(value) or any(p in value for p in known):
            found.append("%s:%d: %r" % (filename, node.lineno, value))
    return found


def _known():
    return frozenset(p for text in table().values() for p in pieces(text))


def _modules():
    """Every module of the package, subpackages included, as a path under it."""
    for folder, _, files in sorted(os.walk(PACKAGE)):
        for name in sorted(files):
            path = os.path.relpath(os.path.join(folder, name), PACKAGE)
            if name.endswith(".py") and path != "replies.py":
                yield path


def test_no_module_spells_a_reply_text():
    known = _known()
    found = []
    for name in _modules():
        with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
            found += spelled_replies(f.read(), "upasmail/" + name, known)
    assert not found, "reply texts outside replies.py:\n" + "\n".join(found)


def defined_twice(texts, aliases=ALIASES):
    """{text: names} of the texts that more than one name holds (aliases aside)."""
    by_text = defaultdict(list)
    for name, text in texts.items():
        by_text[text].append(name)
    return {text: names for text, names in by_text.items()
            if len(names) > 1 and not set(names) <= aliases}


def test_replies_defines_no_text_twice():
    assert not defined_twice(table())


def test_null_sender_is_spelled_once():
    """upas's null sender, ``/dev/null``, is address.NULL_SENDER everywhere else."""
    found = []
    for name in _modules():
        if name == "address.py":
            continue
        with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found += ["upasmail/%s:%d" % (name, node.lineno) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value == "/dev/null"]
    assert not found


# -- the detector itself -----------------------------------------------------

def test_detects_a_status_code_and_a_copied_text():
    known = frozenset(pieces("5.1.1 {path} ... user unknown"))
    source = ('"""Docstring: 550 5.1.1 x ... user unknown is fine here."""\n'
              'A = "4.3.0 anything"\n'
              'B = "%s ... user unknown" % who\n'
              'C = "a log line"\n')
    assert spelled_replies(source, "m.py", known) == [
        "m.py:2: '4.3.0 anything'", "m.py:3: '%s ... user unknown'"]


def test_detects_a_text_defined_twice():
    texts = {"A": "5.1.1 x", "B": "5.1.1 x", "C": "2.0.0 ok", "D[0]": "2.0.0 ok", "E": "4.0.0 y"}
    assert defined_twice(texts) == {"5.1.1 x": ["A", "B"], "2.0.0 ok": ["C", "D[0]"]}
    assert defined_twice(texts, aliases=frozenset(["A", "B"])) == {"2.0.0 ok": ["C", "D[0]"]}
