"""The Core Lightning plugin: pyln glue (glue.py), its asyncio runtime (runtime.py), its
options (options.py), micropay-fetch (fetch.py), priced invoices (invoices.py) and the
sidecar it supervises (supervisor.py)."""
