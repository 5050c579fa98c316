"""The OpenAPI 3.1 description of the purchases API, served at /openapi.json.
tests/games/test_openapi.py keeps it true: every route is described, every response the
tests see validates against its schema."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ... import __version__
from ..config import EVENT_TYPES
from ..models import PAYOUT_CREATE, PURCHASE_CREATE

if TYPE_CHECKING:
    from ..config import GamesConfig

JSON = "application/json"
PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM: {"schema": _ref("Problem")}}}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


ERRORS = {"400": _problem("Bad input"), "401": _problem("Missing or invalid credentials"),
          "403": _problem("The API key lacks the scope")}
NOT_FOUND = {"404": _problem("No such object")}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
SKU = {"name": "sku", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
LAST_EVENT = [{"name": "Last-Event-ID", "in": "header", "required": False,
               "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
              {"name": "last_event_id", "in": "query", "required": False,
               "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}}]
READER_COOKIE = {"name": "micropay_reader", "in": "cookie", "required": True,
                 "description": "set by the paywall page", "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
TOKEN_Q = {"name": "token", "in": "query", "required": False,
           "description": "the purchase's client token (for EventSource, which cannot set headers)",
           "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
KEY = [{"apiKey": []}]
KEY_OR_CLIENT = [{"apiKey": []}, {"clientToken": []}]
SSE = {"description": "text/event-stream; each event: id, event (type), data (an Event as JSON)",
       "content": {"text/event-stream": {"schema": {"type": "string"}}}}

SCHEMAS: dict[str, Any] = {
    "Problem": {"type": "object", "required": ["status", "error", "detail"], "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "error": {"type": "string", "description": "stable machine code"}, "detail": {"type": "string"},
        "reason": {"type": "string", "description": "finer cause, e.g. purchase_limit_reached"}}},
    "CatalogItem": {"type": "object", "additionalProperties": False,
                    "required": ["sku", "title", "price_msat", "max_per_player", "description", "unlockable"],
                    "properties": {"sku": {"type": "string"}, "title": {"type": "string"},
                                   "price_msat": {"type": "integer", "minimum": 1},
                                   "max_per_player": _nullable("integer", minimum=1),
                                   "description": {"type": "string"}, "unlockable": {"type": "boolean"}}},
    "Catalog": {"type": "object", "required": ["items"],
                "properties": {"items": {"type": "array", "items": _ref("CatalogItem")}}},
    "PurchaseCreate": PURCHASE_CREATE.schema(),
    "Purchase": {"type": "object", "required": [
        "id", "sku", "player_id", "price_msat", "metadata", "status", "invoice", "payment_hash", "created_at",
        "expires_at", "paid_at", "amount_received_msat", "preimage", "receipt"], "properties": {
        "id": {"type": "string"}, "sku": {"type": "string"}, "player_id": {"type": "string"},
        "price_msat": {"type": "integer"}, "metadata": {"type": "object"},
        "status": {"enum": ["pending", "paid", "expired"]},
        "invoice": {"type": "string", "description": "BOLT11"},
        "payment_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "created_at": {"type": "integer"}, "expires_at": {"type": "integer"},
        "paid_at": _nullable("integer"), "amount_received_msat": _nullable("integer"),
        "preimage": _nullable("string"),
        "receipt": _nullable("string", description="signed receipt, see docs/games.md"),
        "client_token": {"type": "string", "description": "gives a player's client read access to "
                         "this purchase only; returned on creation"}}},
    "PurchaseList": {"type": "object", "required": ["purchases", "next_cursor"], "properties": {
        "purchases": {"type": "array", "items": _ref("Purchase")}, "next_cursor": _nullable("string")}},
    "PayoutCreate": PAYOUT_CREATE.schema(),
    "Payout": {"type": "object", "required": [
        "id", "idempotency_key", "player_id", "destination", "amount_msat", "fee_msat", "status", "error",
        "payment_hash", "preimage", "day", "created_at", "updated_at"], "properties": {
        "id": {"type": "string"}, "idempotency_key": {"type": "string"}, "player_id": {"type": "string"},
        "destination": {"type": "string"}, "amount_msat": {"type": "integer"}, "fee_msat": _nullable("integer"),
        "status": {"enum": ["sending", "paid", "failed"]}, "error": _nullable("string"),
        "payment_hash": _nullable("string"), "preimage": _nullable("string"),
        "day": {"type": "string", "description": "UTC day the payout counts against"},
        "created_at": {"type": "integer"}, "updated_at": {"type": "integer"}}},
    "Event": {"type": "object", "required": ["id", "type", "created_at", "data"], "properties": {
        "id": {"type": "integer"}, "type": {"enum": list(EVENT_TYPES)}, "created_at": {"type": "integer"},
        "data": {"type": "object", "description": "{purchase: Purchase}, {payout: Payout} or {tip: Tip}"}}},
    "TipShare": {"type": "object", "required": [
        "index", "destination", "name", "amount_msat", "status", "fee_msat", "attempts", "error", "payment_hash",
        "updated_at"], "properties": {
        "index": {"type": "integer"}, "destination": {"type": "string"}, "name": {"type": "string"},
        "amount_msat": {"type": "integer", "minimum": 0},
        "status": {"enum": ["pending", "sending", "paid", "failed", "skipped"]},
        "fee_msat": _nullable("integer"), "attempts": {"type": "integer"}, "error": _nullable("string"),
        "payment_hash": _nullable("string"), "updated_at": {"type": "integer"}}},
    "Tip": {"type": "object", "required": [
        "id", "address", "amount_msat", "received_msat", "comment", "status", "payment_hash", "bolt11",
        "created_at", "expires_at", "paid_at", "zap"], "properties": {
        "id": {"type": "string"}, "address": {"type": "string", "description": "the name before @"},
        "amount_msat": {"type": "integer"}, "received_msat": _nullable("integer"),
        "comment": {"type": "string"}, "status": {"enum": ["pending", "paid", "expired"]},
        "payment_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "bolt11": {"type": "string"},
        "created_at": {"type": "integer"}, "expires_at": {"type": "integer"}, "paid_at": _nullable("integer"),
        "zap": {"type": ["object", "null"], "description": "{sender, content, event, request_id} for a zap"},
        "shares": {"type": "array", "items": _ref("TipShare")}}},
    "TipList": {"type": "object", "required": ["tips", "next_cursor"], "properties": {
        "tips": {"type": "array", "items": _ref("Tip")}, "next_cursor": _nullable("string")}},
    "PaywallPurchase": {"type": "object", "required": [
        "id", "status", "invoice", "price_msat", "expires_at", "client_token", "qr_svg"], "properties": {
        "id": {"type": "string"}, "status": {"enum": ["pending", "paid", "expired"]},
        "invoice": {"type": "string"}, "price_msat": {"type": "integer"}, "expires_at": {"type": "integer"},
        "client_token": {"type": "string"}, "qr_svg": _nullable("string")}},
}


def document(cfg: "GamesConfig | None" = None) -> dict[str, Any]:
    """The API description; with a config, SKU fields list the catalog's SKUs."""
    schemas = json.loads(json.dumps(SCHEMAS))
    sku_param = dict(SKU)
    if cfg is not None and cfg.catalog:
        schemas["PurchaseCreate"]["properties"]["sku"] = {"enum": [it.sku for it in cfg.catalog]}
        paywalled = [it.sku for it in cfg.catalog if it.content is not None]
        sku_param = dict(SKU, schema={"enum": paywalled} if paywalled else SKU["schema"])
    paths = _paths(sku_param)
    if cfg is not None and cfg.tips:
        paths.update(TIP_PATHS)
    return {
        "openapi": "3.1.0",
        "info": {"title": "micropay purchases API", "version": __version__,
                 "description": "In-app purchases paid over Lightning: catalog, purchases, live events, "
                                "payouts, and a browser paywall. Amounts are integer millisatoshis."},
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "mpk_... (micropay apikey create)"},
            "clientToken": {"type": "http", "scheme": "bearer",
                            "description": "mpc_... from the purchase's creation; reads that purchase only"}}},
        "paths": paths,
    }


