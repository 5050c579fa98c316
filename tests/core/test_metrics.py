"""The latency histogram as Prometheus reads it: cumulative buckets, `le` inclusive."""
from hypothesis import given
from hypothesis import strategies as st

from micropay.core.metrics import _BUCKETS, Metrics


def buckets(text: str) -> dict[str, int]:
    return {line.split('le="')[1].split('"')[0]: int(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if "_bucket{" in line}


@given(st.lists(st.one_of(st.sampled_from(_BUCKETS), st.floats(0, 5, allow_nan=False)), max_size=50))
def test_each_bucket_counts_the_observations_at_or_below_its_bound(values):
    m = Metrics()
    for v in values:
        m.observe_latency(v)
    counted = buckets(m.render())
    for bound in _BUCKETS:
        assert counted[str(bound)] == sum(1 for v in values if v <= bound), bound
    assert counted["+Inf"] == len(values)
