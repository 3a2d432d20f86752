"""The balancer's own connections (its health checks: PROXY v2 LOCAL, v1
UNKNOWN) are not counted by --conn-rate: with a balancer that is not in
ournets and a low limit, the checks would be refused and the balancer
would mark every node down (found with examples/cluster)."""

import ipaddress

from test_proxy import BALANCER, CLIENT, named, node, v1, v2  # noqa: F401 (node: a fixture)
from upasmail import grammar, testing
from upasmail.rules import policy, ratify

UNTRUSTED_BALANCER = "ournets 192.0.2.128/25\n"  # neither the balancer nor CLIENT


def test_the_check_exempts_the_balancer_only():
    conf = testing.make_settings(UNTRUSTED_BALANCER, root="/nonexistent", conn_rate=1,
                                 proxy_from=(ipaddress.ip_network("127.0.0.1/32"),))
    looked = policy.Facts(ratify=ratify.EMPTY, granted=False, connection_rate=5)
    assert policy.connection_rate(None, grammar.Command("CONNECT", BALANCER), conf, looked) \
        is policy.ACCEPT
    d = policy.connection_rate(None, grammar.Command("CONNECT", CLIENT), conf, looked)
    assert d.code == 421 and d.detail == "rate"


def test_health_checks_pass_while_clients_are_limited(node):
    n = node(conf_text=UNTRUSTED_BALANCER, conn_rate=1)
    for header in [v2(command=0), b"PROXY UNKNOWN\r\n"] * 3:
        c = n.connect()
        assert c.raw(header)[0].startswith("220 "), header
        c.send("QUIT")
        c.lose()
    first = n.connect()
    assert first.raw(v1())[0].startswith("220 ")
    second = n.connect()
    assert second.raw(v1())[0].startswith("421 4.7.0 ")
    first.lose()
    second.lose()
