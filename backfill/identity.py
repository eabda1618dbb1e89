"""DID -> identity (PDS endpoint, handle, signing key), cached. https://atproto.com/specs/did

* ``did:plc``: ``GET {PLC_URL}/{did}`` on the PLC directory returns the DID document.
* ``did:web``: ``GET https://{host}/.well-known/did.json``; atproto supports only
  hostname-level did:web (no path segments). A port is percent-encoded (``%3A``). For a
  loopback/private host (the devnet) plain http is used, and only when private network
  access is allowed; otherwise the HostClient refuses the address anyway.

From the document (which must have ``id == did``): the PDS is the ``service`` whose id ends
with ``#atproto_pds`` and whose type is ``AtprotoPersonalDataServer``; the handle is the
first ``at://`` entry of ``alsoKnownAs`` (claimed, not verified: the download only needs
the PDS; backfill/handles.py verifies the claim both ways before storing it, from
``also_known_as``); the signing key is the ``verificationMethod`` whose id ends with
``#atproto``, as its ``publicKeyMultibase``. `parse_did_document` is PURE.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from backfill.hosts import FetchError, HostClient, is_forbidden_ip
from backfill.http_rules import ReasonedError
from firehose.protocol.syntax import is_did, is_handle

DEFAULT_PLC_URL = "https://plc.directory"
DEFAULT_TTL_S = 3600.0
DEFAULT_MAX_ENTRIES = 100_000
MAX_ENDPOINT_CHARS = 2048
MAX_KEY_CHARS = 512
MAX_DOC_ENTRIES = 64  # alsoKnownAs / service / verificationMethod entries looked at

PDS_SERVICE_SUFFIX = "#atproto_pds"
PDS_SERVICE_TYPE = "AtprotoPersonalDataServer"
SIGNING_KEY_SUFFIX = "#atproto"

# https://web.plc.directory/spec/v0.1/did-plc : 24 chars of base32 (lowercase, 2-7).
_PLC_RE = re.compile(r"did:plc:[a-z2-7]{24}")
_WEB_HOST_RE = re.compile(r"[a-zA-Z0-9.-]+(:[0-9]{1,5})?")

IDENTITY_REASONS = frozenset(
    {"bad_did", "not_found", "bad_document", "no_pds", "network", "forbidden_address"}
)


class IdentityError(ReasonedError):
    """Resolution failed. `reason` is a bounded label; `transient` means retry later."""

    REASONS = IDENTITY_REASONS
    FALLBACK = "bad_document"

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        transient: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(reason, detail, transient=transient, retry_after_s=retry_after_s)


@dataclass(frozen=True)
class Identity:
    did: str
    handle: str | None
    pds: str  # service endpoint without a trailing slash, e.g. https://pds.example.com
    signing_key: str | None  # publicKeyMultibase
    # The verification method's `type`: "Multikey", or a legacy suite whose key carries no
    # multicodec prefix, so the type names the curve (firehose.protocol.signature).
    signing_key_type: str | None = None
    # The document's `alsoKnownAs` strings (at most MAX_DOC_ENTRIES, each at most
    # MAX_ENDPOINT_CHARS): backfill/handles.py picks and verifies the handle from them.
    also_known_as: tuple[str, ...] = ()


def did_web_url(did: str, allow_private: bool) -> str:
    """``did:web:host%3Aport`` -> ``https://host:port/.well-known/did.json``."""
    ident = did[len("did:web:") :]
    if ":" in ident:
        raise IdentityError("bad_did", "did:web with a path is not supported by atproto")
    host = unquote(ident)
    if not _WEB_HOST_RE.fullmatch(host):
        raise IdentityError("bad_did", did[:100])
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    local = hostname == "localhost" or (_is_ip(hostname) and is_forbidden_ip(hostname))
    scheme = "http" if local and allow_private else "https"
    return f"{scheme}://{host}/.well-known/did.json"


