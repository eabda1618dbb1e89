"""Unified AT Protocol firehose + backfill indexer into PostgreSQL.

The package owns the protocol decoder (`protocol`, pure), storage (`storage`), the live path
(`live`), the devnet (`devnet`), metrics, settings and the worker that composes them. See
docs/ARCHITECTURE.md for the contracts between those parts.
"""

__version__ = "0.1.0"
