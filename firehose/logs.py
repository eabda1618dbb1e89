"""Logging set-up: LOG_LEVEL and LOG_FORMAT (`text` for humans and grep, `json` for shippers).

Text lines are `<time> <LEVEL> <message>` so the user guide's lines (`[BACKFILL] ...`) appear
verbatim and `docker-compose logs python-worker | grep BACKFILL` finds them.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from datetime import UTC, datetime
from types import TracebackType

from firehose.redact import redact_secrets

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"


# Every line, ours or a library's, message and traceback alike, is masked last: a connection
# error or a traceback can quote DATABASE_URL, and the password must never reach a log
# (issue 5, boundaries). One regex pass over a line that holds '@' or "password": log lines
# are rare next to the events, so this costs nothing measurable.
class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, then secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_secrets(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug.
    # pgserver logs every initdb/pg_ctl step at INFO; our own line says what matters.
    # pgserver asks platformdirs for a runtime dir it does not need; containers have none.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    for noisy in ("websockets", "asyncio", "aiohttp.access", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # An exception nobody catches is printed by sys.excepthook, not by logging: mask it too.
    sys.excepthook = _redacting_excepthook


def _redacting_excepthook(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    sys.stderr.write(redact_secrets("".join(traceback.format_exception(kind, value, tb))))
