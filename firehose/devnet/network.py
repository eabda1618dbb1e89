"""The devnet's HTTP side: PDS hosts, the PLC directory, and the relay's own XRPC routes.

`DevnetNetwork` is owned by `DevnetRelay`. On `start` it builds the pre-populated accounts
and reads the served CAR files (so every repo exists before any endpoint answers), then
listens: one aiohttp server per PDS host (each its own port, so per-host limits key on
host:port), one for the PLC directory. The relay's websocket port also answers plain
HTTP GETs through `relay_http` (websockets' ``process_request`` hook):

* ``/xrpc/com.atproto.sync.listRepos?limit=&cursor=``: every repo, creation order,
  ``{cursor?, repos: [{did, head, rev, active, status?}]}``, no cursor on the last page;
* ``/xrpc/com.atproto.sync.listReposByCollection?collection=&limit=&cursor=``: the repos
  holding a record of the collection, as indigo's collectiondir answers (see `directory`);
  with `no_list_repos_by_collection` 404 or 501, the answer of a relay without it;
* ``/devnet/stats``: getRepo counts per did, in-flight and max in-flight getRepo requests
  per host and overall, requests and bytes per XRPC method (`stats.HttpStats`).

A relay without listReposByCollection: the reference relay (indigo cmd/relay, echo) answers
an unknown route 404 ``{"error": "Not Found"}``; a TypeScript xrpc-server (the PDS, the
AppView) answers an unknown method 501 ``{"error": "MethodNotImplemented"}``
(packages/xrpc-server server.ts catchall). Both exist, so the fault names the status.

The history model (`history_model` "year", `model_accounts`; see `model`) adds accounts
whose repos grew commit by commit over the year before now, listed after the prebuilt ones.

did:web (https://w3c-ccg.github.io/did-method-web/): with `did_web_records` > 0, one quiet
account ``did:web:127.0.0.1%3A<port of PDS 0>`` lives on PDS 0, which serves its document
at ``/.well-known/did.json`` (over http: it is loopback). The PLC directory does not know
it. Its DID includes the port, so it is only stable across runs with a fixed
`pds_port_base`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from firehose.devnet import dagcbor
from firehose.devnet.accounts import STATUS_ACTIVE, Account
from firehose.devnet.carfile import CarRepo, load_car
from firehose.devnet.clock import DAY_US
from firehose.devnet.directory import (
    BY_COLLECTION_DEFAULT_LIMIT,
    BY_COLLECTION_MAX_LIMIT,
    CursorError,
    Directory,
    ServedRepo,
)
from firehose.devnet.generator import DEFAULT_PDS_ENDPOINT, Generator
from firehose.devnet.httpfaults import HttpFaults
from firehose.devnet.model import MODEL_NOTE, MODELS, build_model_accounts
from firehose.devnet.pds import (
    MISSING_RECORD_PROOF,
    NSID_RE,
    PdsHost,
    PlcDirectory,
    XrpcError,
    list_cursor,
    list_limit,
    serve_app,
)
from firehose.devnet.prebuilt import PrebuiltFactory, build_accounts
from firehose.devnet.stats import HttpStats
from firehose.devnet.truth import merge_served, repo_history

LIST_REPOS_PATH = "/xrpc/com.atproto.sync.listRepos"
BY_COLLECTION_PATH = "/xrpc/com.atproto.sync.listReposByCollection"
UNIMPLEMENTED_STATUSES = (404, 501)
STATS_PATH = "/devnet/stats"
PREBUILT_DEFAULT_SPAN_DAYS = 90  # without history, prebuilt records precede the clock start
DID_WEB_INDEX = 3_000_000  # key index of the did:web account (beyond any generated one)


@dataclass(frozen=True)
class NetworkConfig:
    host: str = "127.0.0.1"
    pds_hosts: int = 3
    plc_port: int = 0  # 0 = a free port
    pds_port_base: int = 0  # PDS i listens on base + i; 0 = free ports
    repo_accounts: int = 0  # pre-populated accounts (bulk path, no firehose events)
    repo_records: int = 0  # records in each pre-populated repo
    extra_cars: tuple[str, ...] = ()
    did_web_records: int = 0  # > 0: add a did:web account with that many records
    faults: HttpFaults = field(default_factory=HttpFaults)
    history_model: str = ""  # "" or "year" (see model.py)
    model_accounts: int = 0
    ignore_since: bool = False  # PDS hosts answer getRepo whole, whatever `since` says
    missing_record: str = MISSING_RECORD_PROOF  # getRecord of a missing record
    no_list_repos_by_collection: int = 0  # 404 or 501: the relay does not implement it


class DevnetNetwork:
    def __init__(self, config: NetworkConfig, generator: Generator, seed: int) -> None:
        self.config = config
        self.generator = generator
        self.seed = seed
        self.directory = Directory(generator, config.pds_hosts)
        self.stats = HttpStats(config.pds_hosts)
        self.cars: list[CarRepo] = []
        if config.history_model not in ("", *MODELS):
            raise ValueError(f"unknown history model {config.history_model!r}")
        if config.no_list_repos_by_collection not in (0, *UNIMPLEMENTED_STATUSES):
            raise ValueError("no_list_repos_by_collection must be 0, 404 or 501")
        self.pds = [
            PdsHost(
                i,
                self.directory,
                self.stats,
                config.faults.for_host(i, seed),
                ignore_since=config.ignore_since,
                missing_record=config.missing_record,
            )
            for i in range(config.pds_hosts)
        ]
        self.model: list[Account] = []
        self.plc = PlcDirectory(self.directory, self.stats)
        self._runners: list[web.AppRunner] = []
        self.plc_url = ""

    @property
    def pds_urls(self) -> list[str]:
        return self.directory.endpoints

    def _prebuilt_span(self) -> tuple[int, int]:
        clock = self.generator.clock
        if clock.history_events:  # spread over the same history window as the events
            return clock.history_start_us, clock.now_us
        return clock.current_us - PREBUILT_DEFAULT_SPAN_DAYS * DAY_US, clock.current_us

    def build(self) -> None:
        """Create the repos that exist before the relay starts (CPU-bound, seconds)."""
        config = self.config
        if config.repo_accounts:
            accounts = build_accounts(
                self.seed,
                DEFAULT_PDS_ENDPOINT,
                self.generator.account_count,  # indexes after the generated accounts
                config.repo_accounts,
                config.repo_records,
                self._prebuilt_span(),
            )
            self.generator.add_prebuilt(accounts)
            for account in accounts:
                self.directory.add_account(account)
        if config.history_model and config.model_accounts:
            self.model = build_model_accounts(
                self.seed,
                DEFAULT_PDS_ENDPOINT,
                self.generator.account_count + config.repo_accounts,
                config.model_accounts,
                self.generator.clock.now_us,
            )
            self.generator.add_prebuilt(self.model)
            for account in self.model:
                self.directory.add_account(account)
        for position, path in enumerate(config.extra_cars):
            car = load_car(path, position)
            self.cars.append(car)
            self.directory.add_car(car, position)

    async def start(self) -> None:
        self.build()
        config = self.config
        for i, pds in enumerate(self.pds):
            port = config.pds_port_base + i if config.pds_port_base else 0
            runner, bound = await serve_app(pds.app, config.host, port)
            self._runners.append(runner)
            self.directory.endpoints.append(f"http://{config.host}:{bound}")
        runner, bound = await serve_app(self.plc.app, config.host, config.plc_port)
        self._runners.append(runner)
        self.plc_url = f"http://{config.host}:{bound}"
        if config.did_web_records:
            self._add_did_web()

    def _add_did_web(self) -> None:
        netloc = urlsplit(self.directory.endpoints[0]).netloc
        did = "did:web:" + netloc.replace(":", "%3A")  # did:web encodes the port's colon
        factory = PrebuiltFactory(self.seed, DEFAULT_PDS_ENDPOINT)
        start, end = self._prebuilt_span()
        account = factory.build(DID_WEB_INDEX, self.config.did_web_records, start, end, did=did)
        account.handle = f"web.{netloc.split(':')[0]}.devnet.test"
        self.generator.add_prebuilt([account])
        self.directory.add(ServedRepo(did, 0, account=account))
        self.pds[0].did_web = did

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    def truth(self, base: dict[str, Any]) -> dict[str, Any]:
        served = [(car.did, car.truth_records(), car.truth_times()) for car in self.cars]
        for car in self.cars:
            base["handles"].setdefault(car.did, car.handle)
        truth = merge_served(base, served, self.directory.hosts_truth())
        truth["history"] = self.history_truth()
        if self.config.history_model:
            truth["model"] = {
                "name": self.config.history_model,
                "note_nsid": MODEL_NOTE,
                "kinds": {account.did: account.model_kind for account in self.model},
                "deletes": {
                    f"at://{account.did}/{path}": rev
                    for account in self.model
                    for path, rev in account.model_deletes
                },
            }
        return truth

    def history_truth(self) -> dict[str, Any]:
        """did -> {rev, car_bytes, blocks_by_rev} of every repo getRepo serves (active)."""
        history: dict[str, Any] = {}
        for repo in self.directory.repos():
            head = repo.head()
            if head is None or repo.status != STATUS_ACTIVE:
                continue
            if repo.car is not None:
                sizes = ((repo.car.rev, size) for size in repo.car.section_sizes())
            else:
                assert repo.account is not None
                served = repo.account.repo.served_blocks()
                sizes = ((rev, len(dagcbor.car_section(cid, block))) for rev, cid, block in served)
            history[repo.did] = repo_history(head[0], head[1], sizes)
        return history

    def stats_json(self) -> dict[str, Any]:
        return self.stats.snapshot(self.directory.endpoints)

    def relay_http(self, target: str) -> tuple[int, dict[str, Any]] | None:
        """Answer a plain HTTP GET on the relay port: (status, JSON body), None if unknown."""
        parts = urlsplit(target)
        if parts.path == STATS_PATH:
            return 200, self.stats_json()
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.path == LIST_REPOS_PATH:
            try:
                limit, cursor = list_limit(query.get("limit")), list_cursor(query.get("cursor"))
            except XrpcError as err:
                answer = err.status, {"error": err.error, "message": err.message}
            else:
                answer = 200, self.directory.list_page(cursor, limit)
        elif parts.path == BY_COLLECTION_PATH:
            answer = self._by_collection(query)
        else:
            return None
        self.stats.count(None, parts.path.removeprefix("/xrpc/"), len(json_bytes(answer[1])))
        return answer

    def _by_collection(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        unimplemented = self.config.no_list_repos_by_collection
        if unimplemented == 404:  # indigo relay (echo): unknown route
            return 404, {"error": "Not Found"}
        if unimplemented == 501:  # TypeScript xrpc-server: unknown method
            return 501, {"error": "MethodNotImplemented", "message": "Method Not Implemented"}
        collection = query.get("collection", "")
        if not NSID_RE.match(collection):
            message = f"bad collection nsid, syntax: invalid NSID: {collection!r}"
            return 400, {"error": "BadRequest", "message": message}
        try:
            limit = int(query.get("limit", ""))
        except ValueError:
            limit = BY_COLLECTION_DEFAULT_LIMIT
        limit = min(max(limit, 1), BY_COLLECTION_MAX_LIMIT)
        try:
            return 200, self.directory.collection_page(collection, query.get("cursor"), limit)
        except CursorError:
            return 500, {"error": "DatabaseError", "message": "failed to read DIDs for collection"}


def json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
