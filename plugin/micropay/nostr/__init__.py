"""Nostr as far as micropay needs it: signed events (NIP-01), the payload encryptions
NWC uses (NIP-44 v2, and NIP-04 where a client asks for it), and a relay connection.

`keys`, `event`, `nip44` and `nip04` are pure: formats and rules over coincurve and
`cryptography`, no I/O. `relay` speaks the relay protocol over aiohttp websockets.
"""
