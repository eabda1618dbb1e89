"""The devnet's --forge-every: forged commits fail verification, keep out of the truth and
leave the chain of the genuine commits intact."""

from __future__ import annotations

from firehose.devnet.generator import Generator
from firehose.devnet.relay import DevnetConfig, DevnetRelay
from firehose.model import CommitEvent
from firehose.protocol.frames import decode_frame
from firehose.protocol.signature import parse_multikey, verify_commit

FORGE_EVERY = 7


def test_forged_commits_fail_and_the_genuine_chain_continues() -> None:
    generator = Generator(seed=3, accounts=20, forge_every=FORGE_EVERY)
    events = [decode_frame(frame) for frame in generator.frames(700)]
    keys = {a.did: parse_multikey(a.key.multikey) for a in generator.accounts}
    head: dict[str, tuple[str | None, str | None]] = {}  # did -> genuine (rev, data)
    forged = genuine = 0
    for event in events:
        if not isinstance(event, CommitEvent):
            continue
        assert event.commit_block is not None
        expected = head.get(event.did, (None, None))
        # Every commit, forged or not, chains onto the last GENUINE commit of its repo.
        assert (event.since, event.prev_data) == expected
        if event.seq % FORGE_EVERY == 0:
            forged += 1
            assert not verify_commit(keys[event.did], event.commit_block)
            assert [w.record["text"] for w in event.writes if w.record] == ["forged"]
        else:
            genuine += 1
            assert verify_commit(keys[event.did], event.commit_block)
            head[event.did] = (event.rev, event.data_cid)
    assert forged == 700 // FORGE_EVERY and genuine > 300
    truth = generator.truth()
    assert len(truth["forged"]) == forged
    assert not set(truth["forged"]) & set(truth["records"])
    assert not set(truth["forged"]) & set(truth["deleted"])


def test_without_the_flag_nothing_is_forged() -> None:
    generator = Generator(seed=3, accounts=20)
    events = [decode_frame(frame) for frame in generator.frames(300)]
    keys = {a.did: parse_multikey(a.key.multikey) for a in generator.accounts}
    commits = [e for e in events if isinstance(e, CommitEvent)]
    assert commits and all(verify_commit(keys[e.did], e.commit_block or b"") for e in commits)
    assert "forged" not in generator.truth()


async def test_relay_truth_file_lists_the_forged_records() -> None:
    relay = DevnetRelay(DevnetConfig(seed=4, accounts=10, events=200, pds_hosts=1))
    relay.generator.forge_every = 10  # what `--forge-every 10` does (firehose.devnet.cli)
    await relay.start()
    try:
        await relay.wait_generated()
        truth = relay.truth()
    finally:
        await relay.stop()
    assert len(truth["forged"]) == 20
    assert not set(truth["forged"]) & set(truth["records"])