TIP_PATHS: dict[str, Any] = {
    "/v1/tips": {"get": {
        "summary": "Tips received at this server's Lightning Addresses, newest first, with their shares",
        "security": KEY, "parameters": [
            {"name": "address", "in": "query", "schema": {"type": "string", "pattern": "^[a-z0-9._+-]{0,64}$"}},
            {"name": "status", "in": "query", "schema": {"enum": ["pending", "paid", "expired"]}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "cursor", "in": "query", "description": "next_cursor of the previous page",
             "schema": {"type": "string", "maxLength": 100}}],
        "responses": {"200": _ok("TipList", "A page"), **ERRORS}}},
    "/v1/tips/{id}": {"get": {"summary": "One tip", "security": KEY, "parameters": [ID],
                              "responses": {"200": _ok("Tip", "The tip"), **ERRORS, **NOT_FOUND}}},
}


def _paths(sku_param: dict[str, Any]) -> dict[str, Any]:
    return {
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1",
                                                        "content": {JSON: {"schema": {"type": "object"}}}}}}},
        "/v1/catalog": {"get": {"summary": "Items for sale", "security": [],
                                "responses": {"200": _ok("Catalog", "The catalog")}}},
        "/v1/purchases": {
            "post": {"summary": "Create a purchase (idempotent by idempotency_key)", "security": KEY,
                     "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PurchaseCreate")}}},
                     "responses": {"201": _ok("Purchase", "Created"),
                                   "200": _ok("Purchase", "Same idempotency key: the existing purchase"),
                                   "409": _problem("Idempotency key reused differently, or player limit"),
                                   **ERRORS}},
            "get": {"summary": "List purchases, oldest first", "security": KEY, "parameters": [
                {"name": "player_id", "in": "query", "schema": {"type": "string",
                                                                "pattern": "^[A-Za-z0-9._:@-]{0,128}$"}},
                {"name": "sku", "in": "query", "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{0,64}$"}},
                {"name": "status", "in": "query", "schema": {"enum": ["pending", "paid", "expired"]}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "cursor", "in": "query", "description": "next_cursor of the previous page",
                 "schema": {"type": "string", "pattern": "^([0-9]{1,12}~[A-Za-z0-9_]{0,64})?$"}}],
                "responses": {"200": _ok("PurchaseList", "A page"), **ERRORS}}},
        "/v1/purchases/{id}": {"get": {
            "summary": "One purchase", "security": KEY_OR_CLIENT, "parameters": [ID, TOKEN_Q],
            "responses": {"200": _ok("Purchase", "The purchase"), **ERRORS, **NOT_FOUND}}},
        "/v1/purchases/{id}/events": {"get": {
            "summary": "Server-Sent Events of one purchase (whole history, then live)",
            "security": KEY_OR_CLIENT, "parameters": [ID, TOKEN_Q, *LAST_EVENT],
            "responses": {"200": SSE, **ERRORS, **NOT_FOUND}}},
        "/v1/events": {"get": {
            "summary": "Server-Sent Events of the whole app (from now, or after Last-Event-ID)",
            "security": KEY, "parameters": LAST_EVENT, "responses": {"200": SSE, **ERRORS}}},
        "/v1/ws": {"get": {
            "summary": "WebSocket: the same events as JSON text messages",
            "security": KEY_OR_CLIENT, "parameters": [
                {"name": "purchase_id", "in": "query", "schema": {"type": "string", "maxLength": 64}},
                TOKEN_Q, LAST_EVENT[1]],
            "responses": {"101": {"description": "Switching protocols"}, **ERRORS, **NOT_FOUND}}},
        "/v1/payouts": {"post": {
            "summary": "Pay a player (capped per player and per day, idempotent)", "security": KEY,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PayoutCreate")}}},
            "responses": {"201": _ok("Payout", "Sent (status paid or failed)"),
                          "200": _ok("Payout", "Same idempotency key: the existing payout"),
                          "409": _problem("A cap would be exceeded, or the key was reused differently"),
                          "502": _problem("The node could not be reached; the payout stays 'sending'"),
                          **ERRORS}}},
        "/v1/payouts/{id}": {"get": {"summary": "One payout", "security": KEY, "parameters": [ID],
                                     "responses": {"200": _ok("Payout", "The payout"), **ERRORS,
                                                   **NOT_FOUND}}},
        "/paywall/{sku}": {"get": {"summary": "Paywall page (HTML)", "security": [], "parameters": [sku_param],
                                   "responses": {"200": {"description": "HTML page",
                                                         "content": {"text/html": {"schema": {"type": "string"}}}},
                                                 **NOT_FOUND}}},
        "/paywall/{sku}/purchase": {"post": {
            "summary": "The page's purchase (needs the reader cookie the page sets)", "security": [],
            "parameters": [sku_param, READER_COOKIE], "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["nonce"],
                "properties": {"nonce": {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$"}}}}}},
            "responses": {"200": _ok("PaywallPurchase", "Pending or already paid"), "400": ERRORS["400"],
                          "429": _problem("Too many invoices from this address"), **NOT_FOUND}}},
        "/paywall/{sku}/content": {"get": {
            "summary": "The unlocked content (HTML fragment)", "security": [], "parameters": [
                sku_param, {"name": "purchase", "in": "query", "required": True, "schema": {"type": "string"}},
                {"name": "token", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "HTML fragment",
                                  "content": {"text/html": {"schema": {"type": "string"}}}},
                          "401": ERRORS["401"], "402": _problem("Not paid"), **NOT_FOUND}}},
        "/paywall/_wallets/bitcoin-connect.js": {"get": {
            "summary": "The Bitcoin Connect bundle the paywall loads ([paywall] bitcoin_connect_file)",
            "security": [], "responses": {
                "200": {"description": "JavaScript", "content": {"text/javascript": {"schema": {"type": "string"}}}},
                **NOT_FOUND}}},
    }
