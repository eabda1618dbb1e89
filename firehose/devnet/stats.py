"""What the devnet's HTTP side counts, for tests and benchmarks: `/devnet/stats`.

Per PDS host: requests and statuses, getRepo requests per did (every attempt, and the
complete CARs sent), getRecord requests per did, getRepo requests in flight (now and the
maximum), and per XRPC method (NSID) the requests answered and the response body bytes
sent; the relay port's own XRPC methods (listRepos, listReposByCollection) likewise. The
bytes are the HTTP body (the CAR or the JSON), without headers or chunk framing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class HttpStats:
    """What tests assert about the backfill's politeness, per host and overall."""

    def __init__(self, hosts: int) -> None:
        self.get_repo: list[Counter[str]] = [Counter() for _ in range(hosts)]  # every attempt
        self.get_repo_ok: list[Counter[str]] = [Counter() for _ in range(hosts)]  # full CARs
        self.get_record: list[Counter[str]] = [Counter() for _ in range(hosts)]
        # Per XRPC method (NSID): requests and response body bytes, per host and the relay.
        self.method_requests: list[Counter[str]] = [Counter() for _ in range(hosts)]
        self.method_bytes: list[Counter[str]] = [Counter() for _ in range(hosts)]
        self.relay_requests: Counter[str] = Counter()
        self.relay_bytes: Counter[str] = Counter()
        self.requests = [0] * hosts
        self.statuses: list[Counter[int]] = [Counter() for _ in range(hosts)]
        self.inflight = [0] * hosts  # getRepo requests being answered now
        self.max_inflight = [0] * hosts
        self.total_inflight = 0
        self.total_max_inflight = 0
        self.plc_requests = 0

    def enter(self, host: int) -> None:
        self.inflight[host] += 1
        self.total_inflight += 1
        self.max_inflight[host] = max(self.max_inflight[host], self.inflight[host])
        self.total_max_inflight = max(self.total_max_inflight, self.total_inflight)

    def leave(self, host: int) -> None:
        self.inflight[host] -= 1
        self.total_inflight -= 1

    def count(self, host: int | None, method: str, body_bytes: int) -> None:
        """One answered XRPC request (host None: the relay port)."""
        requests = self.relay_requests if host is None else self.method_requests[host]
        sent = self.relay_bytes if host is None else self.method_bytes[host]
        requests[method] += 1
        sent[method] += body_bytes

    @staticmethod
    def _methods(requests: Counter[str], sent: Counter[str]) -> dict[str, dict[str, int]]:
        return {m: {"requests": requests[m], "bytes": sent[m]} for m in sorted(requests)}

    def snapshot(self, endpoints: list[str]) -> dict[str, Any]:
        requests, sent = Counter(self.relay_requests), Counter(self.relay_bytes)
        for i in range(len(self.method_requests)):
            requests.update(self.method_requests[i])
            sent.update(self.method_bytes[i])
        return {
            "methods": self._methods(requests, sent),
            "relay_methods": self._methods(self.relay_requests, self.relay_bytes),
            "inflight": self.total_inflight,
            "max_inflight": self.total_max_inflight,
            "plc_requests": self.plc_requests,
            "hosts": [
                {
                    "endpoint": endpoint,
                    "requests": self.requests[i],
                    "statuses": {str(k): v for k, v in sorted(self.statuses[i].items())},
                    "get_repo": dict(sorted(self.get_repo[i].items())),
                    "get_repo_ok": dict(sorted(self.get_repo_ok[i].items())),
                    "get_record": dict(sorted(self.get_record[i].items())),
                    "methods": self._methods(self.method_requests[i], self.method_bytes[i]),
                    "inflight": self.inflight[i],
                    "max_inflight": self.max_inflight[i],
                }
                for i, endpoint in enumerate(endpoints)
            ],
        }
