"""Weighted, sticky choice of a version (SPEC §4). Pure: no I/O, no framework.

Weights become integer basis points laid out cumulatively in rule order; a bucket in
``1..10000`` picks the first rule whose cumulative end is >= the bucket. Cumulative ends
are rounded from prefix sums, so raising the last rule's weight only moves the boundary
before it downwards: a user who had the last version keeps it.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence

import attrs
import mmh3

__all__ = [
    "BASIS_POINTS",
    "SEED",
    "CookieCodec",
    "CookieSigner",
    "RouteTable",
    "StickyCookie",
    "basis_point_ends",
    "bucket",
]

BASIS_POINTS = 10_000
SEED = 86028157  # Unleash's variant normalisation seed, so assignments match across languages


def bucket(alias: str, key: str, modulus: int = BASIS_POINTS) -> int:
    """``murmur3_x86_32("{alias}:{key}", seed=86028157)`` taken unsigned, ``% modulus + 1``."""
    h: int = mmh3.hash(f"{alias}:{key}", SEED, signed=False)
    return h % modulus + 1


def basis_point_ends(weights: Sequence[float]) -> list[int]:
    """Cumulative ends in basis points for ``weights`` (any positive scale), last == 10000."""
    total = float(sum(weights))
    if total <= 0:
        return [0 for _ in weights]
    ends, running = [], 0.0
    for w in weights:
        running += w
        ends.append(round(running * BASIS_POINTS / total))
    ends[-1] = BASIS_POINTS
    return ends


@attrs.frozen
class RouteTable:
    """A route's precomputed choice table: eligible tags and their cumulative ends."""

    alias: str
    tags: tuple[str, ...]
    ends: tuple[int, ...]
    eligible: frozenset[str]
    # Basis points per eligible tag, for display and for sharing out an ejected weight.
    shares: dict[str, int] = attrs.field(hash=False)
    # "{alias}:", the part of every bucket() input that is the same for the whole route.
    key_prefix: str = attrs.field(init=False, repr=False, eq=False)

    @key_prefix.default
    def _key_prefix(self) -> str:
        return f"{self.alias}:"

    @classmethod
    def build(
        cls, alias: str, rules: Iterable[tuple[str, float]], ejected: Iterable[str] = ()
    ) -> RouteTable:
        """Ejected tags are dropped and their weight shared out in proportion among the rest."""
        out = set(ejected)
        kept = [(t, float(w)) for t, w in rules if w > 0 and t not in out]
        ends = basis_point_ends([w for _, w in kept])
        tags, cum, shares, prev = [], [], {}, 0
        for (tag, _), end in zip(kept, ends, strict=True):
            if end > prev:  # a rule rounded to zero width can never be chosen
                tags.append(tag)
                cum.append(end)
                shares[tag] = end - prev
                prev = end
        return cls(alias, tuple(tags), tuple(cum), frozenset(tags), shares)

    def for_bucket(self, b: int) -> str:
        return self.tags[bisect_left(self.ends, b)]

    def for_key(self, key: str) -> str:
        return self.tags[self.key_index(key)]

    def pick(self, rng: random.Random | None = None) -> str:
        return self.tags[self.pick_index(rng)]

    def pick_index(self, rng: random.Random | None = None) -> int:
        """A weighted position in ``tags``. ``random()`` scaled, not ``randrange()``: it is
        several times cheaper, and its bias over 10000 buckets is below 1e-12.

        The bucket of ``x = random() * 10000`` is ``int(x) + 1``; as the ends are whole, an end
        is >= that bucket exactly when it is > ``x``, so ``x`` is looked up as it is: ``int()``
        costs more than the whole search."""
        return bisect_right(self.ends, (rng or _rng).random() * BASIS_POINTS)

    def key_index(self, key: str) -> int:
        """The position in ``tags`` that ``bucket(alias, key)`` falls in (inlined: this is
        on every keyed request)."""
        h: int = mmh3.hash(self.key_prefix + key, SEED, signed=False)
        return bisect_left(self.ends, h % BASIS_POINTS + 1)


_rng = random.Random()

SIGNATURE_BYTES = 12  # 96 bits of HMAC-SHA256, in hex (cheaper to make than base64)


