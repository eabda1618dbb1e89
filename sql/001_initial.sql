-- 001_initial: the whole first schema of the indexer.
--
-- Conventions (docs/ARCHITECTURE.md, DESIGN.md "Invariants"):
--  * Every row written from a repo remembers the repo `rev` (a TID) that wrote it. Revs are
--    compared as text byte-wise, hence `COLLATE "C"`: TIDs are base32-sortable, and the C
--    collation makes text order equal TID order whatever the database's locale is.
--  * Identifier columns (AT-URIs, DIDs, CIDs) are also `COLLATE "C"`: byte-wise comparison is
--    cheaper for every index insert than a locale-aware one, and it makes `uri` prefix ranges
--    ('at://<did>/' .. 'at://<did>0') usable on the primary key, which is how the rows of a
--    deleted account are found in the typed tables without one more index per table.
--  * Indexes cost write speed (DESIGN.md: ~100k rows/s is the ceiling), so each table gets only
--    its primary key plus the lookups a user of the data needs most.
--  * This file is never edited once it has landed: the migrator stores its sha256 and refuses
--    to start when it changes. Changes go into a new numbered file.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per cursor: 'firehose' (live stream of worker 0), 'firehose:<i>' (sharded live
-- workers), 'backfill' (repo enumeration). Written in the same transaction as the rows it
-- covers (invariant 1).
CREATE TABLE firehose_cursor (
    service          text NOT NULL UNIQUE,
    cursor           bigint,
    last_event_time  timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Every live record of every collection, in the atproto JSON form.
CREATE TABLE records (
    uri         text COLLATE "C" PRIMARY KEY,
    did         text COLLATE "C" NOT NULL,
    collection  text COLLATE "C" NOT NULL,
    rkey        text COLLATE "C" NOT NULL,
    cid         text COLLATE "C" NOT NULL,
    rev         text COLLATE "C" NOT NULL,
    record      jsonb NOT NULL,
    created_at  timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
-- "everything of one account" (and account deletion).
CREATE INDEX records_did_idx ON records (did);
-- "the newest records of a collection".
CREATE INDEX records_collection_created_at_idx ON records (collection, created_at);

-- Invariant 2: a delete leaves (uri, rev) behind so that an older create, from a backfill
-- snapshot or a replay, cannot resurrect the record. Only the greatest rev is kept.
CREATE TABLE record_tombstones (
    uri         text COLLATE "C" PRIMARY KEY,
    did         text COLLATE "C",
    rev         text COLLATE "C" NOT NULL,
    deleted_at  timestamptz DEFAULT now()
);

-- One row per repo (account). `rev`/`data_cid`: the latest commit applied (never goes
-- backwards). `status`: active, deactivated, takendown, suspended, deleted, or whatever other
-- string the relay sends; `deleted` removes the account's rows and blocks later writes.
CREATE TABLE actors (
    did         text COLLATE "C" PRIMARY KEY,
    handle      text,
    status      text NOT NULL DEFAULT 'active',
    active      boolean NOT NULL DEFAULT true,
    rev         text COLLATE "C",
    data_cid    text,
    seq         bigint,
    updated_at  timestamptz
) WITH (fillfactor = 80);  -- rev/updated_at change on every commit: leave room for HOT updates

-- Typed tables of the Bluesky app (app.bsky.*). Each one mirrors the `records` row of the same
-- uri (same rev, same guards), with the fields people query pulled out into columns. Fields of
-- the wrong type are NULL; indexed text longer than firehose.storage.rows.MAX_INDEXED_TEXT_*
-- is NULL (a btree entry must stay under ~2700 bytes).

-- app.bsky.feed.post
CREATE TABLE posts (
    uri               text COLLATE "C" PRIMARY KEY,
    did               text COLLATE "C" NOT NULL,
    rkey              text COLLATE "C" NOT NULL,
    cid               text COLLATE "C" NOT NULL,
    rev               text COLLATE "C" NOT NULL,
    created_at        timestamptz,
    indexed_at        timestamptz NOT NULL DEFAULT now(),
    text              text,
    langs             text[],
    reply_root_uri    text COLLATE "C",
    reply_parent_uri  text COLLATE "C",
    quote_uri         text COLLATE "C",
    embed_kind        text,     -- images | video | external | record | recordWithMedia | NULL
    mentions          text[],   -- DIDs of #mention facets
    links             text[],   -- URIs of #link facets
    tags              text[]    -- #tag facets plus the post's own `tags`
);
-- threads: all replies under one root; most posts are not replies, so keep it partial.
CREATE INDEX posts_reply_root_uri_idx ON posts (reply_root_uri) WHERE reply_root_uri IS NOT NULL;

-- app.bsky.feed.like
CREATE TABLE likes (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    subject_uri  text COLLATE "C",
    subject_cid  text COLLATE "C"
);
CREATE INDEX likes_subject_uri_idx ON likes (subject_uri);

-- app.bsky.feed.repost
CREATE TABLE reposts (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    subject_uri  text COLLATE "C",
    subject_cid  text COLLATE "C"
);
CREATE INDEX reposts_subject_uri_idx ON reposts (subject_uri);

-- app.bsky.graph.follow
CREATE TABLE follows (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    subject_did  text COLLATE "C"
);
CREATE INDEX follows_subject_did_idx ON follows (subject_did);

-- app.bsky.graph.block
CREATE TABLE blocks (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    subject_did  text COLLATE "C"
);
CREATE INDEX blocks_subject_did_idx ON blocks (subject_did);

-- app.bsky.actor.profile (rkey 'self')
CREATE TABLE profiles (
    uri           text COLLATE "C" PRIMARY KEY,
    did           text COLLATE "C" NOT NULL,
    rkey          text COLLATE "C" NOT NULL,
    cid           text COLLATE "C" NOT NULL,
    rev           text COLLATE "C" NOT NULL,
    created_at    timestamptz,
    indexed_at    timestamptz NOT NULL DEFAULT now(),
    display_name  text,
    description   text,
    avatar_cid    text COLLATE "C",
    banner_cid    text COLLATE "C"
);

-- app.bsky.graph.list
CREATE TABLE lists (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    name         text,
    purpose      text,
    description  text
);

-- app.bsky.graph.listitem
CREATE TABLE list_items (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    list_uri     text COLLATE "C",
    subject_did  text COLLATE "C"
);
CREATE INDEX list_items_list_uri_idx ON list_items (list_uri);

-- app.bsky.feed.generator
CREATE TABLE feed_generators (
    uri           text COLLATE "C" PRIMARY KEY,
    did           text COLLATE "C" NOT NULL,
    rkey          text COLLATE "C" NOT NULL,
    cid           text COLLATE "C" NOT NULL,
    rev           text COLLATE "C" NOT NULL,
    created_at    timestamptz,
    indexed_at    timestamptz NOT NULL DEFAULT now(),
    service_did   text COLLATE "C",
    display_name  text,
    description   text
);

-- app.bsky.graph.starterpack
CREATE TABLE starter_packs (
    uri          text COLLATE "C" PRIMARY KEY,
    did          text COLLATE "C" NOT NULL,
    rkey         text COLLATE "C" NOT NULL,
    cid          text COLLATE "C" NOT NULL,
    rev          text COLLATE "C" NOT NULL,
    created_at   timestamptz,
    indexed_at   timestamptz NOT NULL DEFAULT now(),
    name         text,
    description  text,
    list_uri     text COLLATE "C"
);
