"""PURE rules of handle verification (https://atproto.com/specs/handle): which handle an
account claims, whether it may be resolved at all, what a DNS TXT or well-known answer says,
and the settings. `backfill.handles` does the I/O.

* The claim: the first ``at://<handle>`` entry of the DID document's ``alsoKnownAs`` that is a
  syntactically valid handle, lower-cased (handles are case-insensitive; the spec's
  normalized form is lower case). An ``at://`` entry that is not a handle is skipped, as
  the reference Go implementation (indigo ``identity.DeclaredHandle``) skips it.
* Reserved TLDs: the spec says handles under ``.alt .arpa .example .internal .invalid .local
  .localhost .onion`` are disallowed, and ``.test`` is for development only and "should fail
  in real-world environments": those fail as ``bad_syntax``, except a ``.test`` suffix that
  `HandleSettings.overrides` maps to a test server (the devnet).
* DNS: the TXT records of ``_atproto.<handle>``; the one record starting ``did=`` names the
  DID. Several such records are an error (no DID), as in the reference TypeScript resolver
  (``@atproto/identity`` ``parseDnsResult``: exactly one).
* HTTPS: the body of ``https://<handle>/.well-known/atproto-did``: its first line, trimmed,
  if it is a DID (the reference TypeScript resolver reads the first line; the spec asks for
  the DID alone and tolerates surrounding whitespace).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from firehose.envparse import Env, boolean
from firehose.protocol.syntax import DID_MAX_CHARS, is_did, is_handle

# https://atproto.com/specs/handle#additional-non-syntax-restrictions
DISALLOWED_TLDS = frozenset(
    {"alt", "arpa", "example", "internal", "invalid", "local", "localhost", "onion"}
)
TEST_TLD = "test"  # development only: resolved only through an override
DNS_TXT_PREFIX = "did="
DNS_SUBDOMAIN = "_atproto"
WELL_KNOWN_PATH = "/.well-known/atproto-did"
MAX_ALSO_KNOWN_AS = 16  # alsoKnownAs entries looked at
MAX_TXT_RECORDS = 32  # TXT records of one name looked at

# Every value of the verification metric's `result` label: keep the set small and fixed.
HANDLE_RESULTS = (
    "verified",  # DNS or HTTPS names the account's DID
    "mismatch",  # it names another DID
    "not_found",  # no did= record and no well-known answer (NXDOMAIN, 404, ...)
    "timeout",
    "too_large",  # well-known body over the cap
    "forbidden_address",  # the handle's host is private (and not allowed)
    "bad_syntax",  # not a handle, a reserved TLD, or a body that is not one DID
    "dns_error",  # the DNS lookup failed (SERVFAIL, no name server answered, no resolv.conf)
    "connection",  # connect, reset or TLS failure of the HTTPS check
    "http_error",  # 3xx (redirects are not followed), 429, 5xx, other 4xx
    "dropped",  # the verification queue was full: the account keeps no handle for now
)

OVERRIDES_ENV = "HANDLE_RESOLUTION_OVERRIDES"


@dataclass(frozen=True, slots=True)
class HandleSettings:
    """BACKFILL_VERIFY_HANDLES (default true) and HANDLE_RESOLUTION_OVERRIDES (devnet)."""

    enabled: bool = True
    # (suffix, base URL): a handle ending in "." + suffix is checked at
    # base URL + /.well-known/atproto-did with `Host: <handle>`, and not in DNS. Only
    # suffixes under the reserved `.test` TLD are accepted, so a real handle is never sent
    # elsewhere; the request still goes through the HostClient (a private address is refused
    # unless allowed).
    overrides: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HandleSettings:
        e = Env(env)
        return cls(
            enabled=e.get("BACKFILL_VERIFY_HANDLES", True, boolean),
            overrides=e.get(OVERRIDES_ENV, (), parse_overrides),
        )

    def override_for(self, handle: str) -> str | None:
        """The base URL serving `handle`'s well-known answer, if an override covers it."""
        for suffix, base in self.overrides:
            if handle.endswith("." + suffix):
                return base
        return None


def parse_overrides(raw: str) -> tuple[tuple[str, str], ...]:
    """``devnet.test=http://127.0.0.1:2583[,other.test=...]`` -> ((suffix, base), ...)."""
    out: list[tuple[str, str]] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        suffix, sep, base = item.partition("=")
        suffix, base = suffix.strip().lower().strip("."), base.strip().rstrip("/")
        if not sep or not suffix or not base:
            raise ValueError(f"{item!r}: expected <suffix>=<base URL>")
        if suffix != TEST_TLD and not suffix.endswith("." + TEST_TLD):
            raise ValueError(f"{suffix!r}: only suffixes under the reserved .test TLD")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ValueError(f"{base!r}: expected http(s)://host[:port]")
        out.append((suffix, base))
    return tuple(out)


def claimed_handle(also_known_as: Iterable[object]) -> tuple[str | None, bool]:
    """(handle, malformed): the first valid ``at://`` handle, lower-cased; `malformed` when
    there were ``at://`` entries but none was a handle."""
    malformed = False
    for n, aka in enumerate(also_known_as):
        if n >= MAX_ALSO_KNOWN_AS:
            break
        if type(aka) is not str or not aka.startswith("at://"):
            continue
        candidate = aka[len("at://") :]
        if is_handle(candidate):
            return candidate.lower(), False
        malformed = True
    return None, malformed


def resolvable(handle: str, settings: HandleSettings) -> bool:
    """Whether `handle` may be resolved: not under a disallowed TLD, and under `.test` only
    through an override."""
    tld = handle.rsplit(".", 1)[-1]
    if tld in DISALLOWED_TLDS:
        return False
    return tld != TEST_TLD or settings.override_for(handle) is not None


def did_from_txt(records: Sequence[Sequence[bytes]]) -> str | None:
    """TXT records (each a list of character-strings) -> the DID of the one ``did=`` record."""
    found: list[str] = []
    for strings in records[:MAX_TXT_RECORDS]:
        try:
            text = b"".join(strings).decode("ascii")
        except UnicodeDecodeError:
            continue
        if text.startswith(DNS_TXT_PREFIX):
            found.append(text[len(DNS_TXT_PREFIX) :].strip())
    if len(found) != 1:
        return None
    return found[0] if _is_did(found[0]) else None


def did_from_well_known(body: bytes) -> str | None:
    """A well-known body -> the DID it names (first line, trimmed), or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if _is_did(first) else None


def _is_did(text: str) -> bool:
    return len(text) <= DID_MAX_CHARS and is_did(text)
