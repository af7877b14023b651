"""Weighted, sticky choice of a version (SPEC §4): buckets, tables, cookies, Snapshot.choose."""

from __future__ import annotations

import functools
import hashlib
import hmac
import random
import string
from collections import Counter
from collections.abc import Sequence

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymw.config import build_config, parse_document
from relaymw.routing import (
    BASIS_POINTS,
    CookieCodec,
    CookieSigner,
    RouteTable,
    StickyCookie,
    basis_point_ends,
    bucket,
)
from relaymw.snapshot import RawHeaders, RequestView, Snapshot, cookie_value

KEYS = [f"user-{i}" for i in range(100_000)]


@functools.lru_cache(maxsize=8)
def buckets_for(alias: str) -> list[int]:
    """Every key's bucket for ``alias``, computed once: the split tests reuse them."""
    return [bucket(alias, k) for k in KEYS]


def split(table: RouteTable, buckets: Sequence[int]) -> dict[str, float]:
    """The realised share (percent) of each tag over ``buckets``."""
    counts = Counter(table.for_bucket(b) for b in buckets)
    return {tag: 100 * n / len(buckets) for tag, n in counts.items()}


# --- bucket -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "key", "modulus"),
    [
        ("code-review-production", "user-1", 10_000),
        ("chat-production", "alice@example.com", 10_000),
        ("a", "", 100),
        ("ünïcode-alias", "ключ", 7),
        ("x", "y", 1),
    ],
)
def test_bucket_matches_unleash_normalisation(alias: str, key: str, modulus: int) -> None:
    expected = mmh3.hash(f"{alias}:{key}", 86028157, signed=False) % modulus + 1
    assert bucket(alias, key, modulus) == expected


def test_bucket_pinned_values() -> None:
    # Computed once and pinned: any change to the hash, seed, separator or signedness moves
    # every user of every route, so it must show up here.
    assert bucket("code-review-production", "user-1") == 4172
    assert bucket("code-review-production", "alice@example.com") == 9276
    assert bucket("chat-production", "42") == 2837
    assert bucket("chat-production", "42", modulus=100) == 37


@given(st.text(max_size=30), st.text(max_size=30), st.integers(1, 10**9))
def test_bucket_range(alias: str, key: str, modulus: int) -> None:
    assert 1 <= bucket(alias, key, modulus) <= modulus


def test_bucket_depends_on_alias() -> None:
    # The alias is part of the hash, so one user's position differs between routes.
    same = sum(
        a == b
        for a, b in zip(buckets_for("route-a")[:2000], buckets_for("route-b")[:2000], strict=True)
    )
    assert same < 20


# --- basis points and route tables --------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "ends"),
    [
        ([95, 5], [9500, 10000]),
        ([1, 1, 1], [3333, 6667, 10000]),
        ([60, 45], [5714, 10000]),
        ([0, 100], [0, 10000]),
        ([100], [10000]),
        ([0, 0], [0, 0]),
        ([33.333, 66.667], [3333, 10000]),
    ],
)
def test_basis_point_ends(weights: list[float], ends: list[int]) -> None:
    assert basis_point_ends(weights) == ends


def test_for_key_is_for_bucket_of_bucket() -> None:
    table = RouteTable.build("route-a", [("v1", 70), ("v2", 30)])
    for key, b in zip(KEYS[:2000], buckets_for("route-a")[:2000], strict=True):
        assert table.for_key(key) == table.for_bucket(b)


def test_first_rule_whose_end_reaches_the_bucket_wins() -> None:
    table = RouteTable.build("r", [("v1", 95), ("v2", 5)])
    assert table.ends == (9500, 10000)
    assert [table.for_bucket(b) for b in (1, 9500, 9501, 10000)] == ["v1", "v1", "v2", "v2"]


@st.composite
def weight_vectors(draw: st.DrawFn, min_size: int = 2, max_size: int = 5) -> list[float]:
    """Positive weights summing to 100, each at least 2 so every rule has a visible share."""
    n = draw(st.integers(min_size, max_size))
    raw = draw(st.lists(st.integers(2, 100), min_size=n, max_size=n))
    scaled = [w * 100 / sum(raw) for w in raw]
    return scaled


