#!/usr/bin/env python3
"""Build the manual pages: every ``docs/man/<page>.<section>.rst`` to roff
``docs/man/<page>.<section>`` with docutils' manpage writer (rst2man).

    python docs/man/build.py            # build every page
    python docs/man/build.py --check    # exit 1 if a built page is stale

The built pages are committed, so that installing upasmail (which puts
them in <prefix>/share/man) and ``man -l docs/man/upas-smtpd.8`` need no
docutils; only whoever edits a page runs this.  A docutils warning (a
broken list, an unknown role) stops the build: it would lose text.

Each page records the SHA-256 of its source, so a page is checked against
its source whichever docutils version built it (their roff differs in
details).
"""

import glob
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"report_level": 2, "halt_level": 2, "input_encoding": "utf-8",
            "output_encoding": "utf-8", "exit_status_level": 2, "traceback": True}


def sources(directory=HERE):
    return sorted(glob.glob(os.path.join(directory, "*.[0-9].rst")))


def target(source):
    return source[:-len(".rst")]


def digest(source):
    with open(source, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stamp(source):
    """The comment line naming the source a page was built from."""
    return '.\\" source: %s sha256 %s\n' % (os.path.basename(source), digest(source))


def render(source):
    """The roff text of one page; docutils' SystemMessage on any warning."""
    from docutils.core import publish_string
    from docutils.writers import manpage

    with open(source, "rb") as f:
        text = publish_string(f.read(), source_path=source, writer=manpage.Writer(),
                              settings_overrides=SETTINGS).decode("utf-8")
    # after docutils' own header comments, which name its version
    head, sep, body = text.partition("\n.\n")
    return head + "\n" + stamp(source) + sep.lstrip("\n") + body


def stale(directory=HERE):
    """Sources whose built page is missing or was built from another text."""
    out = []
    for source in sources(directory):
        try:
            with open(target(source), encoding="utf-8") as f:
                current = stamp(source) in f.read()
        except FileNotFoundError:
            current = False
        if not current:
            out.append(source)
    return out


def main(argv):
    if argv == ["--check"]:
        old = stale()
        for source in old:
            print("%s: stale; run python docs/man/build.py" % target(source), file=sys.stderr)
        return 1 if old else 0
    if argv:
        print("usage: python docs/man/build.py [--check]", file=sys.stderr)
        return 64
    from docutils.utils import SystemMessage

    for source in sources():
        try:
            page = render(source)
        except SystemMessage as e:  # it names the file and line
            print("build.py: %s" % e, file=sys.stderr)
            return 1
        with open(target(source), "w", encoding="utf-8") as f:
            f.write(page)
        print(target(source))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
