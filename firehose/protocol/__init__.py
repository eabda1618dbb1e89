"""The AT Protocol decoder: bytes in, values out.

Owns: CIDs (`cid`), strict DAG-CBOR and the record JSON form (`cbor`), CAR v1 reading with
block hash checks (`car`), identifier syntax (`syntax`), subscribeRepos frames -> `model`
events (`frames`), and the MST walk for whole-repo exports (`mst`).

Invariants (each is tested, including by fuzzing in tests/test_fuzz_protocol.py):

* Pure: no I/O, no asyncio, no global state beyond constants; safe to call from threads.
* Every malformed input raises `ProtocolError` (never another exception), whose `reason`
  is one of `errors.REASONS` (a bounded metric label) and `detail` is <= 200 chars.
* Bounded time and memory: input sizes are capped (`FrameLimits`, `read_car` limits),
  DAG-CBOR nesting is capped (`cbor.MAX_RECORD_DEPTH`), nothing recurses on input depth
  beyond that cap, and work is linear in the input size.
* Nothing unverified escapes: every CAR block is sha256-checked against its CID before it is
  read (`car.read_car` checks all as it reads, `car.read_car_lazily` each one read).
"""

from firehose.protocol.errors import REASONS, CarError, CborError, FrameError, ProtocolError

__all__ = ["REASONS", "CarError", "CborError", "FrameError", "ProtocolError"]
