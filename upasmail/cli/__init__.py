"""The command line: twistd's service makers and the console scripts.

``tap_smtpd`` (``twistd upas-smtpd``), ``tap_smtp`` (``upas-smtp``),
``tap_runq`` (``upas-mailq``, ``upas-runq``), ``stdio`` (``upas-smtpd``
on standard input), ``checkconfig``, ``policytool`` (``upas-policy``),
``replay``, and ``options``, what they share.

May import everything else; nothing imports it but another tool handing
over its run (and the worker process's main, for the options).
"""
