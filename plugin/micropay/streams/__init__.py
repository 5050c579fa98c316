"""Streaming payments: the schedule and its accounting (schedule.py), the runner that pays
it through a node (runner.py), TLV records (tlv.py) and the receiving side's attribution
(attribution.py). `micropay.streams` offers every public name of the module it replaced
(the schedule's)."""
from .schedule import (MAX_BACKOFF_S, MAX_CONSECUTIVE_FAILURES, MAX_RECIPIENTS, MIN_PIECE_MSAT, STATES,
                       TLV_PODCAST, InFlight, Recipient, Stream, parse_recipients)

__all__ = ["MAX_BACKOFF_S", "MAX_CONSECUTIVE_FAILURES", "MAX_RECIPIENTS", "MIN_PIECE_MSAT", "STATES",
           "TLV_PODCAST", "InFlight", "Recipient", "Stream", "parse_recipients"]
