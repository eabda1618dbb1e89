"""The devnet: a local AT Protocol relay producing realistic, signed, deterministic traffic.

Owns: account keys and did:plc identities (`keys`, `plc`), repositories with their MST and
signed commits (`mst`, `repo`, `tid`), record values (`records`), the event generator and its
virtual clock with a history phase (`generator`, `clock`, `accounts`), the truth file
(`truth`), frame encoding (`frames`, `faults`), the subscribeRepos server (`relay`), the
HTTP side for the backfill (`network`: PDS hosts and PLC directory in `pds`, the repo
listing and listReposByCollection in `directory`, pre-populated repos in `prebuilt`, the
year-long history model in `model`, served CAR files in `carfile`, HTTP faults in
`httpfaults`, the counters of `/devnet/stats` in `stats`) and the command line (`cli`,
`python -m firehose.devnet`; the names and defaults it offers in `options`).
docs/devnet.md describes the endpoints, flags and truth-file keys.

Invariants:

* Deterministic by seed: the same seed and parameters give byte-identical frames (a virtual
  clock drives every timestamp, rev and record key; no hash-ordered iteration).
* Truth = final state: `Generator.truth()` / the truth file describe what an indexer must hold
  after consuming every event up to `last_seq`, in the format of docs/ARCHITECTURE.md.
* Independent encoder: DAG-CBOR is written with cbor2 (plus a hand-written encoder for the
  fixed MST node shape, cross-checked against cbor2) and never imports `firehose.protocol`,
  so the devnet and the worker's decoder check each other.
* Devnet keys are derived from the seed and are therefore public: never use them elsewhere.
* Importing the package imports nothing: `firehose`'s parser names the devnet's options for
  every command (`options`), and only a devnet that starts loads the relay and its server.
"""