@given(weight_vectors(), st.sampled_from(["route-a", "route-b", "code-review-production"]))
@settings(max_examples=20, deadline=None)
def test_realised_split_by_key_within_one_point(weights: list[float], alias: str) -> None:
    tags = [f"v{i}" for i in range(len(weights))]
    table = RouteTable.build(alias, zip(tags, weights, strict=True))
    realised = split(table, buckets_for(alias))
    for tag, w in zip(tags, weights, strict=True):
        assert abs(realised.get(tag, 0.0) - w) < 1.0, (tag, w, realised)


@given(
    st.lists(st.integers(1, 100), min_size=2, max_size=5),
    st.floats(min_value=0, max_value=1),
)
@settings(max_examples=200, deadline=None)
def test_raising_the_last_weight_keeps_everyone_who_had_it(raw: list[int], step: float) -> None:
    old = [w * 100 / sum(raw) for w in raw]
    last = old[-1] + step * (100 - old[-1])
    # The others shrink proportionally so that the total stays 100.
    scale = (100 - last) / (100 - old[-1])
    new = [w * scale for w in old[:-1]] + [last]
    assert abs(sum(new) - 100) < 1e-9
    tags = [f"v{i}" for i in range(len(raw))]
    before = RouteTable.build("r", zip(tags, old, strict=True))
    after = RouteTable.build("r", zip(tags, new, strict=True))
    canary = tags[-1]
    # Every bucket, not a sample: the promise is for every user.
    for b in range(1, BASIS_POINTS + 1):
        if before.for_bucket(b) == canary:
            assert after.for_bucket(b) == canary, (b, old, new)


def test_spec_example_canary_5_to_25() -> None:
    buckets = buckets_for("code-review-production")
    before = RouteTable.build("code-review-production", [("stable", 95), ("canary", 5)])
    after = RouteTable.build("code-review-production", [("stable", 75), ("canary", 25)])
    had = [b for b in buckets if before.for_bucket(b) == "canary"]
    assert len(had) > 4000
    assert all(after.for_bucket(b) == "canary" for b in had)
    moved = sum(before.for_bucket(b) != after.for_bucket(b) for b in buckets)
    # Only the new 20% move, and only from stable to canary.
    assert abs(100 * moved / len(buckets) - 20) < 1
    assert all(
        after.for_bucket(b) == "canary"
        for b in buckets
        if before.for_bucket(b) != after.for_bucket(b)
    )


def test_weight_zero_is_never_chosen() -> None:
    table = RouteTable.build("r", [("v1", 50), ("dark", 0), ("v2", 50), ("off", 0)])
    chosen = {table.for_bucket(b) for b in range(1, BASIS_POINTS + 1)}
    assert chosen == {"v1", "v2"}
    assert table.eligible == frozenset({"v1", "v2"})
    rng = random.Random(1)
    assert {table.pick(rng) for _ in range(5000)} == {"v1", "v2"}


def test_ejected_versions_are_never_chosen_and_their_weight_is_shared_in_proportion() -> None:
    table = RouteTable.build("r", [("v1", 50), ("v2", 30), ("v3", 20)], ejected={"v2"})
    assert {table.for_bucket(b) for b in range(1, BASIS_POINTS + 1)} == {"v1", "v3"}
    assert table.eligible == frozenset({"v1", "v3"})
    # 50:20 stays 5:2 → 71.43% and 28.57%.
    assert table.shares == {"v1": 7143, "v3": 2857}
    realised = split(table, buckets_for("r"))
    assert abs(realised["v1"] - 71.43) < 1
    assert abs(realised["v3"] - 28.57) < 1


def test_ejecting_the_canary_keeps_stable_users_where_they_were() -> None:
    before = RouteTable.build("r", [("v1", 90), ("v2", 10)])
    after = RouteTable.build("r", [("v1", 90), ("v2", 10)], ejected=["v2"])
    assert all(
        after.for_bucket(b) == "v1"
        for b in range(1, BASIS_POINTS + 1)
        if before.for_bucket(b) == "v1"
    )
    assert after.tags == ("v1",)


def test_shares_sum_to_basis_points() -> None:
    table = RouteTable.build("r", [("a", 1), ("b", 1), ("c", 1)])
    assert sum(table.shares.values()) == BASIS_POINTS
    assert table.shares == {"a": 3333, "b": 3334, "c": 3333}


