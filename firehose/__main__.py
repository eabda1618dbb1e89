"""`python -m firehose` is `firehose run` (the Docker image's CMD)."""

import sys

from firehose.cli import main

raise SystemExit(main(sys.argv[1:]))
