"""Who a request is counted against: the connection's peer, or the entry our own proxies
added to X-Forwarded-For; never what the client wrote."""
import pytest

from micropay.seller.config import ChallengeLimits
from micropay.core.ratelimit import client_address


@pytest.mark.parametrize("xff,hops,expected", [
    ([], 0, "10.0.0.1"),
    (["203.0.113.7"], 0, "10.0.0.1"),                       # not trusted: the peer
    (["203.0.113.7"], 1, "203.0.113.7"),                    # one proxy of ours appended it
    (["6.6.6.6, 203.0.113.7"], 1, "203.0.113.7"),           # the client's own entry is ignored
    (["6.6.6.6", "203.0.113.7"], 1, "203.0.113.7"),         # several headers form one list
    (["6.6.6.6, 203.0.113.7, 10.1.1.1"], 2, "203.0.113.7"),  # two proxies of ours
    (["203.0.113.7"], 2, "203.0.113.7"),                    # shorter than the hops: left-most
    (["2001:db8:1:2::1"], 1, "2001:db8:1:2::/64"),          # IPv6: one /64 is one client
    (["2001:db8:1:2:ffff::9"], 1, "2001:db8:1:2::/64"),
    (["::ffff:198.51.100.1"], 1, "198.51.100.1"),
    (["not-an-address"], 1, "not-an-address"),
])
def test_client_address(xff, hops, expected):
    assert client_address("10.0.0.1", xff, hops) == expected


def test_one_client_never_holds_more_than_a_tenth_of_the_pending_bound():
    assert ChallengeLimits().client_share == 50
    assert ChallengeLimits(max_pending=100, max_pending_per_client=50).client_share == 10
    assert ChallengeLimits(max_pending=4).client_share == 1


def test_the_ipv4_shortcut_groups_every_address_as_ipaddress_does():
    """client_address's dotted-quad shortcut (no parse) must agree with ipaddress on
    every spelling: leading zeros, out-of-range octets, spaces, brackets, mapped v6."""
    import ipaddress
    import random

    from micropay.core.ratelimit import _group

    def by_ipaddress(address: str) -> str:
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)
    rnd = random.Random(20)
    cases = ["1.2.3.4", "01.2.3.4", "256.1.1.1", "0.0.0.0", "255.255.255.255", "1.2.3", "1.2.3.4.5", " 1.2.3.4",
             "[1.2.3.4]", "::ffff:1.2.3.4", "1.2.3.04", "10.0.0.1\n", "\u0661.2.3.4", "2001:db8::1"]
    cases += [".".join(rnd.choice([str(rnd.randint(0, 300)), f"0{rnd.randint(0, 9)}", ""])
                       for _ in range(rnd.choice([3, 4, 5]))) for _ in range(5000)]
    assert [c for c in cases if _group(c) != by_ipaddress(c)] == []