def test_pick_realised_split_with_seeded_rng() -> None:
    table = RouteTable.build("r", [("v1", 60), ("v2", 25), ("v3", 15)])
    rng = random.Random(20240601)
    counts = Counter(table.pick(rng) for _ in range(100_000))
    for tag, w in (("v1", 60), ("v2", 25), ("v3", 15)):
        assert abs(counts[tag] / 1000 - w) < 1
    # Seeded means reproducible.
    a = [table.pick(random.Random(7)) for _ in range(3)]
    assert a == [table.pick(random.Random(7)) for _ in range(3)]


# --- CookieCodec --------------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize("secret", ["", "s3cret"])
def test_cookie_round_trip(secret: str) -> None:
    codec = CookieCodec(secret)
    value = codec.encode("review", "claude-sonnet-4.5-v2", int(NOW) + 60)
    assert codec.decode("review", value, NOW) == "claude-sonnet-4.5-v2"
    assert value.count("~") == (2 if secret else 1)
    # Still valid at the very second of expiry, gone after it.
    assert codec.decode("review", value, NOW + 60) == "claude-sonnet-4.5-v2"
    assert codec.decode("review", value, NOW + 61) is None


def test_unsigned_cookie_is_not_bound_to_its_route() -> None:
    # Without a secret the value is plain: the route's eligibility check is the only guard.
    codec = CookieCodec()
    assert codec.decode("other", codec.encode("review", "v1", int(NOW) + 60), NOW) == "v1"


def _signed() -> tuple[CookieCodec, str]:
    codec = CookieCodec("s3cret")
    return codec, codec.encode("review", "v1", int(NOW) + 60)


def test_signed_cookie_tampered_tag() -> None:
    codec, value = _signed()
    _, exp, sig = value.split("~")
    assert codec.decode("review", f"v2~{exp}~{sig}", NOW) is None


def test_signed_cookie_tampered_expiry() -> None:
    codec, value = _signed()
    tag, exp, sig = value.split("~")
    assert codec.decode("review", f"{tag}~{int(exp) + 3600}~{sig}", NOW) is None


def test_signed_cookie_tampered_signature() -> None:
    codec, value = _signed()
    flipped = value[:-1] + ("A" if value[-1] != "A" else "B")
    assert codec.decode("review", flipped, NOW) is None


def test_signed_cookie_wrong_alias() -> None:
    codec, value = _signed()
    assert codec.decode("chat", value, NOW) is None


def test_signed_cookie_wrong_secret() -> None:
    _, value = _signed()
    assert CookieCodec("other-secret").decode("review", value, NOW) is None


def test_signed_cookie_truncated() -> None:
    codec, value = _signed()
    for cut in (1, 5, len(value.split("~")[2]) + 1):
        assert codec.decode("review", value[:-cut], NOW) is None


def test_unsigned_cookie_rejected_when_a_secret_is_configured() -> None:
    unsigned = CookieCodec().encode("review", "v1", int(NOW) + 60)
    assert CookieCodec("s3cret").decode("review", unsigned, NOW) is None
    # And a signed cookie is not accepted by an unsigned codec either (wrong shape).
    _, signed = _signed()
    assert CookieCodec().decode("review", signed, NOW) is None


@pytest.mark.parametrize(
    "value",
    ["", "~", "v1", "v1~", "v1~abc", "v1~-5", "v1~1.5", "v1~99999999999999", "v1~1~x~y", "~~~"],
)
@pytest.mark.parametrize("secret", ["", "s3cret"])
def test_garbage_cookies(value: str, secret: str) -> None:
    assert CookieCodec(secret).decode("review", value, NOW) is None


def test_expired_cookie() -> None:
    for secret in ("", "s3cret"):
        codec = CookieCodec(secret)
        assert codec.decode("review", codec.encode("review", "v1", int(NOW) - 1), NOW) is None


@given(st.text(alphabet=string.printable, max_size=60))
def test_decode_never_raises_on_ascii(value: str) -> None:
    for secret in ("", "k"):
        assert CookieCodec(secret).decode("review", value, NOW) in (
            None,
            value.split("~", maxsplit=1)[0],
        )


@pytest.mark.parametrize("value", ["v1~\u00b2", "v1~\u00b2~sig"])
def test_decode_rejects_unicode_digits(value: str) -> None:
    secret = "s3cret" if value.count("~") == 2 else ""
    assert CookieCodec(secret).decode("review", value, NOW) is None


