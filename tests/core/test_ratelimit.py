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
