"""PURE: secrets out of text that may be shown (log lines, error messages, /status).

`DATABASE_URL` carries the database password (``postgresql://user:PASSWORD@host/db``), and a
connection error, a configuration error or a traceback may quote it. Every log line goes
through `redact_secrets` (firehose.logs formats it last), so a message that quotes a URL
cannot leak the password whatever code path produced it; `redact_dsn` is for code that
shows one URL on purpose. Imports nothing of the project: envparse uses it too.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://user:PASSWORD@ : everything between the first ':' after the user and the LAST '@'
# of the token, so a password holding an unescaped '@' is masked whole (masking too much of
# a log line is harmless, too little is a leak).
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/?#@'\"]*:)[^\s'\"]*(@)")
# libpq keyword form and URL query parameters: password=... (space, & or a quote ends it).
_KEYWORD_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&'\"]+)")


def redact_secrets(text: str) -> str:
    """`text` with every URL password and ``password=`` value replaced by ``***``."""
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\1" + MASK + r"\2", text)
    if "assword" in text or "ASSWORD" in text:
        text = _KEYWORD_PASSWORD.sub(r"\1" + MASK, text)
    return text


def redact_password(text: str, url: str, max_chars: int = 300) -> str:
    """`text` (an error message, which may quote connection details in any form) without
    `url`'s password wherever it appears, nor any URL or keyword password, cut to
    `max_chars`."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, MASK)
    text = redact_secrets(text)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def redact_dsn(url: str) -> str:
    """A URL with its password (if any) replaced by ``***``; anything unparsable redacted as
    text."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return redact_secrets(url)
    if password is None:
        return redact_secrets(url)
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:{MASK}@{hostinfo}"
    return redact_secrets(
        urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    )
