"""Counters and a latency histogram, rendered in the Prometheus text format (0.0.4)."""
from __future__ import annotations

import bisect
from collections import Counter
from typing import Iterable

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def gauge_lines(name: str, help_: str, samples: Iterable[tuple[dict[str, str], float | int]]) -> list[str]:
    """One gauge in the text format: `samples` are (labels, value)."""
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        inner = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{inner}}} {value}" if inner else f"{name} {value}")
    return lines


class Metrics:
    def __init__(self) -> None:
        self.challenges: Counter[str] = Counter()        # by route
        self.paid_requests: Counter[str] = Counter()     # by route
        self.rejections: Counter[str] = Counter()        # by reason code
        self.free_requests: Counter[str] = Counter()
        self.settlements = 0
        self.revenue_msat = 0
        self._bucket_counts = [0] * len(_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe_latency(self, seconds: float) -> None:
        self._latency_sum += seconds
        self._latency_count += 1
        i = bisect.bisect_left(_BUCKETS, seconds)       # the first bucket whose bound is >= seconds
        if i < len(_BUCKETS):
            self._bucket_counts[i] += 1

    def record_settlement(self, amount_msat: int) -> None:
        self.settlements += 1
        self.revenue_msat += amount_msat

    def render(self) -> str:
        lines: list[str] = []

        def counter(name: str, help_: str, values: Iterable[tuple[str, int]] | int,
                    label: str = "route") -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} counter")
            if isinstance(values, int):
                lines.append(f"{name} {values}")
                return
            for key, n in sorted(values):
                lines.append(f'{name}{{{label}="{_esc(key)}"}} {n}')

        counter("micropay_challenges_total", "402 challenges with a new invoice.", self.challenges.items())
        counter("micropay_paid_requests_total", "Requests admitted with a valid paid token.",
                self.paid_requests.items())
        counter("micropay_free_requests_total", "Requests admitted by a free tier.", self.free_requests.items())
        counter("micropay_rejections_total", "Requests refused, by reason.", self.rejections.items(), "reason")
        counter("micropay_settlements_total", "Invoices settled.", self.settlements)
        counter("micropay_revenue_msat_total", "Millisatoshis received for settled invoices.", self.revenue_msat)
        name = "micropay_gate_latency_seconds"
        lines.append(f"# HELP {name} Time spent in the payment gate for priced routes (excludes upstream).")
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, n in zip(_BUCKETS, self._bucket_counts):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self._latency_count}')
        lines.append(f"{name}_sum {self._latency_sum:.6f}")
        lines.append(f"{name}_count {self._latency_count}")
        return "\n".join(lines) + "\n"