@pytest.mark.parametrize("secret", ["", "s3cret"])
def test_zero_padded_expiry_is_a_tampered_cookie(secret: str) -> None:
    # The signature covers the expiry as written; an unsigned value is read the same way.
    codec = CookieCodec(secret)
    tag, exp, *sig = codec.encode("review", "v1", int(NOW) + 60).split("~")
    padded = "~".join([tag, f"0{exp}", *sig])
    assert codec.decode("review", padded, NOW) == (None if secret else "v1")
    sticky = StickyCookie(codec, "review", "rw", 60, ["v1"])
    assert sticky.read(padded, NOW) == (None if secret else "v1")


# --- CookieSigner and StickyCookie ----------------------------------------------------------------


@given(st.binary(max_size=150), st.binary(max_size=40), st.binary(max_size=40))
def test_cookie_signer_is_hmac_sha256(key: bytes, prefix: bytes, message: bytes) -> None:
    # Keys longer than SHA-256's 64-byte block are hashed first (RFC 2104), so cover both.
    expected = hmac.new(key, prefix + message, hashlib.sha256).hexdigest()[:24]
    assert CookieSigner(key, prefix).sign(message) == expected


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 100, 200])
def test_cookie_signer_key_lengths(length: int) -> None:
    key = bytes(range(256))[:length]
    expected = hmac.new(key, b"review~v1~123", hashlib.sha256).hexdigest()[:24]
    assert CookieSigner(key, b"review~v1~").sign(b"123") == expected


def test_cookie_signer_verify() -> None:
    signer = CookieSigner(b"k", b"review~v1~")
    good = signer.sign(b"123")
    assert signer.verify(b"123", good)
    assert not signer.verify(b"124", good)
    assert not signer.verify(b"123", good.upper())
    assert not signer.verify(b"123", "é" * len(good))  # non-ASCII: refused, not an error


def sticky_for(secret: str, tags: Sequence[str] = ("v1", "v2")) -> StickyCookie:
    return StickyCookie(CookieCodec(secret), "review", "rw", 600, tags)


@pytest.mark.parametrize("secret", ["", "s3cret"])
def test_sticky_cookie_and_codec_read_each_other(secret: str) -> None:
    codec, sticky = CookieCodec(secret), sticky_for(secret)
    for tag in ("v1", "v2"):
        assert sticky.read(codec.encode("review", tag, int(NOW) + 5), NOW) == tag
        written = set_cookie_parts(sticky.header(tag, int(NOW), secure=False))[1]
        assert codec.decode("review", written, NOW + 600) == tag
        assert codec.decode("review", written, NOW + 601) is None
        # Bound to its route when signed, as CookieCodec's values are.
        assert codec.decode("other", written, NOW) == (None if secret else tag)


@pytest.mark.parametrize("secret", ["", "s3cret"])
def test_sticky_cookie_refuses_what_must_be_replaced(secret: str) -> None:
    codec, sticky = CookieCodec(secret), sticky_for(secret, ["v1"])
    # Validly written for a tag that is not eligible here (weight 0, ejected, unknown).
    assert sticky.read(codec.encode("review", "v2", int(NOW) + 60), NOW) is None
    assert sticky.read(codec.encode("review", "v1", int(NOW) - 1), NOW) is None
    if secret:
        value = codec.encode("review", "v1", int(NOW) + 60)
        assert sticky.read(CookieCodec("other").encode("review", "v1", int(NOW) + 60), NOW) is None
        assert sticky.read(CookieCodec(secret).encode("chat", "v1", int(NOW) + 60), NOW) is None
        assert sticky.read(value[:-1] + ("0" if value[-1] != "0" else "1"), NOW) is None
        assert sticky.read(CookieCodec().encode("review", "v1", int(NOW) + 60), NOW) is None


@given(st.text(max_size=60))
def test_sticky_cookie_read_never_raises(value: str) -> None:
    for secret in ("", "k"):
        assert sticky_for(secret).read(value, NOW) in (None, value.split("~", maxsplit=1)[0])


