"""A DNS server for subprocess tests: ``python dnsserver.py ZONE.json``.

Serves the zone (see ``upasmail.testing.zone_from_json``; the key
``"servfail"`` lists names that get SERVFAIL) on 127.0.0.1, and prints
``port N`` once listening.
"""

import json
import sys

from twisted.internet import reactor

from upasmail import testing


def main(path):
    with open(path) as f:
        data = json.load(f)
    failing = data.pop("servfail", [])
    resolver = testing.FakeResolver(testing.zone_from_json(data), failing=failing)
    port = testing.serveDNS(reactor, resolver)
    print("port %d" % port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
