"""Logging set-up: LOG_LEVEL and LOG_FORMAT (`text` for humans and grep, `json` for shippers).

Text lines are `<time> <LEVEL> <message>` so the user guide's lines (`[BACKFILL] ...`) appear
verbatim and `docker-compose logs python-worker | grep BACKFILL` finds them.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug.
    # pgserver logs every initdb/pg_ctl step at INFO; our own line says what matters.
    # pgserver asks platformdirs for a runtime dir it does not need; containers have none.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    for noisy in ("websockets", "asyncio", "aiohttp.access", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
