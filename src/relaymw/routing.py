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
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import attrs
import mmh3

__all__ = ["BASIS_POINTS", "SEED", "CookieCodec", "RouteTable", "basis_point_ends", "bucket"]

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
        return self.tags[bisect_left(self.ends, bucket(self.alias, key))]

    def pick(self, rng: random.Random | None = None) -> str:
        b = (rng or _rng).randrange(BASIS_POINTS) + 1
        return self.tags[bisect_left(self.ends, b)]


_rng = random.Random()


class CookieCodec:
    """Sticky cookie values: ``tag~expires`` or, with a secret, ``tag~expires~signature``.

    The signature is an HMAC-SHA256 over the route alias, tag and expiry, so a cookie cannot
    be moved to another route, extended, or edited to name another version.
    """

    __slots__ = ("_key", "_mac")

    def __init__(self, secret: str = "") -> None:
        self._key = secret.encode() if secret else b""
        # Keyed once; each signature copies this state instead of re-deriving the key pads
        # (faster than a one-shot hmac.digest). 96 bits of it, in hex (cheaper than base64).
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)

    def _sign(self, alias: str, tag: str, expires: int) -> str:
        mac = self._mac.copy()
        mac.update(f"{alias}~{tag}~{expires}".encode())
        return mac.digest()[:12].hex()

    def encode(self, alias: str, tag: str, expires: int) -> str:
        if self._key:
            return f"{tag}~{expires}~{self._sign(alias, tag, expires)}"
        return f"{tag}~{expires}"

    def decode(self, alias: str, value: str, now: float) -> str | None:
        """The tag a cookie names, or None when it is malformed, tampered with or expired."""
        parts = value.split("~")
        if len(parts) != (3 if self._key else 2):
            return None
        tag, exp = parts[0], parts[1]
        # isascii: str.isdigit() also accepts "²", which int() refuses.
        if not (exp.isascii() and exp.isdigit()) or len(exp) > 12 or int(exp) < now:
            return None
        if self._key and not hmac.compare_digest(
            parts[2].encode(), self._sign(alias, tag, int(exp)).encode()
        ):
            return None
        return tag
