"""Browser paywall: a page that sells one catalog item with `content`, shows the invoice
as a QR code and a `lightning:` link, offers the wallet the browser has (WebLN, e.g. the
Alby extension; and Bitcoin Connect, to connect an NWC wallet, when the operator serves
its bundle: `[paywall] bitcoin_connect_file`), and unlocks the content over SSE when
paid: what unlocks it is the purchase's record, never what a wallet says.

No JavaScript framework: one small inline script (fetch + EventSource). The reader is
identified by a random first-party cookie; a reader who already paid for the item gets
the content again. The content endpoint checks the purchase's client token.
"""
from __future__ import annotations

import html
import io
import os
import re
import segno
from aiohttp import web

from ...core.errors import BadRequest, NotFound, NotPaid, RateLimited
from ...core.inputs import load_json, read_bounded
from ...core.ratelimit import TokenBucket
from ..apikeys import Unauthorized
from ..service import Games

COOKIE = "micropay_reader"
READER = re.compile(r"[0-9a-f]{32}")
NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store"}
INVOICES_PER_MINUTE = 20   # per client address
BITCOIN_CONNECT_PATH = "/paywall/_wallets/bitcoin-connect.js"


def qr_svg(bolt11: str) -> str:
    """Invoice as an SVG QR code (upper case: the compact alphanumeric QR mode)."""
    buf = io.BytesIO()
    segno.make(f"lightning:{bolt11}".upper(), error="m").save(
        buf, kind="svg", scale=4, border=2, xmldecl=False, svgns=True, title="Lightning invoice")
    return buf.getvalue().decode("ascii")


def _item(games: Games, request: web.Request):
    item = games.cfg.item(request.match_info["sku"])
    if item is None or item.content is None:
        raise NotFound("no such paywalled item")
    return item


def _reader(request: web.Request) -> str | None:
    value = request.cookies.get(COOKIE, "")
    return value if READER.fullmatch(value) else None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}}
#pay{{border:1px solid #ccc;border-radius:8px;padding:1rem;text-align:center}}
#qr svg{{width:16rem;height:16rem}} .muted{{color:#666;font-size:.9rem}}
#invoice{{word-break:break-all;font-family:monospace;font-size:.75rem}}
[hidden]{{display:none}}
</style></head>
<body data-sku="{sku}">
<h1>{title}</h1>
<p>{description}</p>
<section id="pay">
  <p>Unlock for <strong id="price">{price_sat} sat</strong> ({price_msat} msat)</p>
  <div id="qr" aria-live="polite">Creating invoice…</div>
  <p><button id="webln-pay" type="button" hidden>Pay with the browser's wallet</button>
     <button id="bc-pay" type="button" hidden>Pay with a connected wallet</button></p>
  <p><a id="ln-link" href="#" hidden>Open in a Lightning wallet</a></p>
  <p id="invoice" class="muted"></p>
  <p id="status" class="muted" role="status">Waiting for payment…</p>
