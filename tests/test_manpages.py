"""The manual pages in docs/man: they build without a docutils warning,
``man`` shows them without a warning, every option of every command and
every smtpd.conf keyword is documented (so a new flag without
documentation fails here), the committed roff is built from the current
sources, and installing puts them in share/man."""

import configparser
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
from docutils import nodes
from docutils.core import publish_doctree
from docutils.utils import SystemMessage

from upasmail import conf, policytool, replay, tap_runq, tap_smtp, tap_smtpd
from upasmail.cli import granttool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "docs", "man")


def _load_build():
    spec = importlib.util.spec_from_file_location("man_build", os.path.join(MAN, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()



def smtpd_option_classes():
    """``twistd upas-smtpd``'s options, and those of the ``upas-smtpd``
    console script (stdio mode) and of ``--check-config`` where the tree
    has them: all three are documented in upas-smtpd(8)."""
    classes = [tap_smtpd.Options]
    for module, get in (("upasmail.stdio", lambda m: m.options_class()),
                        ("upasmail.checkconfig", lambda m: m.Options)):
        if importlib.util.find_spec(module) is not None:
            classes.append(get(importlib.import_module(module)))
    return classes


COMMANDS = {
    "upas-smtpd.8": smtpd_option_classes(),
    "upas-smtp.8": [tap_smtp.Options],
    "upas-mailq.1": [tap_runq.MailqOptions],
    "upas-runq.8": [tap_runq.RunqOptions],
    "upas-policy.8": [policytool.ExplainOptions, replay.Options],
    "upas-grant.8": [granttool.GrantOptions],
}
PAGES = sorted(COMMANDS) + ["smtpd.conf.5"]
TWISTED_OWN = {"help", "version"}  # every usage.Options has them


def source(page, directory=MAN):
    return os.path.join(directory, page + ".rst")


def doctree(page):
    with open(source(page), "rb") as f:
        return publish_doctree(f.read(), source_path=source(page),
                               settings_overrides=build.SETTINGS)


def option_names(term):
    """``-h``, ``--domain`` ... as written in a definition-list term."""
    return set(re.findall(r"(?<![\w-])--?[A-Za-z0-9][\w-]*", term))


def options(cls):
    """Every option of a usage.Options class: its optFlags, optParameters
    and opt_* methods, long name -> short name or None."""
    o = cls()
    short = {name: s for s, name in o.synonyms.items() if len(s) == 1}
    return {name: short.get(name) for name in (n.rstrip("=") for n in o.longOpt)
            if name not in TWISTED_OWN}


def undocumented(cls, terms):
    """Options of ``cls`` that no term documents (with its short name, if any)."""
    written = [option_names(t) for t in terms]
    missing = []
    for name, short in sorted(options(cls).items()):
        wanted = {"--" + name} | ({"-" + short} if short else set())
        if not any(wanted <= names for names in written):
            missing.append(" ".join(sorted(wanted)))
    return missing


def terms(tree):
    return [t.astext() for t in tree.findall(nodes.term)]


def section(tree, title):
    for s in tree.findall(nodes.section):
        if s[0].astext() == title:
            return s
    raise AssertionError("no section %s" % title)


def test_every_page_has_a_source():
    assert [os.path.basename(build.target(s)) for s in build.sources()] == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_builds_without_warnings(page):
    roff = build.render(source(page))
    # the seed's smtp(8) layout
    for heading in ("SYNOPSIS", "DESCRIPTION", "FILES", "SOURCE", "SEE ALSO"):
        assert '\n.SH %s\n' % heading in roff or "\n.SH \"%s\"\n" % heading in roff, heading
    assert re.search(r'^\.TH "%s" "%s"' % tuple(page.rsplit(".", 1)), roff, re.M)


def test_a_docutils_warning_stops_the_build(tmp_path):
    bad = tmp_path / "bad.8.rst"
    bad.write_text("===\nbad\n===\n\n* a list item\nand text that loses its list\n")
    with pytest.raises(SystemMessage, match="WARNING"):
        build.render(str(bad))
    assert subprocess.run([sys.executable, os.path.join(MAN, "build.py"), "--nonsense"],
                          capture_output=True).returncode == 64


def render_problems(path):
    """What ``man -l`` (and groff's warnings) say about a roff page: a list
    of problems, empty when it shows cleanly."""
    problems = []
    env = dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    if shutil.which("man"):
        # man-db passes groff's warnings on with --warnings; mandoc's man has no such flag
        man_db = "--warnings" in subprocess.run(["man", "--help"], capture_output=True,
                                                text=True, env=env).stdout
        run = subprocess.run(["man"] + (["--warnings"] if man_db else []) + ["-l", path],
                             capture_output=True, text=True, env=env, timeout=60)
        if run.returncode or run.stderr.strip():
            problems.append("man -l: exit %d: %s" % (run.returncode, run.stderr))
    if shutil.which("groff"):
        run = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", path],
                             capture_output=True, text=True, env=env, timeout=60)
        if run.returncode or run.stderr.strip():
            problems.append("groff: exit %d: %s" % (run.returncode, run.stderr))
    return problems


needs_man = pytest.mark.skipif(not (shutil.which("man") or shutil.which("groff")),
                               reason="neither man nor groff installed")


@needs_man
@pytest.mark.parametrize("page", PAGES)
def test_man_shows_the_page_without_warnings(page):
    path = os.path.join(MAN, page)
    assert render_problems(path) == []
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", path], capture_output=True, text=True,
                               env=dict(os.environ, MANPAGER="cat", MANWIDTH="80")).stdout
        name = page.rsplit(".", 1)[0]
        assert re.search(r"^ +%s - \S" % re.escape(name), shown, re.M), shown[:500]


