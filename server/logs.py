"""Structured logs: one JSON object a line. Only codes, counts and opaque ids are logged —
never pseudonyms, note texts, circle titles or addresses (uvicorn's access log is off)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                value = _plain(value)
                entry[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """An extra field as logged: codes and counts pass; objects (such as the `websocket`
    that websockets' protocol logger attaches, a weak proxy that may be dead by now, whose
    text carries the peer's address) are logged as their type name only."""
    kind = type(value)  # not isinstance: a dead weak proxy raises on that
    if value is None or issubclass(kind, (str, int, float, bool)):
        return value
    return f"<{kind.__name__}>"


# Candidates, each checked with `ipaddress` before it is blanked (so a time like 12:30:45 or a
# pid in brackets stays): IPv6 in brackets (with a zone and a port, or not), IPv6 bare (any
# compressed form, a zone, an IPv4 tail: ::ffff:10.0.0.1), IPv4 (with a port, or not).
_ADDRESS = re.compile(
    r"\[(?P<b6>[0-9A-Fa-f:.]+(?:%[\w.-]+)?)\](?::\d+)?"
    r"|(?<![\w.])(?P<v6>[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?:%[\w.-]+)?)(?![\w:])"
    r"|(?<![\w.])(?P<v4>\d{1,3}(?:\.\d{1,3}){3})(?::\d+)?(?![\w.])"
)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _blank(match: re.Match[str]) -> str:
    if match.group("v4") is not None:  # leading zeros too (010.000.000.001)
        return "-" if all(int(part) <= 255 for part in match.group("v4").split(".")) else match.group(0)
    text = match.group("b6") or match.group("v6")
    if _is_address(text):
        return "-"
    if text.startswith(":") and not text.startswith("::") and _is_address(text[1:]):
        return ":-"  # "addr:2001:db8::1": the colon was the text's, not the address's
    return match.group(0)


def scrub(text: str) -> str:
    """`text` with every IP address (v4 or v6, in any written form, with its port) as `-`."""
    return _ADDRESS.sub(_blank, text) if ("." in text or ":" in text) else text


_WEBSOCKETS_DIR = f"{os.sep}websockets{os.sep}"
_BAD_UTF8 = "Invalid UTF-8 sequence received from client."  # uvicorn's websockets_sansio_impl


class NoAddresses(logging.Filter):
    """For uvicorn's logger: no client addresses and no wire dumps (F18).

    uvicorn logs every WebSocket upgrade as `ADDRESS - "WebSocket /ws" [accepted]` at INFO,
    and hands its logger to websockets, whose protocol dumps request headers and frames at
    DEBUG (and a traceback on a malformed WebSocket frame). The dumps are dropped, the
    traceback too (a client's bad frame is not our bug), and addresses in what remains are
    replaced by `-`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _WEBSOCKETS_DIR in record.pathname:
            if record.levelno <= logging.INFO:
                return False
            record.exc_info, record.exc_text = None, None
        if record.msg == _BAD_UTF8:
            # uvicorn logs a client's text frame with bad UTF-8 as an error with a traceback:
            # any client could fill the log with them. It is the client's fault, closed 1007.
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a client sent bad UTF-8 in a text frame; closed 1007", ()
        try:
            message = record.getMessage()
        except Exception:
            return True
        scrubbed = scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


def keep_addresses_out() -> None:
    """Install `NoAddresses` on uvicorn's loggers (idempotent)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoAddresses) for f in logger.filters):
            logger.addFilter(NoAddresses())


def setup(level: str = "INFO") -> dict[str, Any]:
    """Configure the root logger; returns a uvicorn `log_config` that uses the same format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {"uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
                    "uvicorn.error": {"level": level},
                    "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False}},
    }
