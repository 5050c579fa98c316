"""micropay: Lightning micropayments (L402) for Core Lightning and aiohttp."""
__version__ = "0.2.0"