def test_set_cookie_is_signed_once_per_second_then_renewed() -> None:
    sticky = sticky_for("s3cret")
    first = sticky.header("v1", int(NOW), secure=False)
    assert sticky.header("v1", int(NOW), secure=False) is first  # reused, not re-signed
    assert sticky.header("v1", int(NOW), secure=True) == f"{first}; Secure"
    assert sticky.header("v2", int(NOW), secure=False) != first
    later = sticky.header("v1", int(NOW) + 1, secure=False)
    assert later != first
    assert CookieCodec("s3cret").decode("review", set_cookie_parts(later)[1], NOW + 601) == "v1"
    assert CookieCodec("s3cret").decode("review", set_cookie_parts(first)[1], NOW + 601) is None


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.999, 1.0, 1.5, -0.5, 3600.0])
def test_set_cookie_of_a_fractional_clock_names_its_whole_second(offset: float) -> None:
    sticky, codec = sticky_for("s3cret"), CookieCodec("s3cret")
    sticky.header("v1", NOW, secure=False)  # the cache holds NOW's second first
    now = NOW + offset
    value = set_cookie_parts(sticky.header("v1", now, secure=False))[1]
    assert value == codec.encode("review", "v1", int(now) + 600)


# --- Snapshot.choose ------------------------------------------------------------------------------

DOC = """
[upstreams.up]
base_url = "https://api.example.com/v1"
protocol = "openai"

[[versions]]
version_tag = "v1"
model = "gpt-4.1"
upstream_endpoint = "up"

[[versions]]
version_tag = "v2"
model = "gpt-4.1-mini"
upstream_endpoint = "up"

[[versions]]
version_tag = "dark"
model = "gpt-4.1-nano"
upstream_endpoint = "up"

[[routes]]
model_alias = "review"
route_rules = [
  { version_tag = "v1", weight = 70 },
  { version_tag = "dark", weight = 0 },
  { version_tag = "v2", weight = 30 },
]
sticky_sessions = { cookie_name = "rw", ttl_seconds = 600 }

[[routes]]
model_alias = "keyed"
route_rules = [{ version_tag = "v1", weight = 50 }, { version_tag = "v2", weight = 50 }]
sticky_sessions = { key = "header:X-User-Id" }

[[routes]]
model_alias = "pinnable"
route_rules = [{ version_tag = "v1", weight = 90 }, { version_tag = "v2", weight = 10 }]
allow_client_pin = true

[[routes]]
model_alias = "loose"
route_rules = [{ version_tag = "v1", weight = 50 }, { version_tag = "v2", weight = 50 }]
sticky_sessions = { enabled = false }
"""


def snapshot(extra: str = "", ejected: dict[str, list[str]] | None = None) -> Snapshot:
    doc = parse_document(DOC + extra, "toml")
    return Snapshot.compile(build_config(doc, environ={}), doc, ejected=ejected)


def request(headers: dict[str, str] | None = None, scheme: str = "http") -> RequestView:
    return RequestView({k.lower(): v for k, v in (headers or {}).items()}, "10.0.0.1", scheme)


def cookie_header(snap: Snapshot, tag: str, alias: str = "review", ttl: int = 60) -> dict[str, str]:
    return {"cookie": f"other=1; rw={snap.cookie_codec.encode(alias, tag, int(NOW) + ttl)}"}


def set_cookie_parts(set_cookie: str) -> tuple[str, str, list[str]]:
    first, *attrs = set_cookie.split("; ")
    name, _, value = first.partition("=")
    return name, value, attrs


def test_valid_cookie_for_an_eligible_version_is_honoured() -> None:
    snap = snapshot()
    route = snap.routes["review"]
    for tag in ("v1", "v2"):
        choice, set_cookie = snap.choose(route, request(cookie_header(snap, tag)), now=NOW)
        assert (choice.version_tag, choice.reason, set_cookie) == (tag, "cookie", None)
        assert choice.route == "review"
        assert choice.version.model == {"v1": "gpt-4.1", "v2": "gpt-4.1-mini"}[tag]


