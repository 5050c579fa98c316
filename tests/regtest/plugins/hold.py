#!/usr/bin/env python3
"""Test helper plugin: holds every incoming HTLC of exactly HOLD_MSAT (or the amount the
`hold-msat` option names) for HOLD_S seconds before letting it continue, so a payment
to this node can be kept in flight."""
import threading

from pyln.client import Plugin

HOLD_MSAT, HOLD_S = 777_777, 10.0
plugin = Plugin()
plugin.add_option("hold-msat", str(HOLD_MSAT), "hold incoming HTLCs of exactly this amount (msat)")


@plugin.async_hook("htlc_accepted")
def on_htlc(onion, htlc, request, plugin, **kwargs):
    amount = htlc.get("amount_msat", 0)
    amount = int(str(amount).removesuffix("msat"))
    if amount != int(plugin.get_option("hold-msat")):
        request.set_result({"result": "continue"})
        return
    plugin.log(f"holding an HTLC of {amount} msat for {HOLD_S}s")
    threading.Timer(HOLD_S, request.set_result, args=({"result": "continue"},)).start()


plugin.run()
