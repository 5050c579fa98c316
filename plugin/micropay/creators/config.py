"""The `[[addresses]]` and `[creators]` sections of the sidecar's config file: Lightning
Addresses the sidecar serves, their limits, metadata, success action, zaps and splits.
A bad section fails at start-up naming the key."""
from __future__ import annotations

import base64
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..seller.pricing import _Table
from .lnurl import MAX_COMMENT, NAME, LnurlError, address_parts, metadata_text, success_message, success_url

CREATORS_KEYS = {"addresses", "creators"}
_ADDRESS_KEYS = {"name", "description", "long_description", "image_file", "min_sendable_msat",
                 "max_sendable_msat", "comment_allowed", "success_message", "success_url",
                 "success_description", "splits", "keep_share", "split_max_fee_msat", "split_min_msat",
                 "nostr_key_file"}
_SPLIT_KEYS = {"destination", "share", "name"}
_NODE_ID = re.compile(r"0[23][0-9a-f]{64}")
MAX_IMAGE_BYTES = 32 * 1024         # base64 in the metadata: the payRequest stays well under 64 KiB
MAX_SPLITS = 16
DEFAULT_MAX_SENDABLE = 10_000_000_000      # 10,000,000 sat (0.1 BTC)


@dataclass(frozen=True)
class Split:
    destination: str     # node id (keysend), BOLT12 offer (lno1...) or Lightning Address (name@host)
    share: int
    name: str = ""

    @property
    def kind(self) -> str:
        if self.destination.startswith("lno1"):
            return "offer"
        if "@" in self.destination:
            return "address"
        return "node"


@dataclass(frozen=True)
class AddressConfig:
    name: str
    description: str
    long_description: str = ""
    image: tuple[str, str] | None = None        # (png|jpeg, base64)
    min_sendable_msat: int = 1_000
    max_sendable_msat: int = DEFAULT_MAX_SENDABLE
    comment_allowed: int = 0
    success_action: dict[str, str] | None = None
    splits: tuple[Split, ...] = ()
    keep_share: int = 0                 # the address owner's share, kept on this node
    split_max_fee_msat: int = 1_000     # routing fee cap per forwarded share (borne by the owner)
    split_min_msat: int = 1_000         # a smaller share waits in the carry for the next tip
    nostr_key_file: Path | None = None  # set: zaps are accepted, receipts signed with this key

    def metadata(self, domain: str) -> str:
        """The exact metadata string (its sha256 is each invoice's description hash)."""
        return metadata_text(self.description, f"{self.name}@{domain}", long_text=self.long_description or None,
                             image=self.image)

    @property
    def total_shares(self) -> int:
        return self.keep_share + sum(s.share for s in self.splits)


@dataclass(frozen=True)
class CreatorsConfig:
    addresses: tuple[AddressConfig, ...] = ()
    public_url: str | None = None       # https://pay.example.com: the domain and callbacks' base
    tip_expiry_s: int = 600
    private_relays: bool = False        # zap receipts may go to relays on loopback/private addresses

    @property
    def enabled(self) -> bool:
        return bool(self.addresses)

    def address(self, name: str) -> AddressConfig | None:
        for a in self.addresses:
            if a.name == name:
                return a
        return None


def parse_creators(top: _Table, source: str, index_offset: int = 0) -> CreatorsConfig:
    """`index_offset`: where the addresses given start in the file's list (to name them
    right when they are checked one at a time)."""
    c = _Table(top.get("creators", dict, {}), f"{source}: creators")
    c.check_keys({"public_url", "tip_expiry_s", "zap_private_relays"})
    public_url = c.get("public_url", str)
    if public_url is not None:
        u = urllib.parse.urlsplit(public_url)
        if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/") or u.query or u.fragment:
            raise c.fail("public_url", "must be the site's origin, like \"https://pay.example.com\"")
        public_url = f"{u.scheme}://{u.netloc.lower()}"
    expiry = c.positive_int("tip_expiry_s", 600, maximum=86400) or 600
    out, seen = [], set()
    for i, raw in enumerate(top.get("addresses", list, []), index_offset):
        where = f"{source}: addresses[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        out.append(_address(_Table(raw, where), Path(source).parent, seen, public_url))
    return CreatorsConfig(tuple(out), public_url, expiry, bool(c.get("zap_private_relays", bool, False)))


