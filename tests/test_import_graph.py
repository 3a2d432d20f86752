"""The architecture's import rule, checked on the source with ``ast``.

Imports go one way: from the command line down to the pure modules.

* No circles: not among module-level imports, and not when the imports
  made inside functions are added (an import deferred into a function
  hides a circle, it does not remove it).  Every import made inside a
  function is listed in ``DEFERRED`` with its reason.
* The pure modules (``PURE``: facts in, decisions out) import only pure
  modules of the package, and no reactor-facing Twisted module
  (``REACTOR_FACING``: the reactor, endpoints, protocols, services, the
  web, AMP): Deferreds, the logger, ``twisted.python``, ``twisted.cred``,
  ``twisted.names.dns`` and interfaces are fine.  One named exception
  (``PURE_EXCEPTIONS``): ``policy`` takes a constant from ``statestore``.
* The command-line modules (``COMMAND_LINE``: the console scripts and
  twistd plugins' modules) are imported by no other module, with one
  exception: a tool hands over to another tool's main (``HANDOVERS``).
  In particular no tool imports another tool for its options.
  (``policytool`` loads ``replay`` by name with ``importlib``, a handover
  too, which ``ast`` does not see.)
* The options the tools share live in ``upasmail.options``; only the
  command-line modules import it, and ``workers`` (its worker process's
  main parses upas-smtpd's options again).
* Some modules have only the importers ``ONLY_FROM`` names: the
  protocol (``server``) is built only by its factory (``factory``), which
  only ``service`` builds; the protocol's AUTH command (``authcommands``)
  and the log lines of decisions (``notes``) are the protocol's alone; the worker pool,
  the metrics service and the test doubles (``testing``: upas-policy's
  ``--dns`` zone) are wired in only by the command line.
* The exception lists here name imports that exist: one that is gone
  is an error too, so the rule only gets stricter.
* ``twisted/plugins/`` imports nothing of ours: its ``ServiceMaker``
  lines name the ``tap_*`` modules, which twistd imports when asked.

* The folders are layers (``LAYERS``, top down: the command line, the
  wiring, ``smtpd``, ``runq``, ``smtp``, ``mailroot``, ``rules``, the
  shared modules): a module imports only from its own layer and the ones
  below it, but for the exceptions ``UPWARD`` names with their reasons.

A failure names the offending import as ``file:line``.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "upasmail"

PURE = {"address", "auth", "bounce", "clientresult", "conf", "convert", "crashpoint",
        "decision", "dnscheck", "factotum", "framing", "grammar", "greylist", "helo",
        "interfaces", "job", "local", "logformat", "mbox", "mxdial", "notes", "pipemsg",
        "policy", "proxyheader", "ratify", "relay", "replies", "rfc822", "session", "settings",
        "simulate", "tarpit", "thumbprint"}
COMMAND_LINE = {"tap_smtpd", "tap_smtp", "tap_runq", "stdio", "checkconfig", "policytool",
                "replay", "granttool"}
OPTIONS = "options"
OPTIONS_USERS = COMMAND_LINE | {"workers"}
# command-line module -> command-line module it hands the whole run to
HANDOVERS = {
    ("stdio", "checkconfig"): "upas-smtpd --check-config is the checker's main",
}
# pure module -> other module, each with its reason
PURE_EXCEPTIONS = {
    ("policy", "statestore"): "statestore.TOTAL, the key of the connection count; "
                              "statestore also holds the workers' AMP wire",
}
# module -> the only modules that may import it
ONLY_FROM = {
    "server": {"factory"},
    "factory": {"service"},
    "authcommands": {"server"},
    "notes": {"server"},
    "workers": COMMAND_LINE,
    "metrics": COMMAND_LINE,
    "testing": COMMAND_LINE,
}
# imports made inside a function: (importer, imported) -> why not at the top
DEFERRED = {
    ("conf", "mxdial"): "the smarthost dial string is checked only when one is set",
    ("privileges", "service"): "needs() looks at the listen endpoint only when asked",
    ("stdio", "checkconfig"): "a session need not load the checker",
    ("tap_runq", "service"): "upas-mailq never needs the resolver or thread runner",
    ("tap_smtp", "service"): "the resolver, built only when a message is sent",
    ("tap_smtpd", "metrics"): "prometheus_client is optional (--metrics)",
    ("workers", "service"): "the worker process's main only",
    ("workers", "options"): "the worker process's main parses upas-smtpd's options",
}
# the layers, top down: a module may import from its own and those below
LAYERS = ["cli", "wiring", "smtpd", "runq", "smtp", "mailroot", "rules", "shared"]
WIRING = {"", "service", "workers", "metrics", "privileges", "testing", "passwd"}
# imports up the layers: (importer, imported) -> why
UPWARD = {
    ("policy", "statestore"): PURE_EXCEPTIONS[("policy", "statestore")],
    ("conf", "mxdial"): "the smarthost dial string is checked only when one is set",
    ("workers", "options"): "the worker process's main parses upas-smtpd's options",
}


def layer(short, dotted):
    """The layer of the module named ``short``."""
    if short in WIRING:
        return "wiring"
    path = next(d for d, s in dotted.items() if s == short)
    first = path.split(".")[0]
    return first if first in LAYERS else "shared"


# Twisted modules a pure module must not import (prefixes)
REACTOR_FACING = ("twisted.internet.reactor", "twisted.internet.endpoints",
                  "twisted.internet.protocol", "twisted.internet.stdio",
                  "twisted.internet.ssl", "twisted.internet.threads", "twisted.internet.task",
                  "twisted.application", "twisted.protocols", "twisted.web",
                  "twisted.names.client", "twisted.names.server")


class Import:
    def __init__(self, importer, target, path, line, deferred, ours):
        self.importer, self.target, self.ours = importer, target, ours
        self.path, self.line, self.deferred = path, line, deferred

    def __repr__(self):
        return "%s:%d: %s imports %s" % (os.path.relpath(self.path, ROOT), self.line,
                                         self.importer, self.target)


def package_modules(root=ROOT):
    """{short name: path} of the package's modules, subpackages included.

    A module's short name is its own (``server`` for ``smtpd/server.py``),
    a subpackage's ``__init__`` its package's (``smtpd``), the package's
    own ``""``: the names are unique (a test says so), and the rules
    below are written with them."""
    top = os.path.join(root, PACKAGE)
    found = {}
    for folder, _, files in sorted(os.walk(top)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), top)
            parts = rel[:-3].split(os.sep)
            short = parts[-2] if parts[-1] == "__init__" and len(parts) > 1 else (
                "" if parts == ["__init__"] else parts[-1])
            assert short not in found, "two modules named %s" % short
            found[short] = os.path.join(folder, name)
    return found


def dotted_names(root=ROOT):
    """{dotted name under the package ("smtpd.server"): short name}."""
    top = os.path.join(root, PACKAGE)
    out = {}
    for short, path in package_modules(root).items():
        rel = os.path.relpath(path, top)[:-3].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        out[".".join(rel)] = short
    return out


def imports_of(path, importer=None, modules=(), dotted=None):
    """Every import in ``path`` as ``Import``s, one per module and line; a
    target of ours (``ours``) is its short module name, anything else its
    full dotted name (``import queue`` is the standard library's).  ``from
    .. import x`` is module ``x``; ``from .x import y`` is module ``x``
    (``y`` a name in it)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    dotted = dotted or {}
    folders = os.path.dirname(os.path.abspath(path)).split(os.sep)
    inside = folders[len(folders) - folders[::-1].index(PACKAGE):] if PACKAGE in folders else []
    package = [PACKAGE] + inside  # the package the file is in, as a dotted path

    def ours_short(full):
        rest = full[len(PACKAGE) + 1:]
        while rest and rest not in dotted:  # a name inside a module: the module
            rest = rest.rpartition(".")[0]
        return dotted.get(rest, full[len(PACKAGE) + 1:])

    def add(name, node, deferred):
        ours = name.startswith(PACKAGE + ".")  # absolute or resolved relative
        found.append(Import(importer, ours_short(name) if ours else name, path,
                            node.lineno, deferred, ours))

    def visit(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, deferred)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: within the package
                    assert child.level <= len(package), (
                        "%s:%d: relative import above the package" % (path, child.lineno))
                    base = ".".join(package[:len(package) - child.level + 1]
                                    + ([child.module] if child.module else []))
                else:
                    base = child.module
                for alias in child.names:
                    full = base + "." + alias.name
                    if full.startswith(PACKAGE + ".") and full[len(PACKAGE) + 1:] not in dotted:
                        full = base  # a name in one of our modules
                    add(full, child, deferred)
            visit(child, deferred or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    unique = {}
    for i in found:
        unique.setdefault((i.target, i.ours, i.line), i)
    return list(unique.values())


def import_graph(root=ROOT):
    """All imports between the package's own modules, module level and deferred."""
    modules = package_modules(root)
    dotted = dotted_names(root)
    edges = []
    for name, path in modules.items():
        edges += [i for i in imports_of(path, name, modules, dotted)
                  if i.ours and i.target in modules and i.target != name]
    return edges


def all_imports(root=ROOT):
    modules = package_modules(root)
    dotted = dotted_names(root)
    return [i for name, path in modules.items() for i in imports_of(path, name, modules, dotted)]


def circles(edges):
    """Each strongly connected set of two or more modules, as the imports inside it."""
    graph = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted((e for e in edges if e.importer in group
                                     and e.target in group), key=repr))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def explain(problems):
    return "\n".join(repr(p) if isinstance(p, Import) else str(p) for p in problems)


def test_no_circle_among_module_level_imports():
    found = circles([e for e in import_graph() if not e.deferred])
    assert found == [], "import circles:\n" + "\n\n".join(explain(c) for c in found)


def test_no_circle_with_the_deferred_imports_too():
    found = circles(import_graph())
    assert found == [], "import circles:\n" + "\n\n".join(explain(c) for c in found)


def test_every_deferred_import_is_listed():
    deferred = {(e.importer, e.target): e for e in import_graph() if e.deferred}
    unlisted = [e for key, e in sorted(deferred.items()) if key not in DEFERRED]
    assert unlisted == [], "imports inside a function, not in DEFERRED:\n" + explain(unlisted)
    stale = sorted(set(DEFERRED) - set(deferred))
    assert stale == [], "DEFERRED lists imports that are gone: %s" % stale


def test_pure_modules_import_only_pure_modules():
    modules = package_modules()
    assert PURE <= set(modules), sorted(PURE - set(modules))
    bad = []
    for i in all_imports():
        if i.importer not in PURE:
            continue
        if i.ours:
            if i.target not in PURE and (i.importer, i.target) not in PURE_EXCEPTIONS:
                bad.append(i)
        elif i.target.startswith(REACTOR_FACING):
            bad.append(i)
    assert bad == [], "a pure module imports an impure one:\n" + explain(bad)
    used = {(i.importer, i.target) for i in all_imports() if i.ours}
    stale = sorted(set(PURE_EXCEPTIONS) - used)
    assert stale == [], "PURE_EXCEPTIONS lists imports that are gone: %s" % stale


def test_command_line_modules_are_imported_by_no_other_module():
    edges = import_graph()
    bad = [e for e in edges if e.target in COMMAND_LINE
           and (e.importer, e.target) not in HANDOVERS]
    assert bad == [], ("a command-line module is imported (options belong in "
                       "upasmail.options):\n" + explain(bad))
    stale = sorted(set(HANDOVERS) - {(e.importer, e.target) for e in edges})
    assert stale == [], "HANDOVERS lists imports that are gone: %s" % stale


def test_some_modules_have_only_their_listed_importers():
    bad = [e for e in import_graph() if e.importer not in ONLY_FROM.get(e.target, {e.importer})]
    assert bad == [], "imported from outside its ONLY_FROM:\n" + explain(bad)


def test_options_are_imported_only_by_the_command_line():
    bad = [e for e in import_graph() if e.target == OPTIONS
           and e.importer not in OPTIONS_USERS]
    assert bad == [], "upasmail.options imported below the command line:\n" + explain(bad)


def test_twisted_plugins_import_nothing_of_ours_and_name_only_tap_modules():
    folder = os.path.join(ROOT, "twisted", "plugins")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(folder, name)
        bad = [i for i in imports_of(path, name)
               if i.target != "twisted.application.service.ServiceMaker"]
        assert bad == [], "a plugin file imports more than ServiceMaker:\n" + explain(bad)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        named = [(node.args[1].value, node.lineno) for node in ast.walk(tree)
                 if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) == "ServiceMaker"]
        assert named, path
        for module, line in named:
            assert module.startswith(PACKAGE + ".cli.tap_"), "%s:%d: names %s" % (
                os.path.relpath(path, ROOT), line, module)
            assert module[len(PACKAGE) + 1:] in dotted_names(), module


