"""Coverage-guided fuzzing of the protocol decoder with atheris (run by hand, not pytest):

    pip install atheris
    python tests/fuzz/atheris_frames.py -max_total_time=600 [corpus_dir]

Any exception other than ProtocolError is a bug (atheris reports it with the input).
"""

from __future__ import annotations

import contextlib
import sys

import atheris  # type: ignore[import-not-found]

with atheris.instrument_imports():
    from firehose.protocol.car import read_car
    from firehose.protocol.cbor import decode_record
    from firehose.protocol.errors import ProtocolError
    from firehose.protocol.frames import decode_frame

DECODERS = (decode_frame, read_car, decode_record)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    decoder = DECODERS[data[0] % len(DECODERS)]
    with contextlib.suppress(ProtocolError):  # anything else is a finding
        decoder(data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
