"""The upas rules: the policy as pure tables and checks.

``policy`` (one table of named checks per phase, how a run is driven and
applied), ``ratify`` (the blocked lists, account patterns, grants),
``greylist``, ``tarpit``, ``helo`` (lie checks), ``dnscheck`` (DNS
facts), ``auth`` (mechanisms, the exchange, the failure throttle),
``simulate`` (a session without sockets) and ``decisionlog``.

Pure: facts in, ``decision`` out.  May import only pure modules (the
shared ones at the top of the package, and ``smtpd.statestore``'s key).
"""
