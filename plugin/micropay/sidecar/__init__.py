"""The aiohttp sidecar: gate, reverse proxy, discovery, metrics."""
from .app import Runtime, build_app, create_runtime
from .gate import Gate

__all__ = ["Gate", "Runtime", "build_app", "create_runtime"]
