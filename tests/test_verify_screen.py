"""SignatureScreen against a real HTTP PLC directory (aiohttp on loopback).

Commits are real frames: built by the devnet's repo code (cbor2, its own signer), decoded by
the worker's decoder, checked by the screen through IdentityResolver + HostClient.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_protocol_support import FIXTURES, frame

from backfill.hosts import HostClient
from backfill.identity import IdentityResolver
from firehose.devnet import frames as devnet_frames
from firehose.devnet.keys import SigningKey
from firehose.devnet.plc import did_document
from firehose.devnet.repo import ACTION_CREATE, Repo, Write
from firehose.devnet.tid import tid
from firehose.live.gate import Gate, GateMetrics, Verdict
from firehose.live.verify import LogBudget, SignatureScreen, VerifyMetrics
from firehose.model import CommitEvent, Event, IdentityEvent
from firehose.protocol.frames import decode_frame
from firehose.settings import ConfigError, Settings
from firehose.worker import Worker

T0_US = 1_735_689_600_000_000
PDS = "https://pds.example.com"


@dataclass
class Plc:
    """A PLC directory serving `docs`; counts requests per did; `delay_s` per answer."""

    url: str = ""
    docs: dict[str, Any] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    delay_s: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        self.requests[did] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        doc = self.docs.get(did)
        if doc is None:
            return web.json_response({"message": "DID not registered"}, status=404)
        return web.json_response(doc)


@pytest.fixture
async def plc() -> AsyncIterator[Plc]:
    server = Plc()
    app = web.Application()
    app.router.add_get("/{did}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@pytest.fixture
async def screen(plc: Plc) -> AsyncIterator[tuple[SignatureScreen, CollectorRegistry]]:
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        http = HostClient(session, per_host_concurrency=32, allow_private=True)
        resolver = IdentityResolver(http, plc.url)
        yield SignatureScreen(resolver, VerifyMetrics.create(registry)), registry


class Account:
    """A devnet repo whose commits become decoded CommitEvents."""

    def __init__(self, plc: Plc, index: int) -> None:
        self.key = SigningKey.from_seed(11, index)
        self.did = (
            f"did:plc:{'abcdefghijklmnopqrstuvwx'[:23]}{'abcdefghijklmnopqrstuvwxyz234567'[index]}"
        )
        self.repo = Repo(self.did, self.key)
        self.plc = plc
        self.commits = 0
        self.publish()

    def publish(self) -> None:
        self.plc.docs[self.did] = did_document(self.did, "a.test", self.key, PDS)

    def commit(self, seq: int, signer: SigningKey | None = None) -> CommitEvent:
        self.commits += 1
        now = T0_US + seq * 1000
        self.repo.key = signer or self.key
        record = {"$type": "app.bsky.feed.like", "createdAt": "2025-01-01T00:00:00.000Z"}
        record["subject"] = {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"}
        path = f"app.bsky.feed.like/{tid(now, self.commits)}"
        commit = self.repo.commit([Write(ACTION_CREATE, path, record)], tid(now, 0))
        self.repo.key = self.key
        event = decode_frame(devnet_frames.commit(seq, commit, "2025-01-01T00:00:00.000Z"))
        assert isinstance(event, CommitEvent) and event.commit_block is not None
        return event


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_valid_commits_pass_and_keys_are_cached(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    step, registry = screen
    alice, bob = Account(plc, 0), Account(plc, 1)  # P-256 and K-256
    events: list[Event] = [alice.commit(1), bob.commit(2), alice.commit(3)]
    verdict = Verdict()
    await step.screen(events, verdict)
    assert verdict.dropped == {} and verdict.resyncs == {}
    assert plc.requests == {alice.did: 1, bob.did: 1}  # one lookup per repo, not per commit
    await step.screen([bob.commit(4), alice.commit(5)], verdict)
    assert plc.requests == {alice.did: 1, bob.did: 1}  # cache hits
    assert value(registry, "firehose_signatures_total", result="valid") == 5
    assert value(registry, "firehose_identity_cache_entries") == 2
    assert value(registry, "firehose_verify_seconds_count") == 2


async def test_forged_commit_is_dropped_and_resynced(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    step, registry = screen
    alice, bob = Account(plc, 0), Account(plc, 1)
    forger = SigningKey.from_seed(99, 0)  # same curve as alice's key, another secret
    events: list[Event] = [alice.commit(1), alice.commit(2, forger), bob.commit(3)]
    verdict = Verdict()
    await step.screen(events, verdict)
    assert verdict.dropped == {1: "bad_signature"}
    assert verdict.resyncs == {alice.did: "bad_signature"}
    # The failed check re-fetched the document once (it may have rotated): still the same key.
    assert plc.requests[alice.did] == 2
    await step.screen([alice.commit(4, forger)], verdict := Verdict())
    assert verdict.dropped == {0: "bad_signature"}
    # Re-fetched less than a minute ago: a flood of forgeries is not a flood of PLC requests.
    assert plc.requests[alice.did] == 2
    assert value(registry, "firehose_signatures_total", result="invalid") == 2


async def test_key_rotation_is_picked_up_by_one_retry(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    step, registry = screen
    alice = Account(plc, 1)
    await step.screen([alice.commit(1)], Verdict())
    alice.key = SigningKey.from_seed(12, 1)  # rotated in the directory, our cache is stale
    alice.publish()
    verdict = Verdict()
    await step.screen([alice.commit(2), alice.commit(3)], verdict)
    assert verdict.dropped == {}
    assert plc.requests[alice.did] == 2  # one retry served both commits
    assert value(registry, "firehose_signatures_total", result="valid_after_refresh") == 1
    assert value(registry, "firehose_signatures_total", result="valid") == 2


async def test_identity_event_refreshes_in_stream_order(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    step, _ = screen
    alice = Account(plc, 0)
    old_key = alice.key
    await step.screen([alice.commit(1)], Verdict())
    alice.key = SigningKey.from_seed(13, 0)
    alice.publish()
    before = alice.commit(2, old_key)  # signed before the rotation, with the old key
    after = alice.commit(4)
    identity = IdentityEvent(3, alice.did, None, "a.test")
    verdict = Verdict()
    # No retry is allowed here, so only stream order can explain both passing.
    step.refresh_min_interval_s = 1e9
    step._refreshed[alice.did] = 0.0
    await step.screen([before, identity, after], verdict)
    assert verdict.dropped == {}
    assert plc.requests[alice.did] == 2  # the #identity forced one fresh fetch
    # And the order matters: the old key's commit after the #identity fails.
    verdict = Verdict()
    await step.screen([IdentityEvent(5, alice.did, None, None), alice.commit(6, old_key)], verdict)
    assert verdict.dropped == {1: "bad_signature"}


async def test_unresolvable_did_is_identity_unavailable(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    step, registry = screen
    alice, ghost = Account(plc, 0), Account(plc, 2)
    del plc.docs[ghost.did]
    events: list[Event] = [ghost.commit(1), alice.commit(2)]
    verdict = Verdict()
    with caplog.at_level(logging.WARNING, "firehose.verify"):
        await step.screen(events, verdict)
    assert verdict.dropped == {0: "identity_unavailable"}
    assert verdict.resyncs == {ghost.did: "identity_unavailable"}
    assert f"seq 1 of {ghost.did} (identity_unavailable)" in caplog.text
    assert value(registry, "firehose_signatures_total", result="no_identity") == 1
    # A document without a usable key is no better.
    plc.docs[ghost.did] = {**did_document(ghost.did, "g.test", ghost.key, PDS)}
    plc.docs[ghost.did]["verificationMethod"][0]["publicKeyMultibase"] = "zNotAKey0"
    # Within FAILURE_TTL_S the failure is remembered: no new request for the same DID.
    await step.screen([ghost.commit(3)], verdict := Verdict())
    assert verdict.dropped == {0: "identity_unavailable"}
    assert plc.requests[ghost.did] == 1
    # An #identity event forgets it: the (now present but unusable) document is fetched.
    identity = IdentityEvent(4, ghost.did, None, None)
    await step.screen([identity, ghost.commit(5)], verdict := Verdict())
    assert verdict.dropped == {1: "identity_unavailable"}
    assert plc.requests[ghost.did] == 2


async def test_a_slow_plc_directory_cannot_stall_the_stream(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    step, _ = screen
    alice = Account(plc, 0)
    plc.delay_s = 1.5
    step.lookup_deadline_s = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    verdict = Verdict()
    await step.screen([alice.commit(1)], verdict)
    assert loop.time() - started < 1.0
    assert verdict.dropped == {0: "identity_unavailable"}
    assert verdict.resyncs == {alice.did: "identity_unavailable"}


async def test_cold_cache_is_resolved_concurrently(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    step, _ = screen
    plc.delay_s = 0.2
    accounts = [Account(plc, i) for i in range(24)]
    events: list[Event] = [a.commit(i + 1) for i, a in enumerate(accounts)]
    started = asyncio.get_running_loop().time()
    verdict = Verdict()
    await step.screen(events, verdict)
    elapsed = asyncio.get_running_loop().time() - started
    assert verdict.dropped == {}
    assert plc.max_in_flight > 8  # not one after the other
    assert elapsed < 24 * 0.2 / 4


async def test_already_dropped_events_are_skipped_and_gate_counts(plc: Plc) -> None:
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        resolver = IdentityResolver(HostClient(session, allow_private=True), plc.url)
        step = SignatureScreen(resolver, VerifyMetrics.create(registry))
        alice = Account(plc, 0)
        forged = alice.commit(1, SigningKey.from_seed(98, 0))

        class DropFirst:
            async def screen(self, events: Any, verdict: Verdict) -> None:
                verdict.drop(0, "rev_not_newer")

        gate = Gate([DropFirst(), step], GateMetrics.create(registry))
        verdict = await gate.screen([forged, alice.commit(2, SigningKey.from_seed(98, 0))])
    assert verdict.dropped == {0: "rev_not_newer", 1: "bad_signature"}
    assert value(registry, "firehose_events_dropped_total", reason="bad_signature") == 1
    assert value(registry, "firehose_resyncs_requested_total", reason="bad_signature") == 1
    assert value(registry, "firehose_signatures_total", result="invalid") == 1


async def test_relay_scenario_commits_pass_with_their_accounts_documents(
    plc: Plc, screen: tuple[SignatureScreen, CollectorRegistry]
) -> None:
    """Every commit and #sync of the indigo relay scenarios, through the whole screen."""
    step, registry = screen
    events: list[Event] = []
    for path in sorted((FIXTURES / "indigo/cmd/relay/testing/testdata").glob("*.json")):
        scenario = json.loads(path.read_text())
        for account in scenario["accounts"]:
            ident = account["identity"]
            plc.docs[ident["did"]] = {
                "id": ident["did"],
                "verificationMethod": [
                    {"id": f"{ident['did']}#atproto", **ident["keys"]["atproto"]}
                ],
                "service": [
                    {
                        "id": "#atproto_pds",
                        "type": "AtprotoPersonalDataServer",
                        "serviceEndpoint": PDS,
                    }
                ],
            }
        for message in scenario["messages"]:
            header, body = message["frame"]["header"], message["frame"]["body"]
            if header["t"] in ("#commit", "#sync") and not message.get("drop"):
                events.append(decode_frame(frame(header, body)))
    verdict = Verdict()
    await step.screen(events, verdict)
    assert len(events) >= 20 and verdict.dropped == {}
    assert value(registry, "firehose_signatures_total", result="valid") == len(events)