def _address(t: _Table, base: Path, seen: set[str], public_url: str | None) -> AddressConfig:
    t.check_keys(_ADDRESS_KEYS)
    name = t.get("name", str)
    if name is None or not NAME.fullmatch(name):
        raise t.fail("name", "is required: 1-64 of a-z 0-9 . _ + - (starting with a letter or digit)")
    if name in seen:
        raise t.fail("name", f"duplicate address {name!r}")
    seen.add(name)
    description = t.get("description", str)
    if not description or len(description) > 640:
        raise t.fail("description", "is required: 1-640 characters (the payer's wallet shows it)")
    lo = t.positive_int("min_sendable_msat", 1_000) or 1_000
    hi = t.positive_int("max_sendable_msat", DEFAULT_MAX_SENDABLE) or DEFAULT_MAX_SENDABLE
    if hi < lo:
        raise t.fail("max_sendable_msat", "must be at least min_sendable_msat")
    comment = t.positive_int("comment_allowed", 0, allow_zero=True, maximum=MAX_COMMENT) or 0
    image = None
    if (img := t.get("image_file", str)) is not None:
        path = _path(base, img)
        kind = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(path.suffix.lower())
        if kind is None:
            raise t.fail("image_file", "must be a .png or .jpeg file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise t.fail("image_file", f"cannot read {str(path)!r}: {exc.strerror}") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise t.fail("image_file", f"is larger than {MAX_IMAGE_BYTES} bytes")
        image = (kind, base64.b64encode(data).decode("ascii"))
    action = _success_action(t, public_url)
    splits = _splits(t)
    keep = t.positive_int("keep_share", 0, allow_zero=True, maximum=1_000_000) or 0
    if splits and keep + sum(s.share for s in splits) <= 0:
        raise t.fail("splits", "the shares must add up to more than zero")
    fee = t.positive_int("split_max_fee_msat", 1_000, allow_zero=True, maximum=10_000_000)
    least = t.positive_int("split_min_msat", 1_000, maximum=1_000_000_000) or 1_000
    key = t.get("nostr_key_file", str)
    return AddressConfig(name, description, t.get("long_description", str, ""), image, lo, hi, comment, action,
                         splits, keep, 1_000 if fee is None else fee, least,
                         _path(base, key) if key is not None else None)


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _success_action(t: _Table, public_url: str | None) -> dict[str, str] | None:
    message, url, desc = t.get("success_message", str), t.get("success_url", str), t.get("success_description", str)
    try:
        if message is not None and url is not None:
            raise t.fail("success_url", "give success_message or success_url, not both")
        if message is not None:
            return success_message(message)
        if url is not None:
            u = urllib.parse.urlsplit(url)
            if u.scheme != "https" or not u.netloc:
                raise t.fail("success_url", "must be an https:// URL")
            # LUD-09: wallets refuse a success URL on another domain than the callback's
            if public_url is None or u.hostname != urllib.parse.urlsplit(public_url).hostname:
                raise t.fail("success_url", "must be on the domain of [creators] public_url (LUD-09: wallets "
                                            "refuse a URL on another domain than the callback's)")
            return success_url(desc or "Thank you!", url)
    except LnurlError as exc:
        raise t.fail("success_message" if message is not None else "success_description", str(exc)) from None
    if desc is not None:
        raise t.fail("success_description", "goes with success_url")
    return None


def _splits(t: _Table) -> tuple[Split, ...]:
    raw = t.get("splits", list, [])
    if len(raw) > MAX_SPLITS:
        raise t.fail("splits", f"at most {MAX_SPLITS} collaborators")
    out: list[Split] = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict):
            raise t.fail(f"splits[{k}]", "expected a table with destination and share")
        s = _Table(item, f"{t.where}.splits[{k}]")
        s.check_keys(_SPLIT_KEYS)
        dest = (s.get("destination", str) or "").strip()
        low = dest.lower()
        if _NODE_ID.fullmatch(low) or (low.startswith("lno1") and len(low) < 4096):
            dest = low
        else:
            try:
                name, host = address_parts(dest)
            except LnurlError:
                raise s.fail("destination", "must be a node id (66 hex), a BOLT12 offer (lno1...) or a "
                                            "Lightning Address (name@host)") from None
            dest = f"{name}@{host}"
        share = s.positive_int("share", maximum=1_000_000)
        if share is None:
            raise s.fail("share", "is required: a positive integer (shares are relative)")
        out.append(Split(dest, share, s.get("name", str, "")[:64]))
    if len({s.destination for s in out}) != len(out):
        raise t.fail("splits", "name the same destination twice; give it one entry with the summed share")
    return tuple(out)
