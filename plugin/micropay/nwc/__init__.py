"""Nostr Wallet Connect (NIP-47): the wallet service the plugin runs for its node
(`service.py`, with its ledger in `repository.py`), and the formats both sides share:
connection URIs (`uri.py`) and requests, responses and error codes (`protocol.py`)."""
