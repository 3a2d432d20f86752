"""Postfix 3.7 as a private instance that never touches the system's configuration.

Everything lives under the run's directory: its own ``config_directory``
(main.cf and master.cf written here), ``queue_directory`` and
``data_directory``; the system's /etc/postfix is only read for nothing
and never written.  The programs come from the Debian package ``postfix``.
"""

import os
import re
import shutil
import socket
import subprocess

from . import verify
from .servers import LOCAL_DOMAIN, USERS, Child, Server, free_port, wait_until

PROGRAMS = ["postfix", "postconf", "smtp-source"]
SBIN = ["/usr/sbin", "/usr/lib/postfix/sbin"]


def find(program):
    return shutil.which(program) or next(
        (os.path.join(d, program) for d in SBIN if os.path.exists(os.path.join(d, program))),
        None)


def missing_programs():
    return [p for p in PROGRAMS if find(p) is None]


def install():
    """``apt-get install -y postfix`` without questions: debconf is told "No
    configuration", so the package writes no main.cf of its own choosing."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type "
                   b"select No configuration\n", check=False, env=env, timeout=120)
    subprocess.run(["apt-get", "install", "-y", "postfix"], check=False, env=env,
                   timeout=1200)


MAIN_CF = """\
# bench/postfix.py: a private instance; nothing here is the system's
compatibility_level = 3.6
queue_directory = {work}/spool
data_directory = {work}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.{domain}
mydomain = {domain}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# the relay scenario's sender: as upasmail's trusted variant
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# local mailboxes it can count: mbox files, delivered by virtual(8)
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {work}/mail
virtual_mailbox_maps = texthash:{work}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_mailbox_lock = fcntl
alias_maps =
alias_database =
local_recipient_maps =
# one address is every client here (as upasmail's --max-connections-per-peer)
smtpd_client_connection_count_limit = 0
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
maillog_file = {work}/maillog
maillog_file_prefixes = {work}
{extra}
"""

# chroot off everywhere (no jail to populate); smtpd may have a process per
# idle connection of the idle scenario
MASTER_CF = """\
127.0.0.1:{port} inet n - n - {smtpd_max} smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix(Server):
    """``master -d`` in the foreground, in its own process group, on a private
    config_directory (``-c``); queue, data and mailboxes under the run's directory."""

    name = "postfix"

    def __init__(self, work, relayhost=None, smtpd_max=1100):
        Server.__init__(self, work)
        import pwd
        nobody = pwd.getpwnam("nobody")
        etc = os.path.join(self.work, "etc")
        self.mail = os.path.join(self.work, "mail")
        self.spool = os.path.join(self.work, "spool")
        for d in (etc, self.mail, self.spool, os.path.join(self.work, "data")):
            os.makedirs(d)
        shutil.chown(os.path.join(self.work, "data"), "postfix")
        for user in USERS:
            os.makedirs(os.path.join(self.mail, user))
        for d in [self.mail] + [os.path.join(self.mail, u) for u in USERS]:
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        # postfix and nobody must reach the run's directories (mkdtemp makes them 0700):
        # the bench's own three levels, never anything above
        d = self.work
        for _ in range(3):
            os.chmod(d, os.stat(d).st_mode | 0o055)
            d = os.path.dirname(d)
        self.port = free_port()
        extra = "relayhost = [127.0.0.1]:%d" % relayhost if relayhost else ""
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(work=self.work, domain=LOCAL_DOMAIN, uid=nobody.pw_uid,
                                   gid=nobody.pw_gid, extra=extra))
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=self.port, smtpd_max=smtpd_max))
        with open(os.path.join(etc, "vmailbox"), "w") as f:
            f.writelines("%s@%s %s/mbox\n" % (u, LOCAL_DOMAIN, u) for u in USERS)
        # 'postfix check' makes the queue directories with their owners and modes
        check = subprocess.run([find("postfix"), "-c", etc, "check"], capture_output=True,
                               text=True, timeout=120)
        if check.returncode != 0:
            raise RuntimeError("postfix -c %s check failed: %s %s" % (
                etc, check.stderr, self._maillog()[-2000:]))
        self.child = Child([os.path.join(daemon_directory(), "master"), "-c", etc, "-d"],
                           os.path.join(self.work, "master.log"))
        wait_until(lambda: self._listening() or self._died(), 60, "postfix to listen")
        if self.child.proc.poll() is not None:
            raise RuntimeError("postfix master exited:\n%s\n%s" % (
                self.child.output(), self._maillog()[-2000:]))

    def _maillog(self):
        try:
            with open(os.path.join(self.work, "maillog")) as f:
                return f.read()
        except OSError:
            return ""

    problem_pattern = re.compile(r"(fatal|panic|error|warning): ")

    def log_text(self):
        return self._maillog()

    def _died(self):
        return self.child.proc.poll() is not None

    def _listening(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5):
                return True
        except OSError:
            return False

    def backlog(self):
        n = 0
        for q in QUEUES:
            for _, _, files in os.walk(os.path.join(self.spool, q)):
                n += len(files)
        return n

    def settle(self, timeout):
        """Postfix says 250 once the message is in its queue: wait until the
        queue is empty (delivered or deferred elsewhere) before checking."""
        wait_until(lambda: self.backlog() == 0, timeout, "the Postfix queue to empty",
                   interval=0.1)

    def mboxes(self):
        return verify.mbox_files(self.mail)

    def messages(self):
        return verify.mbox_messages(self.mboxes())

    def stored_count(self):
        return verify.count_mbox(self.mboxes())


def daemon_directory():
    out = subprocess.run([find("postconf"), "-h", "-d", "daemon_directory"],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    return out or "/usr/lib/postfix/sbin"
