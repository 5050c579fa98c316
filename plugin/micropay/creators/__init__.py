"""Receiving tips: Lightning Addresses (LNURL-pay), zaps (NIP-57), and tips split among
collaborators."""
