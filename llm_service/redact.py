"""What must never leave the process: credentials in URLs and API keys in query strings.

`mask_url` is the one way an upstream's URL is shown anywhere (health, error frames, logs, the
command line, configuration errors): its password, or a username standing alone (a token),
becomes `********`, and so do secret query parameters. `redact_text` does the same to any
text, a log line say: every `scheme://user:pass@` and every `token=`-like query parameter,
matched on the decoded parameter name (a client may write `tok%65n`) and masked to the end of
its value, whatever characters the value holds.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "********"
SECRET_PARAMETERS = frozenset({"token", "key", "api_key", "apikey", "access_token", "password"})

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s\"]+)@")
_PARAMETER = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;\s\"?#]+)=(?P<value>[^&;\s\"#]*)")


def mask_url(url: str) -> str:
    """`url` with its credentials masked: `http://ops:********@host:11434`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if port is not None:
            host = f"{host}:{port}"
        user = parts.username if parts.password is not None else None
        netloc = f"{user}:{MASK}@{host}" if user else f"{MASK}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=_mask_parameters(parts.query)))


def redact_text(text: str) -> str:
    """`text` with URL credentials and secret query parameters masked."""
    if "@" in text:
        text = _USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _PARAMETER.sub(_mask_parameter, text)
    return text


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"


def _mask_parameter(match: re.Match[str]) -> str:
    if unquote_plus(match["name"]).strip().lower() not in SECRET_PARAMETERS:
        return match[0]
    return f"{match['sep']}{match['name']}={MASK}"


def _mask_parameters(query: str) -> str:
    return _PARAMETER.sub(_mask_parameter, "?" + query)[1:] if query else query


class RedactSecrets(logging.Filter):
    """A logging filter that masks credentials in a record's text (see `redact_text`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def protect_server_logs() -> None:
    """Install the redaction on uvicorn's loggers, which log each request's path and query,
    for an embedding that has not called `logs.configure_logging` (which redacts every line)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