</section>
<article id="content" hidden></article>
{wallet_script}<script>
(function () {{
  "use strict";
  var sku = document.body.dataset.sku, base = "/paywall/" + encodeURIComponent(sku);
  var nonce = Array.from(crypto.getRandomValues(new Uint8Array(16)),
                         function (b) {{ return b.toString(16).padStart(2, "0"); }}).join("");
  function $(id) {{ return document.getElementById(id); }}
  function say(text) {{ $("status").textContent = text; }}
  function unlock(p) {{
    fetch(base + "/content?purchase=" + encodeURIComponent(p.id) + "&token=" + encodeURIComponent(p.client_token))
      .then(function (r) {{ if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); }})
      .then(function (html) {{
        $("content").innerHTML = html; $("content").hidden = false; $("pay").hidden = true;
        document.body.dataset.state = "unlocked";
      }})
      .catch(function (e) {{ say("Paid, but the content could not be loaded: " + e.message); }});
  }}
  function paying(promise) {{
    say("Paying…");
    promise.then(function () {{ say("Paid. Waiting for the confirmation…"); }})
           .catch(function (e) {{ say("The wallet did not pay: " + (e && e.message || e)); }});
  }}
  function offerWallets(invoice) {{
    if (window.webln) {{
      $("webln-pay").hidden = false;
      $("webln-pay").onclick = function () {{
        paying(window.webln.enable().then(function () {{ return window.webln.sendPayment(invoice); }}));
      }};
    }}
    var bc = window.bitcoinConnect;
    if (bc) {{
      bc.init({{appName: document.title, filters: ["nwc"], showBalance: false}});
      $("bc-pay").hidden = false;
      $("bc-pay").onclick = function () {{
        paying(bc.requestProvider().then(function (provider) {{ return provider.sendPayment(invoice); }}));
      }};
    }}
  }}
  fetch(base + "/purchase", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                              body: JSON.stringify({{nonce: nonce}}), credentials: "same-origin"}})
    .then(function (r) {{ return r.json().then(function (b) {{ if (!r.ok) throw new Error(b.detail || r.status); return b; }}); }})
    .then(function (p) {{
      document.body.dataset.purchase = p.id;
      if (p.status === "paid") {{ unlock(p); return; }}
      $("qr").innerHTML = p.qr_svg;
      $("ln-link").href = "lightning:" + p.invoice; $("ln-link").hidden = false;
      $("invoice").textContent = p.invoice;
      offerWallets(p.invoice);
      document.body.dataset.state = "awaiting-payment";
      var es = new EventSource("/v1/purchases/" + encodeURIComponent(p.id) + "/events?token=" +
                               encodeURIComponent(p.client_token));
      es.addEventListener("purchase.paid", function () {{ es.close(); say("Paid. Unlocking…"); unlock(p); }});
      es.addEventListener("purchase.expired", function () {{
        es.close(); say("The invoice expired. Reload the page for a new one.");
        document.body.dataset.state = "expired";
      }});
    }})
    .catch(function (e) {{ say("Could not create an invoice: " + e.message); }});
}})();
</script>
</body></html>
"""


async def page(games: Games, request: web.Request) -> web.Response:
    item = _item(games, request)
    bc = games.cfg.bitcoin_connect_file is not None
    text = PAGE.format(title=html.escape(item.title), sku=html.escape(item.sku, quote=True),
                       description=html.escape(item.description), price_msat=item.price_msat,
                       price_sat=f"{item.price_msat / 1000:g}",
                       wallet_script=f'<script src="{BITCOIN_CONNECT_PATH}"></script>\n' if bc else "")
    ancestors = " ".join(games.cfg.frame_ancestors) or "'none'"
    # Bitcoin Connect talks to the reader's NWC relays (wss:) from this page
    scripts, connect = ("'self' 'unsafe-inline'", "connect-src 'self' wss: ws:; ") if bc else ("'unsafe-inline'", "")
    resp = web.Response(text=text, content_type="text/html", charset="utf-8", headers=dict(
        SECURITY_HEADERS, **{"Content-Security-Policy": f"default-src 'self'; script-src {scripts}; {connect}"
                             f"style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors {ancestors}"}))
    if _reader(request) is None:
        # Framed by another site, the reader cookie must be a third-party cookie, which
        # browsers only keep over HTTPS (SameSite=None; Secure).
        cross_site = bool(games.cfg.frame_ancestors) and request.secure
        resp.set_cookie(COOKIE, os.urandom(16).hex(), max_age=365 * 86400, httponly=True,
                        samesite="None" if cross_site else "Lax", secure=cross_site, path="/paywall/")
    return resp


async def purchase(games: Games, request: web.Request) -> web.Response:
    """Start (or find the paid) purchase for this reader. Rate limited per client address."""
    item = _item(games, request)
    if games.paywall_limit is None:
        games.paywall_limit = TokenBucket(INVOICES_PER_MINUTE)
    wait = games.paywall_limit.take(request.remote or "unknown")
    if wait:
        raise RateLimited("too many invoices requested; try again shortly", retry_after_s=int(wait) + 1)
    reader = _reader(request)
    if reader is None:
        raise BadRequest("load the paywall page first (it sets the reader cookie)")
    raw, complete = await read_bounded(request.content, 1024)
    if not complete:
        raise BadRequest("body must be at most 1024 bytes")
    body = load_json(raw)
    nonce = body.get("nonce") if isinstance(body, dict) else None
    if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
        raise BadRequest("nonce must be 8-64 of A-Z a-z 0-9 _ -")
    player = f"web:{reader}"
    paid = await games.purchases.list(player_id=player, sku=item.sku, status="paid", limit=1)
    if paid["purchases"]:
        p = paid["purchases"][0]
    else:
        p, _ = await games.purchases.create({"sku": item.sku, "player_id": player,
                                             "idempotency_key": f"paywall:{reader}:{nonce}"})
    return web.json_response({"id": p["id"], "status": p["status"], "invoice": p["invoice"],
                              "price_msat": p["price_msat"], "expires_at": p["expires_at"],
                              "client_token": games.purchases.client_token(p["id"]),
                              "qr_svg": qr_svg(p["invoice"]) if p["status"] == "pending" else None},
                             headers=SECURITY_HEADERS)


async def content(games: Games, request: web.Request) -> web.Response:
    item = _item(games, request)
    pid, token = request.query.get("purchase", ""), request.query.get("token", "")
    if not pid or not token or not games.purchases.check_client_token(pid, token):
        raise Unauthorized("a paid purchase and its client token are required")
    p = await games.purchases.get(pid)
    if p["sku"] != item.sku or p["status"] != "paid":
        raise NotPaid("this purchase is not paid")
    return web.Response(text=item.content or "", content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


async def bitcoin_connect(games: Games, request: web.Request) -> web.StreamResponse:
    """The Bitcoin Connect bundle the operator configured (`[paywall] bitcoin_connect_file`)."""
    path = games.cfg.bitcoin_connect_file
    if path is None:
        raise NotFound("no Bitcoin Connect bundle is configured ([paywall] bitcoin_connect_file)")
    return web.FileResponse(path, headers={"Content-Type": "text/javascript; charset=utf-8",
                                           "Cache-Control": "public, max-age=3600",
                                           "X-Content-Type-Options": "nosniff"})
