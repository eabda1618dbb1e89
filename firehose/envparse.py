"""Parsing of environment variables, shared by every component's settings.

Design invariant 6: a bad value raises `ConfigError` with a message naming the variable;
it never silently becomes a default. This module imports nothing of the project but the
pure `firehose.redact`, so both `firehose.settings` and `backfill.settings` can build on it
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from firehose.redact import redact_secrets

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A bad environment value. The message names the variable."""


class Env:
    """Typed reads of an environment mapping; unset or blank means the default."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, TypeError) as exc:
            # The message is printed and logged: a bad DATABASE_URL must not show its
            # password there (issue 5, boundaries).
            raise ConfigError(f"{name}={redact_secrets(raw)!r} is invalid: {exc}") from None


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer between {lo} and {hi}")
        return value

    return parse


def choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return parse


def boolean(raw: str) -> bool:
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false")