@pytest.mark.parametrize(
    ("tag", "ejected"),
    [("dark", None), ("v2", {"review": ["v2"]}), ("v9", None)],
    ids=["weight-0", "ejected", "unknown"],
)
def test_cookie_naming_an_ineligible_version_is_replaced(
    tag: str, ejected: dict[str, list[str]] | None
) -> None:
    snap = snapshot(ejected=ejected)
    route = snap.routes["review"]
    seen = set()
    for _ in range(200):
        choice, set_cookie = snap.choose(route, request(cookie_header(snap, tag)), now=NOW)
        assert choice.version_tag != tag
        assert choice.reason == "weight"
        assert set_cookie is not None
        name, value, _ = set_cookie_parts(set_cookie)
        assert name == "rw"
        assert snap.cookie_codec.decode("review", value, NOW) == choice.version_tag
        seen.add(choice.version_tag)
    assert seen == ({"v1"} if ejected else {"v1", "v2"})


def test_expired_cookie_is_replaced() -> None:
    snap = snapshot()
    headers = cookie_header(snap, "v2", ttl=-10)
    _, set_cookie = snap.choose(snap.routes["review"], request(headers), now=NOW)
    assert set_cookie is not None


def test_weight_choice_sets_a_cookie_that_is_then_honoured() -> None:
    snap = snapshot()
    route = snap.routes["review"]
    first, set_cookie = snap.choose(route, request(), now=NOW)
    assert first.reason == "weight" and set_cookie is not None
    _, value, _ = set_cookie_parts(set_cookie)
    again, none = snap.choose(route, request({"cookie": f"rw={value}"}), now=NOW + 599)
    assert (again.version_tag, again.reason, none) == (first.version_tag, "cookie", None)
    # Max-Age and the embedded expiry agree: after ttl_seconds the cookie no longer counts.
    _, renewed = snap.choose(route, request({"cookie": f"rw={value}"}), now=NOW + 601)
    assert renewed is not None


def test_weight_choice_never_picks_dark_or_ejected() -> None:
    snap = snapshot(ejected={"keyed": ["v2"]})
    review = Counter(
        snap.choose(snap.routes["review"], request(), now=NOW)[0].version_tag for _ in range(3000)
    )
    assert set(review) == {"v1", "v2"}
    assert 60 < 100 * review["v1"] / 3000 < 80
    keyed = {
        snap.choose(snap.routes["keyed"], request(), now=NOW)[0].version_tag for _ in range(200)
    }
    assert keyed == {"v1"}


@pytest.mark.parametrize(("scheme", "secure"), [("http", False), ("https", True)])
def test_set_cookie_attributes(scheme: str, secure: bool) -> None:
    snap = snapshot()
    _, set_cookie = snap.choose(snap.routes["review"], request(scheme=scheme), now=NOW)
    assert set_cookie is not None
    name, value, attrs = set_cookie_parts(set_cookie)
    assert name == "rw"
    assert ";" not in value and " " not in value
    expected = ["Max-Age=600", "Path=/", "HttpOnly", "SameSite=Lax"]
    assert attrs == [*expected, "Secure"] if secure else attrs == expected


def test_signed_cookies_with_a_secret() -> None:
    snap = snapshot('\n[sticky]\nsecret = "s3cret"\n')
    route = snap.routes["review"]
    choice, set_cookie = snap.choose(route, request(), now=NOW)
    assert set_cookie is not None
    _, value, _ = set_cookie_parts(set_cookie)
    assert value.count("~") == 2
    assert CookieCodec("s3cret").decode("review", value, NOW) == choice.version_tag
    # An unsigned cookie naming an eligible version is not believed.
    unsigned = CookieCodec().encode("review", "v2", int(NOW) + 60)
    _, replaced = snap.choose(route, request({"cookie": f"rw={unsigned}"}), now=NOW)
    assert replaced is not None
    # A signed cookie for another route cannot be replayed here.
    other = CookieCodec("s3cret").encode("keyed", "v2", int(NOW) + 60)
    _, replaced = snap.choose(route, request({"cookie": f"rw={other}"}), now=NOW)
    assert replaced is not None


def test_sticky_disabled_sets_no_cookie() -> None:
    snap = snapshot()
    choice, set_cookie = snap.choose(snap.routes["loose"], request(), now=NOW)
    assert (choice.reason, set_cookie) == ("weight", None)


