"""Repo enumeration on the relay, one page at a time: ``com.atproto.sync.listRepos`` and
``com.atproto.sync.listReposByCollection``.

The relay's WebSocket URL (``RELAY_URL``, e.g. ``wss://bsky.network``) and its XRPC HTTP
API share a host; `relay_http_base` derives the second from the first. Pages of both
methods go through one validator (`parse_page`): a malformed entry is counted and dropped,
a malformed page (no ``repos`` list, a cursor that is not a short string, a cursor that does
not advance) raises `FetchError` so the caller retries it from the same saved cursor.

* listRepos: ``{cursor?, repos: [{did, head, rev, active?, status?}]}``, at most 1,000 a page.
* listReposByCollection: ``{cursor?, repos: [{did}]}``, at most 2,000 a page (the lexicon's
  maximum; indigo's collectiondir, which serves it for the Bluesky relays, clamps larger
  limits). Its entries carry no ``rev``. A relay without it answers 404 (indigo's router),
  501 or the XRPC error ``MethodNotImplemented`` (the reference XRPC server):
  `not_implemented` recognises those answers so the caller falls back to listRepos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from backfill.hosts import FetchError, HostClient
from firehose.protocol.syntax import is_did, is_nsid, is_tid

LIST_REPOS_PATH = "/xrpc/com.atproto.sync.listRepos"
LIST_REPOS_MAX_LIMIT = 1000  # the lexicon's maximum page size
LIST_REPOS_BY_COLLECTION_PATH = "/xrpc/com.atproto.sync.listReposByCollection"
LIST_REPOS_BY_COLLECTION_MAX_LIMIT = 2000  # the lexicon's maximum page size
NOT_IMPLEMENTED_STATUSES = (404, 501)
NOT_IMPLEMENTED_ERROR = "MethodNotImplemented"
MAX_CURSOR_CHARS = 1024  # relay cursors are short (a seq or a DID); bound what we store
MAX_STATUS_CHARS = 64
MAX_HEAD_CHARS = 128  # a base32 CIDv1 is 59 chars

_SCHEMES = {"wss": "https", "ws": "http", "https": "https", "http": "http"}


def relay_http_base(relay_url: str) -> str:
    """``wss://host[:port]/any/path`` -> ``https://host[:port]`` (ws -> http)."""
    parts = urlsplit(relay_url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(
            f"RELAY_URL must be ws://, wss://, http:// or https://host, got {relay_url!r}"
        )
    netloc = parts.netloc.rpartition("@")[2]  # drop any user:password@
    return urlunsplit((scheme, netloc, "", "", ""))


@dataclass(frozen=True)
class RepoRef:
    """One listRepos entry. `active` defaults to True when absent (older relays)."""

    did: str
    head: str | None
    rev: str | None
    active: bool
    status: str | None


@dataclass(frozen=True)
class ListReposPage:
    repos: list[RepoRef]
    cursor: str | None  # None: the last page
    invalid: int = 0  # entries dropped because they were malformed


def parse_repo_ref(entry: Any) -> RepoRef | None:
    """A listRepos entry -> RepoRef, or None if it is malformed. PURE."""
    if type(entry) is not dict:
        return None
    did, head, rev = entry.get("did"), entry.get("head"), entry.get("rev")
    active, status = entry.get("active", True), entry.get("status")
    if type(did) is not str or not is_did(did):
        return None
    if head is not None and (type(head) is not str or len(head) > MAX_HEAD_CHARS):
        return None
    if rev is not None and (type(rev) is not str or not is_tid(rev)):
        return None
    if type(active) is not bool:
        return None
    if status is not None and (type(status) is not str or len(status) > MAX_STATUS_CHARS):
        return None
    return RepoRef(did=did, head=head, rev=rev, active=active, status=status)


def parse_collection_ref(entry: Any) -> RepoRef | None:
    """A listReposByCollection entry (``{did}``) -> RepoRef without head or rev, or None if
    it is malformed. PURE. Only ``did`` is read: the lexicon defines nothing else, so a rev
    a relay might add is no evidence of the repo's latest commit."""
    if type(entry) is not dict:
        return None
    did = entry.get("did")
    if type(did) is not str or not is_did(did):
        return None
    return RepoRef(did=did, head=None, rev=None, active=True, status=None)


def parse_page(
    doc: Any,
    request_cursor: str | None,
    method: str,
    parse_entry: Callable[[Any], RepoRef | None],
) -> ListReposPage:
    """A page of `method` -> page, entries checked by `parse_entry`. PURE. Raises
    FetchError(bad_response) on a bad page."""
    if type(doc) is not dict or type(doc.get("repos")) is not list:
        raise FetchError("bad_response", f"{method}: no repos list", transient=False)
    cursor = doc.get("cursor")
    if cursor is not None and (type(cursor) is not str or len(cursor) > MAX_CURSOR_CHARS):
        raise FetchError("bad_response", f"{method}: bad cursor", transient=False)
    if cursor == "":
        cursor = None
    repos: list[RepoRef] = []
    invalid = 0
    for entry in doc["repos"]:
        ref = parse_entry(entry)
        if ref is None:
            invalid += 1
        else:
            repos.append(ref)
    if cursor is not None and cursor == request_cursor:
        # A cursor that does not advance would page forever.
        raise FetchError("bad_response", f"{method}: cursor did not advance", transient=False)
    if cursor is not None and not doc["repos"]:
        cursor = None  # an empty page ends the enumeration whatever it says
    return ListReposPage(repos=repos, cursor=cursor, invalid=invalid)


def parse_list_repos(doc: Any, request_cursor: str | None) -> ListReposPage:
    """A listRepos response body -> page. Raises FetchError(bad_response) on a bad page."""
    return parse_page(doc, request_cursor, "listRepos", parse_repo_ref)


def parse_list_repos_by_collection(doc: Any, request_cursor: str | None) -> ListReposPage:
    """A listReposByCollection response body -> page (entries without rev). Raises
    FetchError(bad_response) on a bad page."""
    return parse_page(doc, request_cursor, "listReposByCollection", parse_collection_ref)


def not_implemented(err: BaseException) -> str | None:
    """Why `err` says the relay does not implement the method it was asked (``HTTP 404``,
    ``HTTP 501``, ``MethodNotImplemented``), or None for any other failure. PURE."""
    if not isinstance(err, FetchError):
        return None
    if NOT_IMPLEMENTED_ERROR in err.detail:
        return NOT_IMPLEMENTED_ERROR
    if err.status in NOT_IMPLEMENTED_STATUSES:
        return f"HTTP {err.status}"
    return None


async def list_repos(
    http: HostClient, base: str, cursor: str | None, limit: int = LIST_REPOS_MAX_LIMIT
) -> ListReposPage:
    """Fetch one page of ``com.atproto.sync.listRepos`` after `cursor` (None: the start)."""
    params: dict[str, str] = {"limit": str(max(1, min(limit, LIST_REPOS_MAX_LIMIT)))}
    if cursor is not None:
        params["cursor"] = cursor
    doc = await http.get_json(base.rstrip("/") + LIST_REPOS_PATH, params)
    return parse_list_repos(doc, cursor)


async def list_repos_by_collection(
    http: HostClient,
    base: str,
    collection: str,
    cursor: str | None,
    limit: int = LIST_REPOS_BY_COLLECTION_MAX_LIMIT,
) -> ListReposPage:
    """Fetch one page of ``com.atproto.sync.listReposByCollection`` for `collection` (an
    exact NSID) after `cursor` (None: the start)."""
    if not is_nsid(collection):
        raise ValueError(f"listReposByCollection needs an NSID, got {collection[:100]!r}")
    params: dict[str, str] = {
        "collection": collection,
        "limit": str(max(1, min(limit, LIST_REPOS_BY_COLLECTION_MAX_LIMIT))),
    }
    if cursor is not None:
        params["cursor"] = cursor
    doc = await http.get_json(base.rstrip("/") + LIST_REPOS_BY_COLLECTION_PATH, params)
    return parse_list_repos_by_collection(doc, cursor)
