"""Streaming payments: the schedule and its accounting (schedule.py), the runner that pays
it through a node (runner.py), TLV records (tlv.py) and the receiving side's attribution
(attribution.py). `micropay.streams` keeps offering the schedule's names, as the module it
replaced did."""
from .schedule import STATES, TLV_PODCAST, Recipient, Stream, parse_recipients

__all__ = ["STATES", "TLV_PODCAST", "Recipient", "Stream", "parse_recipients"]