def _is_ip(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", text))


def _endpoint(value: Any) -> str | None:
    if type(value) is not str or len(value) > MAX_ENDPOINT_CHARS:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        return None
    return value.rstrip("/")


def _entries(doc: dict[str, Any], field: str) -> list[Any]:
    value = doc.get(field)
    return value[:MAX_DOC_ENTRIES] if type(value) is list else []


def parse_did_document(did: str, doc: Any) -> Identity:
    """A DID document -> Identity. Raises IdentityError(bad_document | no_pds). PURE."""
    if type(doc) is not dict:
        raise IdentityError("bad_document", "not a JSON object")
    if doc.get("id") != did:
        # A directory or web host answering with someone else's document must not let
        # that account's PDS serve this DID's repo.
        raise IdentityError("bad_document", f"document id is not {did[:100]}")
    handle = None
    for aka in _entries(doc, "alsoKnownAs"):
        if type(aka) is str and aka.startswith("at://"):
            candidate = aka[len("at://") :]
            handle = candidate.lower() if is_handle(candidate) else None
            break
    signing_key: str | None = None
    signing_key_type: str | None = None
    for method in _entries(doc, "verificationMethod"):
        if type(method) is not dict or type(method.get("id")) is not str:
            continue
        if method["id"].endswith(SIGNING_KEY_SUFFIX) and method["id"].split("#")[0] in ("", did):
            key = method.get("publicKeyMultibase")
            if type(key) is str and 0 < len(key) <= MAX_KEY_CHARS:
                signing_key = key
                kind = method.get("type")
                signing_key_type = kind[:64] if type(kind) is str else None
            break
    for service in _entries(doc, "service"):
        if type(service) is not dict or type(service.get("id")) is not str:
            continue
        sid = service["id"]
        if sid.endswith(PDS_SERVICE_SUFFIX) and sid.split("#")[0] in ("", did):
            if service.get("type") != PDS_SERVICE_TYPE:
                continue
            pds = _endpoint(service.get("serviceEndpoint"))
            if pds is None:
                raise IdentityError("no_pds", "bad #atproto_pds serviceEndpoint")
            aka = tuple(
                a
                for a in _entries(doc, "alsoKnownAs")
                if type(a) is str and len(a) <= MAX_ENDPOINT_CHARS
            )
            return Identity(did, handle, pds, signing_key, signing_key_type, aka)
    raise IdentityError("no_pds", f"{did[:100]} has no #atproto_pds service")


class IdentityResolver:
    """Resolves DIDs through the HostClient (so PLC/web hosts get the same politeness)."""

    def __init__(
        self,
        http: HostClient,
        plc_url: str = DEFAULT_PLC_URL,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.http = http
        self.plc_url = plc_url.rstrip("/")
        self.ttl_s = ttl_s
        self.max_entries = max(1, max_entries)
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        # Called with each freshly fetched identity and the wall-clock time of the fetch
        # (not for cache hits): the backfill's handle verification (backfill/handles.py).
        self.on_resolved: Callable[[Identity, float], None] | None = None

    def invalidate(self, did: str) -> None:
        """Forget `did` (after an #identity event, or when its PDS no longer has the repo)."""
        self._cache.pop(did, None)

    def __len__(self) -> int:
        return len(self._cache)

    async def resolve(self, did: str) -> Identity:
        now = time.monotonic()
        cached = self._cache.get(did)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(did)
            self.cache_hits += 1
            return cached[1]
        self.cache_misses += 1
        fetched_at = time.time()
        identity = parse_did_document(did, await self._fetch_document(did))
        self._cache[did] = (time.monotonic() + self.ttl_s, identity)
        self._cache.move_to_end(did)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        if self.on_resolved is not None:
            self.on_resolved(identity, fetched_at)
        return identity

    async def _fetch_document(self, did: str) -> Any:
        if type(did) is not str or not is_did(did):
            raise IdentityError("bad_did", str(did)[:100])
        if did.startswith("did:plc:"):
            if not _PLC_RE.fullmatch(did):
                raise IdentityError("bad_did", did[:100])
            url = f"{self.plc_url}/{did}"
        elif did.startswith("did:web:"):
            url = did_web_url(did, self.http.allow_private)
        else:
            raise IdentityError("bad_did", f"unsupported DID method {did[:40]}")
        try:
            return await self.http.get_json(url)
        except FetchError as exc:
            if exc.reason in ("not_found", "repo_not_found"):
                raise IdentityError("not_found", exc.detail) from exc
            if exc.reason == "forbidden_address":
                raise IdentityError("forbidden_address", exc.detail) from exc
            if exc.reason in ("bad_response", "too_large"):
                raise IdentityError("bad_document", exc.detail) from exc
            raise IdentityError(
                "network",
                f"{exc.reason}: {exc.detail}",
                transient=exc.transient,
                retry_after_s=exc.retry_after_s,
            ) from exc