def test_sticky_key_is_reproducible_and_matches_bucket() -> None:
    snap = snapshot()
    route = snap.routes["keyed"]
    for i in range(300):
        user = f"user-{i}"
        # Independent of RouteTable: 50/50 is basis points 1..5000 then 5001..10000.
        expected = "v1" if bucket("keyed", user) <= 5000 else "v2"
        for _ in range(2):
            choice, set_cookie = snap.choose(route, request({"X-User-Id": user}), now=NOW)
            assert (choice.version_tag, choice.reason) == (expected, "key")
            # The key's choice is also written to a cookie, for clients that keep them.
            assert set_cookie is not None
            _, value, _ = set_cookie_parts(set_cookie)
            assert snap.cookie_codec.decode("keyed", value, NOW) == expected


def test_sticky_key_missing_falls_back_to_weight() -> None:
    snap = snapshot()
    choice, _ = snap.choose(snap.routes["keyed"], request(), now=NOW)
    assert choice.reason == "weight"


def test_sticky_key_from_a_callable() -> None:
    doc = DOC.replace('key = "header:X-User-Id"', 'key = "callable"')
    parsed = parse_document(doc, "toml")
    snap = Snapshot.compile(build_config(parsed, environ={}), parsed)

    def tenant(view: RequestView) -> str | None:
        return view.headers.get("x-tenant")

    choice, _ = snap.choose(
        snap.routes["keyed"], request({"x-tenant": "acme"}), sticky_key=tenant, now=NOW
    )
    assert choice.reason == "key"
    assert choice.version_tag == ("v1" if bucket("keyed", "acme") <= 5000 else "v2")


PIN = '\n[pinning]\ntoken = "pin-token"\n'


def test_operator_pin_with_the_right_token() -> None:
    snap = snapshot(PIN)
    headers = {"x-relaymw-pin": "v2", "x-relaymw-pin-token": "pin-token"}
    choice, set_cookie = snap.choose(snap.routes["review"], request(headers), now=NOW)
    assert (choice.version_tag, choice.reason, set_cookie) == ("v2", "pin", None)
    # A pin may name a weight-0 version: that is how an operator tries a dark version.
    headers["x-relaymw-pin"] = "dark"
    choice, _ = snap.choose(snap.routes["review"], request(headers), now=NOW)
    assert (choice.version_tag, choice.reason) == ("dark", "pin")


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        (PIN, {"x-relaymw-pin": "dark", "x-relaymw-pin-token": "wrong"}),
        (PIN, {"x-relaymw-pin": "dark"}),
        (PIN, {"x-relaymw-pin": "dark", "x-relaymw-pin-token": ""}),
        ("", {"x-relaymw-pin": "dark", "x-relaymw-pin-token": ""}),
        ("", {"x-relaymw-pin": "dark"}),
        (PIN, {"x-relaymw-pin": "not-in-this-route", "x-relaymw-pin-token": "pin-token"}),
    ],
    ids=[
        "wrong-token",
        "no-token",
        "empty-token",
        "unconfigured",
        "unconfigured-no-token",
        "foreign-tag",
    ],
)
def test_operator_pin_ignored(extra: str, headers: dict[str, str]) -> None:
    snap = snapshot(extra)
    for _ in range(50):
        choice, _ = snap.choose(snap.routes["review"], request(headers), now=NOW)
        assert choice.reason == "weight"
        assert choice.version_tag != "dark"


def test_operator_pin_header_names_are_case_insensitive() -> None:
    snap = snapshot('\n[pinning]\nheader = "X-Pin"\ntoken_header = "X-Pin-Token"\ntoken = "t"\n')
    choice, _ = snap.choose(
        snap.routes["review"], request({"X-Pin": "v2", "X-Pin-Token": "t"}), now=NOW
    )
    assert choice.reason == "pin"


def test_client_pin_by_model_tag_only_when_allowed() -> None:
    snap = snapshot()
    found = snap.route_for_model("v2")
    assert found is not None
    route, tag = found
    assert (route.alias, tag) == ("pinnable", "v2")
    choice, set_cookie = snap.choose(route, request(), pinned_tag=tag, now=NOW)
    assert (choice.version_tag, choice.reason, set_cookie) == ("v2", "pin", None)
    # `dark` is only in "review", which does not allow client pins.
    assert snap.route_for_model("dark") is None
    assert snap.route_for_model("nope") is None
    # An alias is a route, not a pin.
    by_alias = snap.route_for_model("review")
    assert by_alias is not None and by_alias[0].alias == "review" and by_alias[1] is None


