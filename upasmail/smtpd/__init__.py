"""The server side of a connection: the protocol and what it stands on.

``server`` (``UpasESMTP``), its ``factory``, ``authcommands`` (the AUTH
command), ``notes`` (the log lines decisions call for), ``framing`` (the
client's bytes, sans I/O), ``delivery`` (the hand-off to the back end),
``listening`` (the port as a service, the ``-k`` drop), ``tls``,
``trace``, ``spam`` and ``validators`` (the facts the policy asks for),
``statestore`` (what connections share, across processes).

May import: ``policy``, ``store``, and the shared modules at the top of
the package; never the command line.
"""