def test_log_budget_bounds_lines() -> None:
    budget = LogBudget(lines=3, window_s=3600)
    assert [budget.allow() for _ in range(10)] == [True] * 3 + [False] * 7
    assert budget.suppressed == 7


def test_verify_signatures_setting() -> None:
    assert Settings.from_env({}).verify_signatures is False
    assert Settings.from_env({"VERIFY_SIGNATURES": "true"}).verify_signatures is True
    with pytest.raises(ConfigError, match="VERIFY_SIGNATURES"):
        Settings.from_env({"VERIFY_SIGNATURES": "maybe"})


async def test_worker_puts_the_signature_screen_first_only_when_asked() -> None:
    off = Worker(Settings.from_env({}))
    off_screens = off._screens(None)  # type: ignore[arg-type]
    assert not any(isinstance(s, SignatureScreen) for s in off_screens)
    on = Worker(Settings.from_env({"VERIFY_SIGNATURES": "1", "PLC_URL": "http://127.0.0.1:9"}))
    screens = on._screens(None)  # type: ignore[arg-type]
    assert isinstance(screens[0], SignatureScreen) and screens[0] is on._signatures
    assert screens[0].resolver.plc_url == "http://127.0.0.1:9"
    await screens[0].aclose()


async def test_other_shards_repos_are_neither_fetched_nor_judged(plc: Plc) -> None:
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as session:
        resolver = IdentityResolver(HostClient(session, allow_private=True), plc.url)
        alice, bob = Account(plc, 0), Account(plc, 1)
        step = SignatureScreen(
            resolver, VerifyMetrics.create(registry), owns_did=lambda did: did == alice.did
        )
        forger = SigningKey.from_seed(97, 1)
        verdict = Verdict()
        await step.screen([bob.commit(1, forger), alice.commit(2, forger)], verdict)
    assert verdict.dropped == {1: "bad_signature"}  # bob's repo belongs to another shard
    assert bob.did not in plc.requests


