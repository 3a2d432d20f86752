"""upasmail: Plan 9's upas mail transport (smtpd, smtp) rebuilt on Twisted.

The package is one module per upas concept.  Policy modules (``relay``,
``address``, ``conf``, ``rfc822``, ``pipemsg``) are pure: they take facts and
return verdicts.  ``server`` and ``delivery`` are the Twisted glue, and
``service`` builds a ready ``IService`` for embedding (see
docs/embedding.rst).
"""

__version__ = "0.1.0"
