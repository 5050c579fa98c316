"""Route -> price rules, and the optional Python hook for dynamic prices.

A rule matches a method and a path pattern (core/patterns.py). What one payment buys:
    credits = N     N requests (default 1: plain pay-per-request), debited in the store
    pass_s  = S     any number of requests for S seconds, verified statelessly
    session         a deposit of `deposit_units` units, spent per request or per event
                    of a streamed response, topped up, the rest refunded at close
                    (the Payment scheme's session intent; price_msat is one unit)
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from ..core.errors import ConfigError
from ..core.inputs import is_http_url
from ..core.params import MAX_MSAT
from ..core.canonical import query_digest
from ..core.patterns import compile_path, method_allowed, path_matches

@dataclass(frozen=True)
class SessionPolicy:
    """A session route's terms (config: `session = true` or a `[routes.session]` table)."""

    deposit_units: int = 20          # the draft's recommended deposit: 20 units
    idle_timeout_s: int = 300        # the draft's recommended idle timeout: 5 minutes
    hold_s: int = 60                 # a stream held for a top-up waits this long (the draft's 60 s)
    unit_type: str = "request"       # a label for clients: "chunk", "token", ...
    # The routing fee the operator pays at most per refund (on top of it): the larger of
    # these two, since fees grow with the amount and top-ups grow the refund.
    refund_max_fee_msat: int = 5000
    refund_max_fee_ppm: int = 10_000   # of the refund: 1%

    def refund_fee_cap(self, refund_msat: int) -> int:
        return max(self.refund_max_fee_msat, refund_msat * self.refund_max_fee_ppm // 1_000_000)


PriceHook = Callable[[Any, "RouteRule"], Union[int, Awaitable[int]]]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SCHEMES = frozenset({"l402", "payment"})   # L402 (bLIP-26) and the "Payment" scheme (MPP charge)


@dataclass(frozen=True)
class RouteRule:
    path: str
    price_msat: int
    methods: frozenset[str] | None = None   # None: any method
    credits: int | None = 1
    pass_s: int | None = None
    upstream: str | None = None
    capabilities: frozenset[str] = frozenset()
    free_per_hour: int = 0
    stream_msat: int | None = None           # price per request when paid by an incoming stream
    description: str = ""
    price_hook: PriceHook | None = field(default=None, compare=False)
    schemes: frozenset[str] = SCHEMES          # the 402 dialects offered: "l402", "payment"
    session: SessionPolicy | None = None       # a Payment session route (price_msat per unit)

    @functools.cached_property
    def key(self) -> str:
        """Stable name of the rule, used for challenge reuse and metrics labels (computed
        once: the session bearer path reads it on every request)."""
        return f"{','.join(sorted(self.methods)) if self.methods else '*'} {self.path}"

    def matches(self, method: str, path: str) -> bool:
        return method_allowed(self.methods, method) and path_matches(self.path, path)

    def caveats(self, service: str, now: int, query: str | None = None) -> list[str]:
        """The caveats of a token for this route. A dynamic price was computed for this one
        request: the token is bound to its query string too (`query=<hash>`), so it cannot
        buy the same path with a query the hook would have priced higher."""
        out = [f"services={service}:0", f"path={self.path}"]
        if self.price_hook is not None:
            out.append(f"query={query_digest(query or '')}")
        if self.methods is not None:
            out.append(f"method={','.join(sorted(self.methods))}")
        if self.capabilities:
            out.append(f"{service}_capabilities={','.join(sorted(self.capabilities))}")
        if self.pass_s is not None:
            out.append(f"{service}_valid_until={now + self.pass_s}")
        else:
            out.append(f"credits={self.credits}")
        return out

    async def price_for(self, request: Any) -> int:
        if self.price_hook is None:
            return self.price_msat
        result = self.price_hook(request, self)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, int) or isinstance(result, bool) or not 0 < result <= MAX_MSAT:
            raise ValueError(f"price hook for {self.key} returned {result!r}, not a positive msat int")
        return result


class Pricing:
    def __init__(self, rules: list[RouteRule]) -> None:
        self.rules = rules

    def match(self, method: str, path: str) -> RouteRule | None:
        for rule in self.rules:
            if rule.matches(method, path):
                return rule
        return None


def load_hook(spec: str, where: str, base_dir: Path | None = None) -> PriceHook:
    """'package.module:function' -> callable, or ConfigError naming where it was asked for.
    The module is looked for on sys.path, then next to the config file (`base_dir`)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: price_hook must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as first:
        if base_dir is None or str(base_dir) in sys.path:
            raise ConfigError(f"{where}: cannot import price_hook module {module_name!r}: {first}") from None
        sys.path.insert(0, str(base_dir))     # the config's directory, for the module and its imports
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{where}: cannot import price_hook module {module_name!r} (looked on sys.path "
                              f"and in {base_dir}): {exc}") from None
    hook = getattr(module, attr, None)
    if not callable(hook):
        raise ConfigError(f"{where}: {spec!r} is not a callable")
    return hook


class _Table:
    """Typed access to one TOML table, naming file and key in every error."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def fail(self, key: str, msg: str) -> ConfigError:
        # one format everywhere: '<file>: <key>: <problem>', nested keys as 'table.key'
        return ConfigError(f"{self.where}{'.' if ': ' in self.where else ': '}{key}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {getattr(kind, '__name__', kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def positive_int(self, key: str, default: int | None = None, *, allow_zero: bool = False,
                     maximum: int = MAX_MSAT) -> int | None:
        value = self.get(key, int, default)
        if value is None:
            return None
        if value < 0 or (value == 0 and not allow_zero) or value > maximum:
            raise self.fail(key, f"must be an integer in [{0 if allow_zero else 1}, {maximum}], got {value}")
        return value

    def check_keys(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.data) - allowed)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")