class CookieSigner:
    """HMAC-SHA256 (RFC 2104) over ``prefix + message`` with the key pads and the prefix
    hashed once: a signature then costs two state copies and two short hashes, where
    ``hmac.new`` re-derives the pads and ``HMAC.copy()`` goes through Python code."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        block = 64  # SHA-256's block size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + prefix)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def sign(self, message: bytes) -> str:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:SIGNATURE_BYTES].hex()

    def verify(self, message: bytes, signature: str) -> bool:
        """Constant-time comparison; any non-ASCII ``signature`` is simply wrong."""
        return signature.isascii() and hmac.compare_digest(signature, self.sign(message))


def _unexpired(expires: str, now: float) -> bool:
    """Whether a cookie's expiry field is a plain number not yet passed."""
    # isascii: str.isdigit() also accepts "²", which int() refuses.
    return expires.isascii() and expires.isdigit() and len(expires) <= 12 and int(expires) >= now


class CookieCodec:
    """Sticky cookie values: ``tag~expires`` or, with a secret, ``tag~expires~signature``.

    The signature is an HMAC-SHA256 over ``"{alias}~{tag}~{expires}"``, so a cookie cannot
    be moved to another route, extended, or edited to name another version.
    """

    __slots__ = ("_key", "_signer")

    def __init__(self, secret: str = "") -> None:
        self._key = secret.encode() if secret else b""
        self._signer = CookieSigner(self._key)

    @property
    def signed(self) -> bool:
        return bool(self._key)

    def signer(self, alias: str, tag: str) -> CookieSigner | None:
        """A signer for one route's tag (message prefix absorbed), or None when unsigned."""
        return CookieSigner(self._key, f"{alias}~{tag}~".encode()) if self._key else None

    def encode(self, alias: str, tag: str, expires: int) -> str:
        if self._key:
            sig = self._signer.sign(f"{alias}~{tag}~{expires}".encode())
            return f"{tag}~{expires}~{sig}"
        return f"{tag}~{expires}"

    def decode(self, alias: str, value: str, now: float) -> str | None:
        """The tag a cookie names, or None when it is malformed, tampered with or expired."""
        parts = value.split("~")
        if len(parts) != (3 if self._key else 2):
            return None
        tag, exp = parts[0], parts[1]
        if not _unexpired(exp, now):
            return None
        # Signed over the expiry as written: an edited spelling ("0123") is a tampered cookie.
        if self._key and not self._signer.verify(f"{alias}~{tag}~{exp}".encode(), parts[2]):
            return None
        return tag


class StickyCookie:
    """One route's sticky cookie, specialised per snapshot: reading a cookie and writing
    ``Set-Cookie`` touch only prebuilt strings and per-tag signers.

    Values are exactly :class:`CookieCodec`'s, so either can read what the other wrote. A
    value naming a tag outside ``tags`` (weight 0, ejected, unknown) is refused before any
    signature is computed: it would be replaced anyway.
    """

    __slots__ = ("_fields", "_heads", "_last", "_secure", "_signers", "_tail", "name", "ttl")

    def __init__(
        self, codec: CookieCodec, alias: str, name: str, ttl_seconds: int, tags: Iterable[str]
    ) -> None:
        self.name = name
        self.ttl = ttl_seconds
        self._fields = 3 if codec.signed else 2
        self._signers = {tag: codec.signer(alias, tag) for tag in tags}
        self._heads = {tag: f"{name}={tag}~" for tag in self._signers}
        self._tail = f"; Max-Age={ttl_seconds}; Path=/; HttpOnly; SameSite=Lax"
        self._secure = f"{self._tail}; Secure"
        # tag -> (start, end, Set-Cookie, Set-Cookie with Secure) of the last second written,
        # the second as the floats [start, end): a request's clock is tested against it without
        # an int() call.
        self._last: dict[str, tuple[float, float, str, str]] = {}

    def read(self, value: str, now: float) -> str | None:
        """The eligible tag a cookie value names, or None when it must be replaced."""
        parts = value.split("~")
        if len(parts) != self._fields:
            return None
        tag, exp = parts[0], parts[1]
        if tag not in self._signers or not _unexpired(exp, now):
            return None
        signer = self._signers[tag]
        if signer is None or signer.verify(exp.encode(), parts[2]):
            return tag
        return None

    def header(self, tag: str, now: float, secure: bool) -> str:
        """The ``Set-Cookie`` value naming ``tag`` for ``ttl`` seconds from the whole second
        ``int(now)``.

        Every request of the same second gets the same value, so it is signed once per second
        and tag instead of once per request."""
        last = self._last.get(tag)
        if last is None or not last[0] <= now < last[1]:
            second = int(now)
            expires = second + self.ttl
            value = f"{self._heads[tag]}{expires}"
            signer = self._signers[tag]
            if signer is not None:
                value = f"{value}~{signer.sign(str(expires).encode())}"
            last = (float(second), float(second + 1), value + self._tail, value + self._secure)
            self._last[tag] = last
        return last[3] if secure else last[2]