def test_client_pin_disabled_everywhere() -> None:
    doc = DOC.replace("allow_client_pin = true", "")
    parsed = parse_document(doc, "toml")
    snap = Snapshot.compile(build_config(parsed, environ={}), parsed)
    assert snap.route_for_model("v1") is None
    assert snap.route_for_model("v2") is None


def test_choose_survives_a_hostile_cookie() -> None:
    snap = snapshot()
    _, set_cookie = snap.choose(snap.routes["review"], request({"cookie": "rw=v2~\u00b2"}), now=NOW)
    assert set_cookie is not None


# --- RequestView ----------------------------------------------------------------------------------


def test_request_view_keys() -> None:
    view = request(
        {"Authorization": "Bearer sk-1", "X-User-Id": "u1", "Cookie": 'session="abc"; a=1'}
    )
    assert view.key("header:x-user-id") == "u1"
    assert view.key("header:X-User-Id") == "u1"
    assert view.key("cookie:session") == "abc"
    assert view.key("cookie:missing") is None
    assert view.key("api_key") == "sk-1"
    assert view.key("client_ip") == "10.0.0.1"
    assert view.key("callable") is None
    assert request({"x-api-key": "ak"}).key("api_key") == "ak"


def parse_cookie_jar(header: str) -> dict[str, str]:
    """The reference reading of a Cookie header: every cookie, the first of a name wins."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in cookies:
            cookies[name] = value.strip('"')
    return cookies


@given(
    st.text(alphabet=' ;="\tabx_-\u00a0é', max_size=60),
    st.sampled_from(["a", "ab", "x_b", "b-a"]),
)
@settings(max_examples=500)
def test_cookie_value_reads_like_the_whole_jar(header: str, name: str) -> None:
    assert cookie_value(header, name) == parse_cookie_jar(header).get(name)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("rw=v1~1", "v1~1"),
        ("a=1; rw=v2; rw=v3", "v2"),
        ('rw="quoted"', "quoted"),
        ("xrw=no; a=rw=no;rw = no;  rw=yes ", "yes"),
        ("a=1", None),
        ("", None),
    ],
)
def test_request_view_cookie(header: str, value: str | None) -> None:
    assert request({"cookie": header}).cookie("rw") == value


def test_request_view_over_raw_asgi_headers() -> None:
    raw = [(b"x-user-id", b"u1"), (b"cookie", b"a=1; rw=v1"), (b"x-user-id", b"u2")]
    view = RequestView(RawHeaders(raw), None, "https")
    assert view.key("header:X-User-Id") == "u1"  # the first of a repeated header
    assert (view.cookie("rw"), view.cookie("a"), view.cookie("b")) == ("v1", "1", None)
    assert RequestView(RawHeaders([]), None, "http").cookie("rw") is None


@pytest.mark.parametrize(
    ("xff", "trusted", "ip"),
    [
        ("1.1.1.1, 2.2.2.2", 0, "9.9.9.9"),
        ("1.1.1.1, 2.2.2.2", 1, "2.2.2.2"),
        ("1.1.1.1, 2.2.2.2", 2, "1.1.1.1"),
        ("1.1.1.1", 2, "9.9.9.9"),
    ],
)
def test_forwarded_for_only_through_trusted_proxies(xff: str, trusted: int, ip: str) -> None:
    view = RequestView.build({"x-forwarded-for": xff}, "9.9.9.9", "http", trusted)
    assert view.client_ip == ip


class _FixedRandom(random.Random):
    """A ``random()`` that returns the value it was given."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.integers(0, 100), min_size=1, max_size=5).filter(any),
    bucket=st.integers(0, 9999),
    fraction=st.sampled_from([0.0, 1e-9, 0.5, 1 - 1e-9]),
)
def test_pick_index_lands_in_the_bucket_of_the_scaled_random_value(
    weights: list[int], bucket: int, fraction: float
) -> None:
    # random() * 10000 falls in bucket int(x) + 1 (1..10000), and the rule whose cumulative
    # end first reaches that bucket wins: the same rule as for_bucket.
    table = RouteTable.build("a", [(f"v{i}", float(w)) for i, w in enumerate(weights)])
    value = min((bucket + fraction) / 10000, 1 - 2**-53)
    expected = table.for_bucket(int(value * 10000) + 1)
    assert table.pick(_FixedRandom(value)) == expected
