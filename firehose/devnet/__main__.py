"""`python -m firehose.devnet --seed 1 --events 5000 --truth truth.json`"""

from firehose.devnet.cli import main

main()