Step = tuple[str, int]  # ("commit" | "forged" | "identity" | "rotate" | "cut", account)
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["commit", "commit", "forged", "identity", "rotate", "cut"]),
        st.integers(0, 2),
    ),
    max_size=25,
)


@settings(max_examples=25, deadline=None)
@given(steps=STEPS)
def test_property_forged_dropped_genuine_kept(steps: list[Step]) -> None:
    """Any interleaving of genuine and forged commits, #identity events, key rotations (the
    directory changes, the cache does not know) and slice boundaries: exactly the forged
    commits are dropped."""
    asyncio.run(_run_steps(steps))


async def _run_steps(steps: list[Step]) -> None:
    server = Plc()
    app = web.Application()
    app.router.add_get("/{did}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            resolver = IdentityResolver(HostClient(session, allow_private=True), server.url)
            step = SignatureScreen(
                resolver, VerifyMetrics.create(CollectorRegistry()), refresh_min_interval_s=0
            )
            accounts = [Account(server, i) for i in range(3)]
            chunk: list[tuple[Event, bool]] = []

            async def screen_chunk() -> None:
                verdict = Verdict()
                await step.screen([event for event, _ in chunk], verdict)
                forged = {i for i, (_, bad) in enumerate(chunk) if bad}
                assert set(verdict.dropped) == forged
                assert set(verdict.dropped.values()) <= {"bad_signature"}
                chunk.clear()

            for seq, (kind, which) in enumerate(steps, 1):
                account = accounts[which]
                if kind == "cut":
                    await screen_chunk()
                elif kind == "rotate":
                    # Commits already signed are judged under the key of their time; the
                    # cache learns nothing of the rotation.
                    await screen_chunk()
                    account.key = SigningKey.from_seed(500 + seq, which)
                    account.publish()
                elif kind == "identity":
                    chunk.append((IdentityEvent(seq, account.did, None, None), False))
                else:
                    forger = SigningKey.from_seed(900 + seq, which) if kind == "forged" else None
                    chunk.append((account.commit(seq, forger), kind == "forged"))
            await screen_chunk()
    finally:
        await runner.cleanup()
