"""The outbound queue (upas runq): jobs, the runner, returns.

``queue`` (``QueueRunner``: scheduling, locking, calling the client,
writing; the ``Queue`` directory), ``returns`` (failure notices, made
by ``mailroot.bounce``), ``mailq`` (``upas-mailq``'s listing and
deletion).  A job's
type and file format are ``mailroot.job``'s: the server writes them.

May import: ``mailroot``, ``smtp``, ``rules`` and the shared modules.
"""
