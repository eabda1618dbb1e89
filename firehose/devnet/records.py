"""Realistic record values for the devnet, one builder per collection.

Shapes follow the app.bsky lexicons (https://github.com/bluesky-social/atproto/tree/main/
lexicons/app/bsky). Values are plain dicts whose CID links are already tag-42 objects, ready
for `dagcbor.encode`. Facet offsets are UTF-8 byte offsets (app.bsky.richtext.facet#byteSlice),
and some words are non-ASCII so that byte and character offsets differ, as they do for real.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from firehose.devnet import dagcbor

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
BLOCK = "app.bsky.graph.block"
PROFILE = "app.bsky.actor.profile"
LIST = "app.bsky.graph.list"
LISTITEM = "app.bsky.graph.listitem"
FEED_GENERATOR = "app.bsky.feed.generator"
STARTERPACK = "app.bsky.graph.starterpack"
# A non-Bluesky lexicon: the indexer must keep every collection, not only app.bsky.*.
CUSTOM_NOTE = "com.example.devnet.note"
PROFILE_RKEY = "self"
FEED_SERVICE_DID = "did:web:feeds.devnet.test"

# Probability that a post's text carries a NUL character (legal in atproto strings, illegal
# in PostgreSQL text), so the worker's sanitising path is exercised.
NUL_TEXT_PROBABILITY = 0.003

_WORDS = (
    "the",
    "a",
    "firehose",
    "relay",
    "repo",
    "commit",
    "record",
    "indexer",
    "sky",
    "blue",
    "protocol",
    "garden",
    "coffee",
    "morning",
    "train",
    "city",
    "music",
    "photo",
    "cat",
    "dog",
    "build",
    "ship",
    "test",
    "today",
    "tomorrow",
    "think",
    "love",
    "new",
    "open",
    "small",
    "café",
    "naïve",
    "über",
    "東京",
    "こんにちは",
    "🦋",
    "☕",
    "🌱",
    "señor",
    "façade",
)
_TAGS = ("devnet", "atproto", "bluesky", "photography", "café", "日本語")
_LANGS = (["en"], ["en"], ["en"], ["ja"], ["pt", "en"], ["de"], ["fr"])
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy")
_MIME_TYPES = ("image/jpeg", "image/png", "image/webp")


@dataclass(frozen=True, slots=True)
class StrongRef:
    """com.atproto.repo.strongRef of an existing record."""

    uri: str
    cid: bytes

    def value(self) -> dict[str, Any]:
        return {"uri": self.uri, "cid": dagcbor.cid_str(self.cid)}


@dataclass(frozen=True, slots=True)
class PostRef:
    ref: StrongRef
    root: StrongRef  # the thread root (the post itself when it is not a reply)


class RecordFactory:
    """Builds record values from a seeded `random.Random`; deterministic by construction."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def words(self, low: int, high: int) -> str:
        return " ".join(self.rng.choices(_WORDS, k=self.rng.randint(low, high)))

    def blob(self) -> dict[str, Any]:
        """A blob reference (data model "blob" type): raw-codec CID of bytes never served."""
        size = self.rng.randint(20_000, 950_000)
        data = self.rng.getrandbits(128).to_bytes(16, "big")
        return {
            "$type": "blob",
            "ref": dagcbor.link(dagcbor.cid_for_raw(data)),
            "mimeType": self.rng.choice(_MIME_TYPES),
            "size": size,
        }

    def images(self) -> dict[str, Any]:
        return {
            "$type": "app.bsky.embed.images",
            "images": [
                {
                    "alt": self.words(0, 6),
                    "image": self.blob(),
                    "aspectRatio": {
                        "width": self.rng.randint(300, 4000),
                        "height": self.rng.randint(300, 4000),
                    },
                }
                for _ in range(self.rng.randint(1, 4))
            ],
        }

    def post(
        self,
        created_at: str,
        mentions: list[tuple[str, str]],
        parent: PostRef | None,
        quote: PostRef | None,
    ) -> dict[str, Any]:
        """A post; `mentions` are (handle, did) pairs that may become mention facets."""
        rng = self.rng
        text = bytearray()
        facets: list[dict[str, Any]] = []

        def add(piece: str, feature: dict[str, Any] | None = None) -> None:
            if text:
                text.extend(b" ")
            start = len(text)
            text.extend(piece.encode())
            if feature is not None:
                facets.append(
                    {"index": {"byteStart": start, "byteEnd": len(text)}, "features": [feature]}
                )

        add(self.words(1, 12))
        if mentions and rng.random() < 0.2:
            handle, did = rng.choice(mentions)
            add(f"@{handle}", {"$type": "app.bsky.richtext.facet#mention", "did": did})
        if rng.random() < 0.15:
            uri = f"https://example.com/{rng.choice(_WORDS)}/{rng.getrandbits(24)}"
            add(uri, {"$type": "app.bsky.richtext.facet#link", "uri": uri})
        if rng.random() < 0.15:
            tag = rng.choice(_TAGS)
            add(f"#{tag}", {"$type": "app.bsky.richtext.facet#tag", "tag": tag})
        if rng.random() < NUL_TEXT_PROBABILITY:
            add("nul\x00inside")
        record: dict[str, Any] = {
            "$type": POST,
            "text": text.decode(),
            "createdAt": created_at,
            "langs": rng.choice(_LANGS),
        }
        if facets:
            record["facets"] = facets
        if parent is not None:
            record["reply"] = {"root": parent.root.value(), "parent": parent.ref.value()}
        embed = self._embed(quote)
        if embed is not None:
            record["embed"] = embed
        if rng.random() < 0.03:
            record["tags"] = rng.sample(_TAGS, 2)
        return record

    def _embed(self, quote: PostRef | None) -> dict[str, Any] | None:
        rng = self.rng
        if quote is not None:
            quoted = {"$type": "app.bsky.embed.record", "record": quote.ref.value()}
            if rng.random() < 0.3:
                return {
                    "$type": "app.bsky.embed.recordWithMedia",
                    "record": quoted,
                    "media": self.images(),
                }
            return quoted
        roll = rng.random()
        if roll < 0.12:
            return self.images()
        if roll < 0.18:
            external: dict[str, Any] = {
                "uri": f"https://news.example.org/{rng.getrandbits(32):x}",
                "title": self.words(2, 8),
                "description": self.words(0, 15),
            }
            if rng.random() < 0.5:
                external["thumb"] = self.blob()
            return {"$type": "app.bsky.embed.external", "external": external}
        return None

    def subject(self, collection: str, ref: StrongRef, created_at: str) -> dict[str, Any]:
        """A like or repost of `ref`."""
        return {"$type": collection, "subject": ref.value(), "createdAt": created_at}

    def graph(self, collection: str, did: str, created_at: str) -> dict[str, Any]:
        """A follow or block of `did`."""
        return {"$type": collection, "subject": did, "createdAt": created_at}

    def profile(self, handle: str, created_at: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "$type": PROFILE,
            "displayName": f"{self.rng.choice(_NAMES)} {handle.split('.')[0]}",
            "description": self.words(0, 20),
            "createdAt": created_at,
        }
        if self.rng.random() < 0.7:
            record["avatar"] = self.blob()
        if self.rng.random() < 0.3:
            record["banner"] = self.blob()
        return record

    def graph_list(self, created_at: str) -> dict[str, Any]:
        purpose = self.rng.choice(("curatelist", "curatelist", "modlist"))
        return {
            "$type": LIST,
            "purpose": f"app.bsky.graph.defs#{purpose}",
            "name": self.words(1, 4),
            "description": self.words(0, 12),
            "createdAt": created_at,
        }

    def listitem(self, list_uri: str, did: str, created_at: str) -> dict[str, Any]:
        return {"$type": LISTITEM, "subject": did, "list": list_uri, "createdAt": created_at}

    def feed_generator(self, created_at: str) -> dict[str, Any]:
        return {
            "$type": FEED_GENERATOR,
            "did": FEED_SERVICE_DID,
            "displayName": self.words(1, 3)[:24],
            "description": self.words(0, 15),
            "createdAt": created_at,
        }

    def starterpack(self, list_uri: str, feeds: list[str], created_at: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "$type": STARTERPACK,
            "name": self.words(1, 4),
            "description": self.words(0, 12),
            "list": list_uri,
            "createdAt": created_at,
        }
        if feeds:
            record["feeds"] = [{"uri": uri} for uri in feeds[:3]]
        return record

    def note(self, created_at: str) -> dict[str, Any]:
        """The custom lexicon: also carries integers, booleans, nested maps and raw bytes."""
        return {
            "$type": CUSTOM_NOTE,
            "body": self.words(1, 20),
            "priority": self.rng.randint(-5, 1000),
            "pinned": self.rng.random() < 0.2,
            "meta": {"source": "devnet", "revision": self.rng.randint(0, 9)},
            "digest": self.rng.getrandbits(64).to_bytes(8, "big"),
            "createdAt": created_at,
        }