@needs_man
def test_the_render_check_sees_a_warning(tmp_path):
    broken = tmp_path / "broken.8"
    broken.write_text('.TH "BROKEN" "8"\n.SH NAME\nbroken \\- x\n.XQ not a macro\n')
    assert render_problems(str(broken))


@pytest.mark.parametrize("page", sorted(COMMANDS))
def test_every_option_is_documented(page):
    written = terms(doctree(page))
    assert [name for cls in COMMANDS[page] for name in undocumented(cls, written)] == []


def test_an_undocumented_option_is_found():
    class Newer(tap_smtpd.Options):
        optFlags = tap_smtpd.Options.optFlags + [["brand-new", "Z", "not in the page"]]

        def opt_also_new(self, value):
            """a handler, not a table row"""

    written = terms(doctree("upas-smtpd.8"))
    assert undocumented(Newer, written) == ["--also-new", "--brand-new -Z"]
    # a term that names the long option without its short one is not enough
    assert undocumented(tap_smtpd.Options, [t.replace("-d, ", "") for t in written]) == [
        "--debug -d"]


def smtpd_conf_keywords():
    """The keywords the parser knows: each is a field of SmtpdConf."""
    keywords = [f.name for f in dataclasses.fields(conf.SmtpdConf)]
    for keyword in keywords:
        try:
            conf.parse(keyword)
        except conf.ConfigError as e:
            assert "unknown keyword" not in str(e), keyword
    return keywords


def test_every_smtpd_conf_keyword_is_documented():
    documented = [t.split()[0] for t in terms(section(doctree("smtpd.conf.5"), "KEYWORDS"))]
    assert sorted(documented) == sorted(smtpd_conf_keywords())
    with pytest.raises(conf.ConfigError, match="unknown keyword"):
        conf.parse("nosuchkeyword on")


def test_built_pages_are_up_to_date():
    assert build.stale() == []
    check = subprocess.run([sys.executable, os.path.join(MAN, "build.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    import docutils

    for page in PAGES:
        with open(os.path.join(MAN, page), encoding="utf-8") as f:
            committed = f.read()
        # roff from another docutils version differs in details: then the
        # source's digest in it is what says it is current
        if "Docutils %s manpage writer" % docutils.__version__ in committed:
            assert committed == build.render(source(page)), page


def test_a_stale_page_is_found(tmp_path):
    for page in PAGES:
        shutil.copy(source(page), tmp_path)
        shutil.copy(os.path.join(MAN, page), tmp_path)
    assert build.stale(str(tmp_path)) == []
    with open(source("upas-runq.8", str(tmp_path)), "a") as f:
        f.write("\nOne more line.\n")
    os.remove(tmp_path / "upas-mailq.1")
    assert build.stale(str(tmp_path)) == [source(p, str(tmp_path))
                                          for p in ("upas-mailq.1", "upas-runq.8")]


def test_install_puts_every_page_in_share_man():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    files = cfg["options.data_files"]
    installed = {}
    for directory, listed in files.items():
        for path in listed.split():
            installed[path] = directory
    assert installed == {"docs/man/" + page: "share/man/man" + page.rsplit(".", 1)[1]
                         for page in PAGES}



def test_the_replies_listed_are_the_servers():
    block = next(b.astext() for b in section(doctree("upas-smtpd.8"), "REPLIES").findall(
        nodes.literal_block))
    code = "".join(open(os.path.join(folder, name), encoding="utf-8").read()
                   for folder, _, files in os.walk(os.path.join(ROOT, "upasmail"))
                   for name in files if name.endswith(".py"))
    replies = re.findall(r"^\d{3} (.+)$", block, re.M)
    assert len(replies) > 10
    for reply in replies:
        # dom, rcpt, ip and window stand for values filled in
        for fragment in re.split(r"\b(?:dom|rcpt|ip|window)\b", reply):
            assert fragment.strip() in code, reply
