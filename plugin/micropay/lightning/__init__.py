"""Lightning backends behind the Node port (see base.py)."""
from .base import DecodedInvoice, Invoice, Node, Payment, Settlement

__all__ = ["DecodedInvoice", "Invoice", "Node", "Payment", "Settlement"]
