"""docs/policy.rst lists every table's checks, in the tables' order."""

import os
import re

from upasmail import policy

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "policy.rst")


def _section(text, phase):
    """A definition list item: its term line and its indented text."""
    start = text.index("\n``%s``" % phase)
    end = re.compile(r"\n\n(?=\S)").search(text, start + 1)
    return text[start:end.start() if end else len(text)]


def test_the_doc_lists_every_check_in_table_order():
    text = open(DOC, encoding="utf-8").read()
    text = text[text.index("The tables\n"):]
    for phase, table in policy.TABLES.items():
        names = [c.__name__ for c in table]
        listed = [n for n in re.findall(r"``(\w+)``", _section(text, phase)) if n in names]
        assert listed == names, phase
