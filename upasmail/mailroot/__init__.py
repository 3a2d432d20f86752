"""The mail root (upas's /mail): mailboxes, the spool, the writer.

``store`` (``MailRoot``: routing a message to mailboxes and the queue),
``job`` (a queued job as a type: the one definition of the queue's
versioned file format, written here, read by ``runq``), ``bounce`` (an
RFC 3464 notice), ``groupcommit``
(many writes, one fsync), ``mbox`` (the file and its lock), ``local``
(users and aliases), ``pipemsg`` (upas's stream), ``mailer`` and
``process`` (``-m``), ``crashpoint`` (a test hook).

May import: ``rules`` and the shared modules.
"""
