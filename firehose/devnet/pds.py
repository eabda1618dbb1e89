"""Devnet PDS hosts and PLC directory: aiohttp servers on loopback, one port each.

Each PDS host serves, for the repos the `Directory` assigns to it (lexicons under
https://github.com/bluesky-social/atproto/tree/main/lexicons/com/atproto):

* ``GET /xrpc/com.atproto.sync.getRepo?did=&since=`` the current repo as a CAR v1
  (``application/vnd.ipld.car``), streamed in chunks, as the reference PDS builds it
  (packages/pds SqlRepoReader.getCarStream): rooted at the current commit, the blocks
  ``WHERE repoRev > since`` (every block without `since`) ``ORDER BY repoRev DESC, cid
  DESC``; nothing newer gives a CAR of the header alone. A `since` that is not a TID is
  400 ``InvalidRequest`` (the lexicon's ``format: tid``, checked before the handler).
  Served CAR files (`--extra-car`) byte for byte (or header only when `since` >= their
  rev). With `ignore_since`, `since` is ignored (a PDS that does not implement it).
* ``GET /xrpc/com.atproto.sync.getRecord?did=&collection=&rkey=`` a CAR rooted at the
  commit: the commit, the MST nodes from the root to the record's entry, the record
  (packages/repo getRecords + MST.cidsForPath). A missing record gets the same CAR
  without the record block, which proves its absence, as the reference PDS answers
  (the lexicon's ``RecordNotFound`` is never emitted by it, atproto PR #4829); with
  ``missing_record="not-found"``: 400 ``RecordNotFound``, as some other PDS software.
* ``GET /xrpc/com.atproto.sync.getLatestCommit?did=`` ``{cid, rev}``.
* ``GET /xrpc/com.atproto.sync.getRepoStatus?did=``   ``{did, active, status?, rev}``.
* ``GET /xrpc/com.atproto.sync.listRepos?limit=&cursor=`` this host's repos.
* ``GET /xrpc/com.atproto.repo.describeRepo?repo=``   ``{handle, did, didDoc, collections}``.
* ``GET /.well-known/did.json``                       host 0 only, with a did:web account.
* ``GET /.well-known/atproto-did``                    the DID of the account whose handle is
  the request's ``Host`` (https://atproto.com/specs/handle), text/plain; 404 for another.
  Every host answers for every devnet handle, as one front (the bsky.social entryway answers
  for every ``*.bsky.social`` handle); the worker reaches it through
  HANDLE_RESOLUTION_OVERRIDES (docs/identity.md).
* ``GET /devnet/stats``                               the shared `HttpStats` as JSON:
  requests and body bytes per XRPC method, getRepo and getRecord requests per did.

Errors are XRPC JSON ``{"error", "message"}``: 400 ``InvalidRequest`` for bad parameters,
400 ``RepoNotFound`` for an unknown (or deleted, or other host's) DID, and 400
``RepoDeactivated`` / ``RepoTakendown`` / ``RepoSuspended`` for inactive accounts, as the
reference PDS answers. Faults (`httpfaults`) wrap every ``/xrpc/`` request.

The PLC directory answers ``GET /{did}`` with the DID document (did:plc spec,
https://web.plc.directory/spec/v0.1/did-plc) or 404.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from firehose.devnet import dagcbor
from firehose.devnet.clock import TID_RE
from firehose.devnet.directory import LIST_REPOS_DEFAULT_LIMIT, LIST_REPOS_MAX_LIMIT, Directory
from firehose.devnet.httpfaults import HostFaults
from firehose.devnet.options import (
    MISSING_RECORD_MODES,
    MISSING_RECORD_NOT_FOUND,
    MISSING_RECORD_PROOF,
)
from firehose.devnet.stats import HttpStats

CAR_MIME = "application/vnd.ipld.car"
CAR_CHUNK_BYTES = 64 * 1024  # write size of streamed CARs
GET_REPO = "/xrpc/com.atproto.sync.getRepo"
GET_RECORD = "/xrpc/com.atproto.sync.getRecord"
# Syntax (https://atproto.com/specs/nsid, https://atproto.com/specs/record-key).
NSID_RE = re.compile(
    r"^[a-zA-Z](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z](?:[a-zA-Z0-9]{0,62})$"
)
RECORD_KEY_RE = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")
SENT_BYTES = web.RequestKey("sent_bytes", int)  # body bytes of a streamed answer
_INACTIVE_ERRORS = {
    "deactivated": "RepoDeactivated",
    "takendown": "RepoTakendown",
    "suspended": "RepoSuspended",
}
EXTRA_HEADERS = web.RequestKey("extra_headers", dict[str, str])  # rate-limit headers
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class XrpcError(Exception):
    def __init__(self, error: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error, self.message, self.status = error, message, status

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        body = {"error": self.error, "message": self.message}
        return web.json_response(body, status=self.status, headers=headers)


def list_limit(text: str | None) -> int:
    """Validate listRepos `limit` (1..1000, default 500) as the lexicon constrains it."""
    if text is None:
        return LIST_REPOS_DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise XrpcError("InvalidRequest", "limit must be an integer") from None
    if not 1 <= limit <= LIST_REPOS_MAX_LIMIT:
        raise XrpcError("InvalidRequest", f"limit must be 1..{LIST_REPOS_MAX_LIMIT}")
    return limit


def list_cursor(text: str | None) -> str | None:
    if text is not None and not text.isdigit():
        raise XrpcError("InvalidRequest", "malformed cursor")
    return text


class PdsHost:
    def __init__(
        self,
        index: int,
        directory: Directory,
        stats: HttpStats,
        faults: HostFaults,
        *,
        ignore_since: bool = False,
        missing_record: str = MISSING_RECORD_PROOF,
    ) -> None:
        if missing_record not in MISSING_RECORD_MODES:
            raise ValueError(f"missing_record must be one of {MISSING_RECORD_MODES}")
        self.index = index
        self.ignore_since = ignore_since
        self.missing_record = missing_record
        self.directory = directory
        self.stats = stats
        self.faults = faults
        self.did_web: str | None = None  # the did:web account this host serves, if any
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_get(GET_REPO, self._get_repo)
        self.app.router.add_get(GET_RECORD, self._get_record)
        self.app.router.add_get("/xrpc/com.atproto.sync.getLatestCommit", self._latest)
        self.app.router.add_get("/xrpc/com.atproto.sync.getRepoStatus", self._repo_status)
        self.app.router.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        self.app.router.add_get("/xrpc/com.atproto.repo.describeRepo", self._describe)
        self.app.router.add_get("/.well-known/did.json", self._did_json)
        self.app.router.add_get("/.well-known/atproto-did", self._atproto_did)
        self.app.router.add_get("/devnet/stats", self._stats)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/xrpc/"):
            return await handler(request)
        index, stats = self.index, self.stats
        stats.requests[index] += 1
        is_car = request.path == GET_REPO
        if is_car:
            stats.get_repo[index][request.query.get("did", "")] += 1
            stats.enter(index)
        elif request.path == GET_RECORD:
            stats.get_record[index][request.query.get("did", "")] += 1
        try:
            if self.faults.slow_ms:
                await asyncio.sleep(self.faults.slow_ms / 1000)
            status, headers = self.faults.admit()
            if status == 429:
                response: web.StreamResponse = XrpcError(
                    "RateLimitExceeded", "devnet rate limit", 429
                ).response(headers)
            elif status is not None:
                response = XrpcError("InternalServerError", "devnet fault", status).response()
            else:
                request[EXTRA_HEADERS] = headers
                try:
                    response = await handler(request)
                except XrpcError as err:
                    response = err.response(headers)
            stats.statuses[index][response.status] += 1
            if isinstance(response, web.Response):
                body = response.body
                sent = len(body) if isinstance(body, bytes | bytearray) else 0
            else:
                sent = request.get(SENT_BYTES, 0)
            stats.count(index, request.path.removeprefix("/xrpc/"), sent)
            return response
        finally:
            if is_car:
                stats.leave(index)

    def _repo(self, did: str | None) -> Any:
        if not did:
            raise XrpcError("InvalidRequest", "missing did")
        repo = self.directory.get(did)
        if repo is None or repo.host != self.index or repo.head() is None:
            raise XrpcError("RepoNotFound", f"Could not find repo for DID: {did}")
        if repo.status == "deleted":
            raise XrpcError("RepoNotFound", f"Repo has been deleted: {did}")
        if repo.status in _INACTIVE_ERRORS:
            raise XrpcError(_INACTIVE_ERRORS[repo.status], f"Repo is {repo.status}: {did}")
        return repo

    def _since(self, request: web.Request) -> str | None:
        since = request.query.get("since")
        if since is not None and not TID_RE.match(since):
            # xrpc-server validates params against the lexicon (since: format tid) first
            raise XrpcError("InvalidRequest", "Error: Params/since must be a valid TID")
        return None if self.ignore_since else since

    async def _get_repo(self, request: web.Request) -> web.StreamResponse:
        since = self._since(request)
        repo = self._repo(request.query.get("did"))
        truncate = self.faults.truncate()
        if repo.car is not None:
            car = repo.car
            if since is not None and since >= car.rev:  # its blocks are all of its rev
                chunks = [car.data[: car.header_bytes]]
            else:
                chunks = [car.data]  # verbatim
        elif since is None and not truncate:
            chunks = [repo.account.repo.full_car()]  # the same sections, cached per rev
        else:
            commit_cid, _ = repo.head()
            blocks = repo.account.repo.blocks_since(since)  # snapshot before the first await
            chunks = [dagcbor.car_header([commit_cid])]
            chunks += [dagcbor.car_section(cid, block) for cid, block in blocks]
        if truncate:  # cut the middle section in half: a complete HTTP body, a broken CAR
            middle = max(1, len(chunks) // 2) if len(chunks) > 1 else 0
            cut = chunks[middle]
            chunks = [*chunks[:middle], cut[: max(1, len(cut) // 2)]]
        response = await self._stream(request, chunks)
        if not truncate:
            self.stats.get_repo_ok[self.index][repo.did] += 1
        return response

    async def _stream(self, request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers=request[EXTRA_HEADERS])
        response.content_type = CAR_MIME
        response.enable_chunked_encoding()
        await response.prepare(request)
        buffer = bytearray()
        sent = 0
        for chunk in chunks:
            buffer += chunk
            if len(buffer) >= CAR_CHUNK_BYTES:
                await response.write(bytes(buffer))
                sent += len(buffer)
                buffer.clear()
        if buffer:
            await response.write(bytes(buffer))
            sent += len(buffer)
        await response.write_eof()
        request[SENT_BYTES] = sent
        return response

    async def _get_record(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        did, collection, rkey = query.get("did"), query.get("collection"), query.get("rkey")
        for name, value in (("did", did), ("collection", collection), ("rkey", rkey)):
            if not value:
                raise XrpcError("InvalidRequest", f'Error: Params must have the property "{name}"')
        assert did is not None and collection is not None and rkey is not None
        if not NSID_RE.match(collection):
            raise XrpcError("InvalidRequest", "Error: Params/collection must be a valid nsid")
        if not RECORD_KEY_RE.match(rkey) or rkey in (".", ".."):
            raise XrpcError("InvalidRequest", "Error: Params/rkey must be a valid Record Key")
        repo = self._repo(did)
        path = f"{collection}/{rkey}"
        commit_cid, _ = repo.head()
        if repo.car is not None:
            commit_block = repo.car.raw[commit_cid]
            blocks = repo.car.proof(path)
            present = path in repo.car.records
        else:
            account_repo = repo.account.repo
            commit_block = account_repo.commit_block
            blocks = account_repo.mst.path_blocks(path)
            entry = account_repo.records.get(path)
            present = entry is not None
            if entry is not None:
                blocks.append(entry)
        if not present and self.missing_record == MISSING_RECORD_NOT_FOUND:
            raise XrpcError("RecordNotFound", f"Could not locate record: at://{did}/{path}")
        chunks = [dagcbor.car_header([commit_cid]), dagcbor.car_section(commit_cid, commit_block)]
        chunks += [dagcbor.car_section(cid, block) for cid, block in blocks]
        return await self._stream(request, chunks)

    def _json(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(body, headers=request.get(EXTRA_HEADERS))

    async def _latest(self, request: web.Request) -> web.Response:
        cid, rev = self._repo(request.query.get("did")).head()
        return self._json(request, {"cid": dagcbor.cid_str(cid), "rev": rev})

    async def _repo_status(self, request: web.Request) -> web.Response:
        did = request.query.get("did")
        repo = self.directory.get(did) if did else None
        if repo is None or repo.host != self.index or repo.head() is None:
            raise XrpcError("RepoNotFound", f"Could not find repo for DID: {did}")
        body: dict[str, Any] = {"did": did, "active": repo.status == "active"}
        if repo.status != "active":
            body["status"] = repo.status
        else:
            body["rev"] = repo.head()[1]  # type: ignore[index]  # checked above
        return self._json(request, body)

    async def _list_repos(self, request: web.Request) -> web.Response:
        limit = list_limit(request.query.get("limit"))
        cursor = list_cursor(request.query.get("cursor"))
        return self._json(request, self.directory.list_page(cursor, limit, host=self.index))

    async def _describe(self, request: web.Request) -> web.Response:
        repo = self._repo(request.query.get("repo"))
        paths = repo.car.records if repo.car is not None else repo.account.repo.records
        collections = sorted({path.split("/", 1)[0] for path in paths})
        body = {
            "handle": repo.handle,
            "did": repo.did,
            "didDoc": self.directory.did_document(repo.did),
            "collections": collections,
            "handleIsCorrect": True,
        }
        return self._json(request, body)

    async def _did_json(self, request: web.Request) -> web.Response:
        document = self.directory.did_document(self.did_web) if self.did_web else None
        if document is None:
            raise web.HTTPNotFound()
        return web.json_response(document)

    async def _atproto_did(self, request: web.Request) -> web.Response:
        handle = (request.host or "").rsplit(":", 1)[0].lower()
        for repo in self.directory.repos():
            if repo.handle == handle and repo.status != "deleted":
                return web.Response(text=repo.did, content_type="text/plain")
        raise web.HTTPNotFound(text="no account with this handle")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot(self.directory.endpoints))


class PlcDirectory:
    """``GET /{did}`` -> DID document JSON, 404 ``{"message"}`` for unknown DIDs."""

    def __init__(self, directory: Directory, stats: HttpStats) -> None:
        self.directory = directory
        self.stats = stats
        self.app = web.Application()
        self.app.router.add_get("/{did}", self._resolve)

    async def _resolve(self, request: web.Request) -> web.Response:
        self.stats.plc_requests += 1
        did = request.match_info["did"]
        document = self.directory.did_document(did) if did.startswith("did:plc:") else None
        if document is None:
            body = json.dumps({"message": f"DID not registered: {did}"})
            return web.Response(status=404, text=body, content_type="application/json")
        return web.json_response(document, content_type="application/did+ld+json")


async def serve_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port (0 = a free port); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
