"""Devnet PDS hosts and PLC directory: aiohttp servers on loopback, one port each.

Each PDS host serves, for the repos the `Directory` assigns to it (lexicons under
https://github.com/bluesky-social/atproto/tree/main/lexicons/com/atproto):

* ``GET /xrpc/com.atproto.sync.getRepo?did=``        the whole current repo as a CAR v1
  (``application/vnd.ipld.car``: commit, every MST node, every record), streamed in chunks;
  served CAR files (`--extra-car`) byte for byte.
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
* ``GET /devnet/stats``                               the shared `HttpStats` as JSON.

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
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from firehose.devnet import dagcbor
from firehose.devnet.directory import LIST_REPOS_DEFAULT_LIMIT, LIST_REPOS_MAX_LIMIT, Directory
from firehose.devnet.httpfaults import HostFaults

CAR_MIME = "application/vnd.ipld.car"
CAR_CHUNK_BYTES = 64 * 1024  # write size of streamed CARs
GET_REPO = "/xrpc/com.atproto.sync.getRepo"
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


class HttpStats:
    """What tests assert about the backfill's politeness, per host and overall."""

    def __init__(self, hosts: int) -> None:
        self.get_repo: list[Counter[str]] = [Counter() for _ in range(hosts)]  # every attempt
        self.get_repo_ok: list[Counter[str]] = [Counter() for _ in range(hosts)]  # full CARs
        self.requests = [0] * hosts
        self.statuses: list[Counter[int]] = [Counter() for _ in range(hosts)]
        self.inflight = [0] * hosts  # getRepo requests being answered now
        self.max_inflight = [0] * hosts
        self.total_inflight = 0
        self.total_max_inflight = 0
        self.plc_requests = 0

    def enter(self, host: int) -> None:
        self.inflight[host] += 1
        self.total_inflight += 1
        self.max_inflight[host] = max(self.max_inflight[host], self.inflight[host])
        self.total_max_inflight = max(self.total_max_inflight, self.total_inflight)

    def leave(self, host: int) -> None:
        self.inflight[host] -= 1
        self.total_inflight -= 1

    def snapshot(self, endpoints: list[str]) -> dict[str, Any]:
        return {
            "inflight": self.total_inflight,
            "max_inflight": self.total_max_inflight,
            "plc_requests": self.plc_requests,
            "hosts": [
                {
                    "endpoint": endpoint,
                    "requests": self.requests[i],
                    "statuses": {str(k): v for k, v in sorted(self.statuses[i].items())},
                    "get_repo": dict(sorted(self.get_repo[i].items())),
                    "get_repo_ok": dict(sorted(self.get_repo_ok[i].items())),
                    "inflight": self.inflight[i],
                    "max_inflight": self.max_inflight[i],
                }
                for i, endpoint in enumerate(endpoints)
            ],
        }


class PdsHost:
    def __init__(
        self, index: int, directory: Directory, stats: HttpStats, faults: HostFaults
    ) -> None:
        self.index = index
        self.directory = directory
        self.stats = stats
        self.faults = faults
        self.did_web: str | None = None  # the did:web account this host serves, if any
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_get(GET_REPO, self._get_repo)
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

    async def _get_repo(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request.query.get("did"))
        if repo.car is not None:
            chunks = [repo.car.data]  # verbatim
        else:
            commit_cid, _ = repo.head()
            blocks = repo.account.repo.car_blocks()  # snapshot before the first await
            chunks = [dagcbor.car_header([commit_cid])]
            chunks += [dagcbor.car_section(cid, block) for cid, block in blocks]
        truncate = self.faults.truncate()
        if truncate:  # cut the middle section in half: a complete HTTP body, a broken CAR
            middle = max(1, len(chunks) // 2) if len(chunks) > 1 else 0
            cut = chunks[middle]
            chunks = [*chunks[:middle], cut[: max(1, len(cut) // 2)]]
        response = web.StreamResponse(headers=request[EXTRA_HEADERS])
        response.content_type = CAR_MIME
        response.enable_chunked_encoding()
        await response.prepare(request)
        buffer = bytearray()
        for chunk in chunks:
            buffer += chunk
            if len(buffer) >= CAR_CHUNK_BYTES:
                await response.write(bytes(buffer))
                buffer.clear()
        if buffer:
            await response.write(bytes(buffer))
        await response.write_eof()
        if not truncate:
            self.stats.get_repo_ok[self.index][repo.did] += 1
        return response

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
