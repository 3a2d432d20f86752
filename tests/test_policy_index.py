"""The indexed lookups give the same answers as trying every entry."""

import ipaddress

from hypothesis import given, strategies as st

from upasmail import ratify, relay
from test_ratify import account_pattern, domain, user


@given(st.lists(account_pattern, max_size=8), st.lists(domain, max_size=3), user)
def test_account_patterns_agree_with_trying_each(patterns, doms, u):
    name = "!".join(doms + [u])
    expected = any(ratify.account_match(p, name) for p in patterns)
    assert ratify.AccountPatterns(patterns).match(name) == expected


@given(st.lists(st.one_of(st.ip_addresses(v=4).map(lambda a: (a, 32)),
                          st.tuples(st.ip_addresses(), st.integers(0, 128))),
                max_size=6),
       st.ip_addresses())
def test_netset_agrees_with_ipaddress(entries, ip):
    nets = [ipaddress.ip_network("%s/%d" % (a, min(p, a.max_prefixlen)), strict=False)
            for a, p in entries]
    expected = relay.in_nets(str(ip), nets)  # trying each, mapped IPv4 as IPv4
    assert relay.NetSet(nets).contains(str(ip)) == expected
    assert relay.in_nets(str(ip), relay.NetSet(nets)) == expected


def test_netset_reads_mapped_addresses_and_refuses_garbage():
    nets = relay.NetSet([ipaddress.ip_network("192.0.2.0/24")])
    assert nets.contains("::ffff:192.0.2.9")
    assert not nets.contains("not an address")


def test_a_large_list_is_one_index():
    text = "".join("*block spam%d.example\n*deny *.bulk%d.example!*\nblock 10.%d.%d.0/24\n"
                   % (i, i, i // 250, i % 250) for i in range(3000))
    lists = ratify.parse(text)
    assert lists.account_action("spam2999.example!bob") == "block"
    assert lists.account_action("x.bulk7.example!eve") == "deny"
    assert lists.account_action("good.example!bob") == ratify.ACCEPT
    assert lists.ip_action("10.11.249.3") == "block"
    assert lists.ip_action("10.200.0.1") == ratify.ACCEPT