def test_the_checker_sees_a_circle_hidden_in_a_function(tmp_path):
    """The helper itself: a circle through a function-level import, named by file:line."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("thing = 1\n\n\ndef f():\n    from . import a\n")
    edges = import_graph(str(tmp_path))
    assert circles([e for e in edges if not e.deferred]) == []
    [circle] = circles(edges)
    assert repr(circle[1]).endswith("b.py:5: b imports a")
    assert [(e.importer, e.target, e.line, e.deferred) for e in circle] == [
        ("a", "b", 1, False), ("b", "a", 5, True)]


def test_the_folders_are_layers():
    dotted = dotted_names()
    rank = {name: i for i, name in enumerate(LAYERS)}
    up = [e for e in import_graph()
          if rank[layer(e.target, dotted)] < rank[layer(e.importer, dotted)]]
    bad = [e for e in up if (e.importer, e.target) not in UPWARD]
    assert bad == [], "imports up the layers:\n" + explain(bad)
    gone = set(UPWARD) - {(e.importer, e.target) for e in up}
    assert not gone, "UPWARD names imports that are gone: %s" % sorted(gone)


def test_every_subpackage_says_what_it_holds_and_may_import():
    for short, path in package_modules().items():
        if os.path.basename(path) == "__init__.py" and short:
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
            assert doc and "May import" in doc, path
