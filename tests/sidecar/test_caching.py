"""Cache-Control on paid responses (micropay/http/caching.py): `private` whatever the
handler or upstream said, its other directives kept."""
import pytest
from multidict import CIMultiDict

from micropay.http.caching import make_private


@pytest.mark.parametrize("given, want", [
    (None, "private"),
    ("private", "private"),
    ("no-store", "private, no-store"),
    ("private, no-store", "private, no-store"),
    ("public, max-age=60", "private, max-age=60"),
    ("max-age=60, PUBLIC", "private, max-age=60"),
    ('private="Set-Cookie", max-age=5', "private, max-age=5"),    # a qualified private lets shared caches keep it
    ("s-maxage=30", "private, s-maxage=30"),
])
def test_paid_responses_become_private(given, want):
    for headers in (CIMultiDict(), {}):
        if given is not None:
            headers["Cache-Control"] = given
        make_private(headers)
        assert headers["Cache-Control"] == want


def test_several_cache_control_fields_become_one():
    headers = CIMultiDict([("Cache-Control", "public"), ("cache-control", "max-age=9")])
    make_private(headers)
    assert headers.getall("Cache-Control") == ["private, max-age=9"]
