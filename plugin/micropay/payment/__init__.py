"""The "Payment" dialect (draft-httpauth-payment, "MPP"): the scheme's wire format and
checks for the charge and session intents (scheme.py), and the session ledger (sessions.py)."""
