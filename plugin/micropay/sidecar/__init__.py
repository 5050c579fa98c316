"""The aiohttp sidecar: gate, reverse proxy, discovery, metrics."""
from .app import Runtime, build_app, create_runtime
from .embed import EmbeddedGate, embed
from .gate import Gate

__all__ = ["EmbeddedGate", "Gate", "Runtime", "build_app", "create_runtime", "embed"]
