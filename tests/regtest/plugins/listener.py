#!/usr/bin/env python3
"""Test helper plugin: subscribes to micropay's custom notifications and logs them,
as any other plugin on the node could."""
import json

from pyln.client import Plugin

plugin = Plugin()


def _log(topic):
    def handler(plugin, **params):
        payload = params.get(topic) or params.get("payload") or {}
        plugin.log(f"listener got {topic}: {json.dumps(payload, sort_keys=True)}")
    return handler


for _topic in ("micropay_invoice_paid", "streampay_payment", "streampay_state"):
    plugin.add_subscription(_topic, _log(_topic))

plugin.run()
