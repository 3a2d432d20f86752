"""Postfix 3.7 as a private instance that never touches the system's configuration.

Everything lives under the run's directory: its own ``config_directory``
(main.cf and master.cf written here), ``queue_directory`` and
``data_directory``; the system's /etc/postfix is only read for nothing
and never written.  The programs come from the Debian package ``postfix``.
"""

import os
import shutil
import subprocess

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
