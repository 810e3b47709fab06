"""The log filter blanks every written form of an IP address, and nothing else."""

from __future__ import annotations

import json
import logging

import pytest

from server.logs import JsonFormatter, NoAddresses, scrub


@pytest.mark.parametrize("text, scrubbed", [
    ("client 10.1.2.3:5555 said", "client - said"),
    ("010.001.002.003 zero-padded", "- zero-padded"),
    ("('127.0.0.1', 5000)", "('-', 5000)"),
    ("host=127.0.0.1,port=4", "host=-,port=4"),
    ("[2001:db8::1]:443 upgraded", "- upgraded"),
    ("peer 2001:db8::1 left", "peer - left"),
    ("2001:0db8:0000:0000:0000:ff00:0042:8329", "-"),
    ("1:2:3:4:5:6:7:8", "-"),
    ("fe80::1%eth0 link-local", "- link-local"),
    ("[fe80::1%eth0]:80", "-"),
    ("::ffff:192.168.1.2 mapped", "- mapped"),
    ("('::1', 5000, 0, 0)", "('-', 5000, 0, 0)"),
    ("addr:2001:db8::1", "addr:-"),
])
def test_every_form_of_an_address_is_blanked(text: str, scrubbed: str) -> None:
    assert scrub(text) == scrubbed


@pytest.mark.parametrize("text", [
    "at 12:30:45 the turn ended", "Started server process [12345]", "python 3.11.7",
    "ratio 1.2.3.4.5", "999.1.1.1", "code 4403",
])
def test_what_is_not_an_address_stays(text: str) -> None:
    assert scrub(text) == text


def test_the_formatter_scrubs_every_logger_and_the_filter_uvicorns() -> None:
    record = logging.makeLogRecord({"name": "redis.asyncio.client", "msg": "lost %s",
                                    "args": ("Connection(host=2001:db8::7,port=6379)",), "peer": "10.0.0.9"})
    line = json.loads(JsonFormatter().format(record))
    assert "2001:db8::7" not in line["msg"] and line["peer"] == "-"
    uvicorn_record = logging.makeLogRecord({"name": "uvicorn.error", "msg": '%s - "WebSocket /ws" [accepted]',
                                            "args": ("[2001:db8::5]:5123",)})
    assert NoAddresses().filter(uvicorn_record) and uvicorn_record.getMessage() == '- - "WebSocket /ws" [accepted]'


def test_a_clients_bad_utf8_is_no_error_and_no_traceback() -> None:
    try:
        b"\xff".decode()
    except UnicodeDecodeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.makeLogRecord({"name": "uvicorn.error", "msg": "Invalid UTF-8 sequence received from client.",
                                    "levelno": logging.ERROR, "levelname": "ERROR", "exc_info": exc_info})
    assert NoAddresses().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None and "1007" in record.getMessage()