_ROUTE_KEYS = {"method", "path", "price_msat", "credits", "pass_s", "upstream", "capabilities",
               "free_per_hour", "stream_msat", "description", "price_hook", "schemes", "session"}
_SESSION_KEYS = {"deposit_units", "idle_timeout_s", "hold_s", "unit_type", "refund_max_fee_msat",
                 "refund_max_fee_ppm"}


def _parse_session(t: "_Table", price: int | None) -> SessionPolicy | None:
    raw = t.data.get("session")
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise t.fail("session", "must be true or a table (deposit_units, idle_timeout_s, hold_s, unit_type, "
                     "refund_max_fee_msat, refund_max_fee_ppm)")
    s = _Table(raw, f"{t.where}.session" if ": " in t.where else f"{t.where}: session")
    s.check_keys(_SESSION_KEYS)
    for key in ("credits", "pass_s", "price_hook", "free_per_hour", "stream_msat"):
        if key in t.data:
            raise t.fail(key, "a session route is priced per unit by price_msat alone")
    if price is None or price % 1000:
        raise t.fail("price_msat", "a session unit must be a whole number of satoshis (a multiple of 1000)")
    unit_type = s.get("unit_type", str, "request")
    if not unit_type or len(unit_type) > 40:
        raise s.fail("unit_type", "must be a short label such as \"chunk\" or \"token\"")
    policy = SessionPolicy(deposit_units=s.positive_int("deposit_units", 20, maximum=1_000_000) or 20,
                           idle_timeout_s=s.positive_int("idle_timeout_s", 300, maximum=30 * 86400) or 300,
                           hold_s=s.positive_int("hold_s", 60, maximum=3600) or 60, unit_type=unit_type,
                           refund_max_fee_msat=_whole(s, "refund_max_fee_msat", 5000, 10_000_000,
                                                      "millisatoshis"),
                           refund_max_fee_ppm=_whole(s, "refund_max_fee_ppm", 10_000, 1_000_000,
                                                     "millionths of the refund"))
    if price * policy.deposit_units > MAX_MSAT:
        raise s.fail("deposit_units", f"the deposit ({price} msat x {policy.deposit_units}) is too large")
    return policy


def _whole(s: "_Table", key: str, default: int, maximum: int, unit: str) -> int:
    value = s.data.get(key, default)
    if type(value) is not int or not 0 <= value <= maximum:
        raise s.fail(key, f"must be a whole number of {unit} from 0 to {maximum}")
    return value


def parse_route(data: Any, where: str, base_dir: Path | None = None) -> RouteRule:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    t = _Table(data, where)
    t.check_keys(_ROUTE_KEYS)
    path = t.get("path", str)
    if path is None:
        raise t.fail("path", "is required")
    try:
        compile_path(path)
    except ValueError as exc:
        raise t.fail("path", str(exc)) from None
    price = t.positive_int("price_msat")
    hook_spec = t.get("price_hook", str)
    if price is None and hook_spec is None:
        raise t.fail("price_msat", "is required (or give price_hook)")
    method = t.get("method", (str, list), "*")
    methods = [method] if isinstance(method, str) else method
    if not all(isinstance(m, str) for m in methods):
        raise t.fail("method", "must be a string or a list of strings")
    upper = {m.upper() for m in methods}
    if "*" in upper:
        method_set = None
    else:
        bad = sorted(upper - METHODS)
        if bad:
            raise t.fail("method", f"unknown HTTP method {bad[0]!r}")
        method_set = frozenset(upper)
    pass_s = t.positive_int("pass_s", maximum=10 * 365 * 86400)
    credits = t.positive_int("credits", maximum=1_000_000)
    if pass_s is not None and credits is not None:
        raise t.fail("credits", "give either credits or pass_s, not both")
    caps = t.get("capabilities", list, [])
    if not all(isinstance(c, str) and c and "," not in c for c in caps):
        raise t.fail("capabilities", "must be a list of non-empty strings without commas")
    per_request = pass_s is None and (credits or 1) == 1
    session = _parse_session(t, price)
    schemes = t.get("schemes", list, ["payment"] if session else sorted(SCHEMES) if per_request else ["l402"])
    if session is not None and [x.lower() for x in schemes if isinstance(x, str)] != ["payment"]:
        raise t.fail("schemes", "a session route offers the Payment scheme's session intent only: "
                                "schemes = [\"payment\"]")
    if not schemes or not all(isinstance(x, str) and x.lower() in SCHEMES for x in schemes):
        raise t.fail("schemes", f"must be a non-empty list of {', '.join(repr(x) for x in sorted(SCHEMES))}")
    if "payment" in {x.lower() for x in schemes} and not per_request:
        raise t.fail("schemes", "a Payment charge buys one request; credits bundles and passes are "
                                "offered as L402 tokens only")
    upstream = t.get("upstream", str)
    if upstream is not None and not is_http_url(upstream):
        raise t.fail("upstream", f"must be an http:// or https:// URL with a host, got {upstream!r}")
    return RouteRule(
        path=path, price_msat=price or 0, methods=method_set,
        credits=None if pass_s is not None else (credits or 1), pass_s=pass_s,
        upstream=upstream, capabilities=frozenset(caps),
        free_per_hour=t.positive_int("free_per_hour", 0, allow_zero=True, maximum=1_000_000) or 0,
        stream_msat=t.positive_int("stream_msat"),
        description=t.get("description", str, ""),
        price_hook=load_hook(hook_spec, f"{where}.price_hook", base_dir) if hook_spec else None,
        schemes=frozenset(x.lower() for x in schemes),
        session=session,
    )
