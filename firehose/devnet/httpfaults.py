"""HTTP faults of the devnet PDS hosts, so the backfill's politeness and retries get tested.

Every flag takes ``[HOST:]VALUE`` and may be repeated: HOST is a PDS index (0, 1, ...) or
omitted for every host; a per-host value overrides the global one. Triggers (``P``) are
either a probability in [0, 1) written with a decimal point (``0.2``: a seeded coin per
request) or an integer N >= 1 (``4``: deterministically every 4th request of that host);
``0`` is off.

* ``--rate-limit N/W``    at most N XRPC requests per W-second fixed window (aligned to the
  epoch) per host. Every response carries the headers atproto PDSes send
  (``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` = epoch seconds when the
  window ends, ``RateLimit-Policy: N;w=W``); past the limit the answer is 429
  ``{"error": "RateLimitExceeded"}`` with the same headers and ``Retry-After``.
* ``--429-without-headers`` 429 answers (rate limit or storm) carry no rate-limit headers
  and no Retry-After: the client must fall back to its own backoff.
* ``--storm-429 P``       answer 429 regardless of the limit (``Retry-After: 1``).
* ``--fail-5xx P``        answer 500/502/503/504 (rotating) with an XRPC error body.
* ``--slow-host H:MS``    add MS milliseconds before answering each request of host H.
* ``--truncate-car P``    getRepo only: stop the CAR body in the middle of a block section
  and end the (chunked) response normally, so only a CAR parser notices.

Faults apply to ``/xrpc/`` requests of PDS hosts; the order is slow, rate limit, storm,
5xx, then truncation. Random triggers draw from ``random.Random(f"http|{seed}|{host}|...")``,
so a given arrival order of requests always meets the same faults.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

_TRIGGER_RE = re.compile(r"^(?:(\d+):)?(.+)$")
_RATE_RE = re.compile(r"^(?:(\d+):)?(\d+)/(\d+(?:\.\d+)?)s?$")
SERVER_ERRORS = (500, 502, 503, 504)
STORM_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Trigger:
    """A fault that fires with a probability, or on every Nth request."""

    probability: float = 0.0
    every: int = 0

    @classmethod
    def parse(cls, text: str) -> Trigger:
        if "." in text:
            probability = float(text)
            if not 0 <= probability <= 1:
                raise ValueError(f"probability out of [0, 1]: {text}")
            return cls(probability=probability)
        every = int(text)
        if every < 0:
            raise ValueError(f"negative count: {text}")
        return cls(every=every)

    def fires(self, count: int, rng: random.Random) -> bool:
        """`count` is the 1-based number of this request on the host."""
        if self.every:
            return count % self.every == 0
        return self.probability > 0 and rng.random() < self.probability


def _split_host(text: str) -> tuple[int | None, str]:
    match = _TRIGGER_RE.match(text.strip())
    if match is None:
        raise ValueError(f"bad fault value: {text!r}")
    host = match.group(1)
    return (int(host) if host is not None else None), match.group(2)


def _pick(values: tuple[tuple[int | None, T], ...], host: int, default: T) -> T:
    chosen = default
    for where, value in values:  # global first, then the host's own value wins
        if where is None:
            chosen = value
    for where, value in values:
        if where == host:
            chosen = value
    return chosen


@dataclass(frozen=True)
class HttpFaults:
    """Parsed fault flags: each a tuple of (host or None = all, value)."""

    rate_limit: tuple[tuple[int | None, tuple[int, float]], ...] = ()
    without_headers: bool = False
    storm_429: tuple[tuple[int | None, Trigger], ...] = ()
    fail_5xx: tuple[tuple[int | None, Trigger], ...] = ()
    slow_ms: tuple[tuple[int | None, int], ...] = ()
    truncate_car: tuple[tuple[int | None, Trigger], ...] = ()

    @classmethod
    def parse(
        cls,
        *,
        rate_limit: list[str] | None = None,
        without_headers: bool = False,
        storm_429: list[str] | None = None,
        fail_5xx: list[str] | None = None,
        slow_host: list[str] | None = None,
        truncate_car: list[str] | None = None,
    ) -> HttpFaults:
        def triggers(texts: list[str] | None) -> tuple[tuple[int | None, Trigger], ...]:
            return tuple((h, Trigger.parse(v)) for h, v in map(_split_host, texts or []))

        limits = []
        for text in rate_limit or []:
            match = _RATE_RE.match(text.strip())
            if match is None:
                raise ValueError(f"--rate-limit wants [HOST:]N/SECONDS, got {text!r}")
            host = int(match.group(1)) if match.group(1) is not None else None
            limits.append((host, (int(match.group(2)), float(match.group(3)))))
        slow = tuple((h, int(v)) for h, v in map(_split_host, slow_host or []))
        return cls(
            rate_limit=tuple(limits),
            without_headers=without_headers,
            storm_429=triggers(storm_429),
            fail_5xx=triggers(fail_5xx),
            slow_ms=slow,
            truncate_car=triggers(truncate_car),
        )

    def for_host(self, host: int, seed: int) -> HostFaults:
        return HostFaults(
            host=host,
            seed=seed,
            rate_limit=_pick(self.rate_limit, host, None),
            without_headers=self.without_headers,
            storm_429=_pick(self.storm_429, host, Trigger()),
            fail_5xx=_pick(self.fail_5xx, host, Trigger()),
            slow_ms=_pick(self.slow_ms, host, 0),
            truncate_car=_pick(self.truncate_car, host, Trigger()),
        )


@dataclass
class HostFaults:
    """The faults of one host, with its request counters and seeded coins."""

    host: int
    seed: int
    rate_limit: tuple[int, float] | None
    without_headers: bool
    storm_429: Trigger
    fail_5xx: Trigger
    slow_ms: int
    truncate_car: Trigger
    requests: int = 0
    car_requests: int = 0
    window_start_s: float = 0.0
    window_count: int = 0
    rngs: dict[str, random.Random] = field(default_factory=dict)

    def rng(self, name: str) -> random.Random:
        if name not in self.rngs:
            self.rngs[name] = random.Random(f"http|{self.seed}|{self.host}|{name}")
        return self.rngs[name]

    def admit(self) -> tuple[int | None, dict[str, str]]:
        """Count one XRPC request: (fault status or None, headers to add to the answer)."""
        self.requests += 1
        headers: dict[str, str] = {}
        limited = False
        if self.rate_limit is not None:
            limit, window_s = self.rate_limit
            now = time.time()
            start = now - now % window_s
            if start != self.window_start_s:
                self.window_start_s, self.window_count = start, 0
            self.window_count += 1
            limited = self.window_count > limit
            reset = int(start + window_s + 0.999)  # epoch seconds, rounded up
            headers = {
                "RateLimit-Limit": str(limit),
                "RateLimit-Remaining": str(max(0, limit - self.window_count)),
                "RateLimit-Reset": str(reset),
                "RateLimit-Policy": f"{limit};w={window_s:g}",
            }
            if limited:
                headers["Retry-After"] = str(max(1, reset - int(now)))
        if limited:
            return 429, {} if self.without_headers else headers
        if self.storm_429.fires(self.requests, self.rng("storm")):
            retry = {} if self.without_headers else {"Retry-After": str(STORM_RETRY_AFTER_S)}
            return 429, {**({} if self.without_headers else headers), **retry}
        if self.fail_5xx.fires(self.requests, self.rng("5xx")):
            return self.rng("5xx-kind").choice(SERVER_ERRORS), headers
        return None, headers

    def truncate(self) -> bool:
        """Whether this getRepo answer is cut short (call once per served CAR)."""
        self.car_requests += 1
        return self.truncate_car.fires(self.car_requests, self.rng("truncate"))
