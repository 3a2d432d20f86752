"""upasmail: Plan 9's upas mail transport (smtpd, smtp) rebuilt on Twisted.

The package's folders are its architecture (docs/architecture.rst):

``cli/``       the command line: twistd's service makers, the console scripts
``smtpd/``     the server side of a connection: protocol, factory, framing, hand-off
``rules/``     the upas rules: the policy as pure tables and checks
``mailroot/``  the mail root: mailboxes, the spool, group commit, the mailer
``runq/``      the outbound queue: jobs, the runner, returns, upas-mailq
``smtp/``      upas smtp: one delivery, its conversation, dialling, conversion

and at the top the shared modules (``address``, ``grammar``, ``conf``,
``settings``, ``session``, ``decision``, ``replies``, ``interfaces``,
``relay``, ``rfc822``, ``logs``, ``logformat``), the wiring (``service``: ``makeSmtpdService``
for embedding, docs/embedding.rst; ``workers``, ``metrics``,
``privileges``, ``passwd``) and the test doubles (``testing``).  Imports
go one way, from ``cli`` down to the pure modules
(tests/test_import_graph.py).

The modules used to sit in one folder.  Their old names still import
(``upasmail.server`` is ``upasmail.smtpd.server``, ``upasmail.store``
is ``upasmail.mailroot.store``: the same module objects): ``MOVED``
lists them, and an import finder here resolves them.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

# old flat module name -> where it lives now
MOVED = {
    'auth': 'upasmail.rules.auth',
    'authcommands': 'upasmail.smtpd.authcommands',
    'bounce': 'upasmail.mailroot.bounce',
    'checkconfig': 'upasmail.cli.checkconfig',
    'client': 'upasmail.smtp.client',
    'clientresult': 'upasmail.smtp.clientresult',
    'conversation': 'upasmail.smtp.conversation',
    'convert': 'upasmail.smtp.convert',
    'crashpoint': 'upasmail.mailroot.crashpoint',
    'decisionlog': 'upasmail.rules.decisionlog',
    'delivery': 'upasmail.smtpd.delivery',
    'dnscheck': 'upasmail.rules.dnscheck',
    'factory': 'upasmail.smtpd.factory',
    'factotum': 'upasmail.smtp.factotum',
    'framing': 'upasmail.smtpd.framing',
    'greylist': 'upasmail.rules.greylist',
    'groupcommit': 'upasmail.mailroot.groupcommit',
    'helo': 'upasmail.rules.helo',
    'job': 'upasmail.mailroot.job',
    'listening': 'upasmail.smtpd.listening',
    'local': 'upasmail.mailroot.local',
    'mailer': 'upasmail.mailroot.mailer',
    'mailq': 'upasmail.runq.mailq',
    'mbox': 'upasmail.mailroot.mbox',
    'mxdial': 'upasmail.smtp.mxdial',
    'notes': 'upasmail.smtpd.notes',
    'options': 'upasmail.cli.options',
    'pipemsg': 'upasmail.mailroot.pipemsg',
    'policy': 'upasmail.rules.policy',
    'policytool': 'upasmail.cli.policytool',
    'process': 'upasmail.mailroot.process',
    'queue': 'upasmail.runq.queue',
    'ratify': 'upasmail.rules.ratify',
    'replay': 'upasmail.cli.replay',
    'returns': 'upasmail.runq.returns',
    'server': 'upasmail.smtpd.server',
    'simulate': 'upasmail.rules.simulate',
    'spam': 'upasmail.smtpd.spam',
    'statestore': 'upasmail.smtpd.statestore',
    'stdio': 'upasmail.cli.stdio',
    'store': 'upasmail.mailroot.store',
    'tap_runq': 'upasmail.cli.tap_runq',
    'tap_smtp': 'upasmail.cli.tap_smtp',
    'tap_smtpd': 'upasmail.cli.tap_smtpd',
    'tarpit': 'upasmail.rules.tarpit',
    'thumbprint': 'upasmail.smtp.thumbprint',
    'tls': 'upasmail.smtpd.tls',
    'trace': 'upasmail.smtpd.trace',
    'validators': 'upasmail.smtpd.validators',
    'wire': 'upasmail.smtp.wire',
}


class _MovedModule(importlib.abc.Loader):
    """Loads an old name as the module that lives at the new one."""

    def __init__(self, new):
        self.new = new
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # the import system sets the old name's: put it back
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec

    def get_code(self, name):  # python -m upasmail.<old name>
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)


class _MovedSpec(importlib.machinery.ModuleSpec):
    """An old name's spec, whose package is the new place's: what
    ``python -m`` runs under the old name imports relative to where the
    code lives."""

    def __init__(self, name, new):
        real = importlib.util.find_spec(new)
        importlib.machinery.ModuleSpec.__init__(self, name, _MovedModule(new),
                                                origin=real.origin)
        self.has_location = real.has_location  # python -m sets __file__ from it
        self._package = new.rpartition(".")[0]

    @property
    def parent(self):
        return self._package


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MOVED:
            return None
        return _MovedSpec(fullname, MOVED[name])


sys.meta_path.append(_MovedFinder())
