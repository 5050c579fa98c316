"""micropay: Lightning micropayments (L402) for Core Lightning and aiohttp."""
__version__ = "0.1.0"
