"""The smtp client's passwords: what factotum gives upas smtp.

upas asks factotum for ``proto=pass service=smtp server=<host> user=<user>``.
Here the answer comes from a file of lines ``server user password`` (the
password is the rest of the line; ``#`` comments) that must not be
readable by others, or else from ``~/.netrc`` (``machine <server> login
<user> password <password>``).  The server is the host part of the
destination given on the command line; the user is ``-u``.  Without
``-u``, the netrc entry for the server names the user (as curl and msmtp
do), and the file's line must be for the login name; with ``-u``, both
must be for that user.
"""

import getpass
import netrc
import os
import stat


class NoCredentials(Exception):
    """No password for this server and user (a permanent failure, as upas)."""


def _from_file(path, server, user):
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
        raise NoCredentials("%s is readable by others; chmod 600 it" % path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            words = line.split(None, 2)
            if len(words) == 3 and words[0].lower() == server.lower() and words[1] == user:
                return words[2]
    return None


def lookup(server, user=None, path=None, netrc_path=None):
    """(user, password) for ``server``; NoCredentials when there is none.

    ``user`` None: no ``-u`` was given (see the module docstring).
    """
    login = user or getpass.getuser()
    if not login:
        raise NoCredentials("cannot find user name")
    try:
        if path:
            password = _from_file(path, server, login)
            if password is not None:
                return login, password
        netrc_path = netrc_path or os.path.expanduser("~/.netrc")
        if os.path.exists(netrc_path):
            entry = netrc.netrc(netrc_path).authenticators(server)
            if entry and entry[2] is not None:
                name = entry[0] or login  # an entry without ``login``: ours
                if user is None or name == user:
                    return name, entry[2]
    except (OSError, netrc.NetrcParseError) as e:
        raise NoCredentials("failed to get userpasswd: %s" % e) from None
    raise NoCredentials("failed to get userpasswd: no password for %s at %s" % (login, server))
