"""The rules every room uses, free of I/O frameworks: the error catalogue, untrusted-input
parsing, JSON-RPC parameters, background tasks, metrics, secret files, per-client limits,
canonical request targets, path patterns and signed receipts."""
