"""Settings from LINGKAR_* variables: sensible defaults, and one clear line for any wrong value."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

from server.config import (
    ConfigError,
    Helpline,
    IceServer,
    Localized,
    Settings,
    load_settings,
    origin_allowed,
)

SECRET = "k" * 32
KEY = "organizer-key-0123456789abcdef"


def refused(env: dict[str, str], overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(env, overrides)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_defaults_with_an_empty_environment() -> None:
    settings = load_settings({})
    assert (settings.host, settings.port, settings.store) == ("127.0.0.1", 8000, "memory")
    assert settings.public_url == "http://127.0.0.1:8000"
    assert (settings.exit_url, settings.log_level, settings.slots, settings.grace_seconds) == (
        "/bye",
        "INFO",
        3,
        30,
    )
    assert settings.ice_servers == ()
    assert not settings.uses_redis


def test_secret_and_api_key_are_generated_when_unset() -> None:
    first, second = load_settings({}), load_settings({})
    assert first.secret_generated and first.api_key_generated
    assert len(first.secret.encode()) >= 32 and first.api_key
    assert first.secret != second.secret and first.api_key != second.api_key


def test_given_secret_and_api_key_are_kept() -> None:
    settings = load_settings({"LINGKAR_SECRET": SECRET, "LINGKAR_API_KEY": KEY})
    assert (settings.secret, settings.api_key) == (SECRET, KEY)
    assert not settings.secret_generated and not settings.api_key_generated


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "LINGKAR_HOST": "0.0.0.0",
            "LINGKAR_PORT": "9000",
            "LINGKAR_STORE": "redis://redis:6379/2",
            "LINGKAR_SECRET": SECRET,
            "LINGKAR_API_KEY": KEY,
            "LINGKAR_PUBLIC_URL": "https://lingkar.example.org/",
            "LINGKAR_PROCESS_URL": "https://lingkar.example.org/p/1",
            "LINGKAR_ICE_SERVERS": json.dumps(
                [{"urls": "stun:stun.example.org"}, {"urls": ["stun:s2.example.org:3478"]}]
            ),
            "LINGKAR_EXIT_URL": "https://www.bmkg.go.id/",
            "LINGKAR_LOG_LEVEL": "debug",
            "LINGKAR_SLOTS": "4",
            "LINGKAR_GRACE_SECONDS": "45",
            "LINGKAR_MAX_CONNECTIONS_PER_ADDRESS": "8",
            "LINGKAR_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
            "LINGKAR_MEDIA_ADDRESS": "203.0.113.10",
            "LINGKAR_MEDIA_PORTS": "40000-40999",
        }
    )
    assert settings == Settings(
        host="0.0.0.0",
        port=9000,
        store="redis://redis:6379/2",
        secret=SECRET,
        api_key=KEY,
        public_url="https://lingkar.example.org",
        process_url="https://lingkar.example.org/p/1",
        ice_servers=(IceServer(urls="stun:stun.example.org"), IceServer(urls=["stun:s2.example.org:3478"])),
        helplines=settings.helplines,
        exit_url="https://www.bmkg.go.id/",
        log_level="DEBUG",
        slots=4,
        grace_seconds=45,
        max_per_address=8,
        trusted_proxies=("10.0.0.0/8", "::1"),
        media_address="203.0.113.10",
        media_ports=(40000, 40999),
    )
    assert settings.uses_redis


def test_overrides_win_over_the_environment_and_none_means_not_given() -> None:
    settings = load_settings(
        {"LINGKAR_PORT": "9000", "LINGKAR_HOST": "0.0.0.0"}, {"port": 9100, "host": None}
    )
    assert (settings.host, settings.port, settings.public_url) == ("0.0.0.0", 9100, "http://0.0.0.0:9100")


def test_unknown_override_is_refused() -> None:
    assert "colour" in refused({}, {"colour": "red"})


def test_ipv6_host_gets_brackets_in_the_default_public_url() -> None:
    assert load_settings({"LINGKAR_HOST": "::1"}).public_url == "http://[::1]:8000"


@pytest.mark.parametrize("port", ["", "abc", "0", "65536", "-1", "80.5"])
def test_bad_port_is_refused(port: str) -> None:
    assert "LINGKAR_PORT" in refused({"LINGKAR_PORT": port})


@pytest.mark.parametrize("host", ["", "bad host", "http://x", "a/b"])
def test_bad_host_is_refused(host: str) -> None:
    assert "LINGKAR_HOST" in refused({"LINGKAR_HOST": host})


@pytest.mark.parametrize(
    "store",
    ["", "redis", "postgres://h/0", "redis://", "redis://h:notaport/0", "redis://h:6379/db", "memory:"],
)
def test_bad_store_is_refused(store: str) -> None:
    assert "LINGKAR_STORE" in refused({"LINGKAR_STORE": store, "LINGKAR_SECRET": SECRET})


def test_store_url_with_password_is_not_echoed() -> None:
    message = refused({"LINGKAR_STORE": "redis://:hunter2@h:6379/x", "LINGKAR_SECRET": SECRET})
    assert "hunter2" not in message


def test_redis_store_requires_a_secret() -> None:
    assert "LINGKAR_SECRET" in refused({"LINGKAR_STORE": "redis://localhost:6379/0"})


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_short_or_empty_secret_is_refused_and_not_echoed(secret: str) -> None:
    message = refused({"LINGKAR_SECRET": secret})
    assert "LINGKAR_SECRET" in message
    assert not secret or secret not in message


@pytest.mark.parametrize("key", ["", " padded-organizer-key-0123456789 ", "tab\tkey-0123456789abcdefghij"])
def test_bad_api_key_is_refused(key: str) -> None:
    assert "LINGKAR_API_KEY" in refused({"LINGKAR_API_KEY": key})


@pytest.mark.parametrize("key", ["Zq", "organizer-key", "x" * 23])
def test_a_short_api_key_stops_the_start_without_echoing_it(key: str) -> None:
    message = refused({"LINGKAR_API_KEY": key})
    assert "LINGKAR_API_KEY" in message and "24" in message and key not in message


def test_per_address_defaults_count_32_and_trust_loopback_proxies() -> None:
    settings = load_settings({})
    assert settings.max_per_address == 32
    assert settings.trusted_proxies == ("127.0.0.1", "::1")


@pytest.mark.parametrize("value", ["proxy.example.org", "10.0.0.0/33", "1.2.3.4,nope"])
def test_bad_trusted_proxies_are_refused(value: str) -> None:
    assert "LINGKAR_TRUSTED_PROXIES" in refused({"LINGKAR_TRUSTED_PROXIES": value})


@pytest.mark.parametrize(
    "value",
    [
        '[{"urls": "turn:turn.example.org", "username": "u", "credential": "c"}]',
        '[{"urls": ["stun:s.example.org", "turns:t.example.org:443"], "username": "u", "credential": "c"}]',
        '[{"urls": "stun:s.example.org", "username": "u", "credential": "secret-c"}]',
    ],
)
def test_ice_servers_with_credentials_are_refused_they_would_be_public(value: str) -> None:
    message = refused({"LINGKAR_ICE_SERVERS": value})
    assert "LINGKAR_ICE_SERVERS" in message and "secret-c" not in message


@pytest.mark.parametrize(
    "url", ["lingkar.example.org", "ftp://x", "https://", "http://h:99999", "https://h/?q=1", "https://h/#f"]
)
def test_bad_public_url_is_refused(url: str) -> None:
    assert "LINGKAR_PUBLIC_URL" in refused({"LINGKAR_PUBLIC_URL": url})


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        "{",
        '{"urls": "stun:x"}',
        "[1]",
        '[{"url": "stun:x"}]',
        '[{"urls": "http://x"}]',
        '[{"urls": []}]',
        '[{"urls": "turn:x"}]',
        '[{"urls": "stun:x", "extra": 1}]',
    ],
)
def test_bad_ice_servers_are_refused(value: str) -> None:
    assert "LINGKAR_ICE_SERVERS" in refused({"LINGKAR_ICE_SERVERS": value})


def test_builtin_helplines_are_indonesian_and_bilingual() -> None:
    helplines = load_settings({}).helplines
    contacts = {helpline.contact for helpline in helplines}
    # Each confirmed on the organisation's own or an official government page (issue 16).
    assert {"healing119.id", "129", "112"} <= contacts
    assert all(helpline.description.id and helpline.description.en for helpline in helplines)
    assert all(not h.note or (h.note.id and h.note.en) for h in helplines)


def test_builtin_helplines_name_the_page_that_confirms_them() -> None:
    for helpline in load_settings({}).helplines:
        source = urlsplit(helpline.source or "")
        assert source.scheme == "https" and source.netloc, helpline.name
        assert " " not in (helpline.source or ""), helpline.name
        assert helpline.checked, helpline.name
        checked = date.fromisoformat(helpline.checked)
        assert checked.isoformat() == helpline.checked  # YYYY-MM-DD
        assert date(2020, 1, 1) <= checked <= date(2026, 12, 6)


def test_builtin_helplines_drop_the_unconfirmed_lines() -> None:
    # 119 ext 8 (SEJIWA) and the LISA numbers could not be confirmed on their own pages.
    contacts = {helpline.contact for helpline in load_settings({}).helplines}
    assert contacts.isdisjoint({"119 ext 8", "+62 811 3855 472", "+62 811 3815 472"})


def test_client_config_carries_source_and_checked() -> None:
    builtins = [msgspec.to_builtins(h) for h in load_settings({}).helplines]
    assert all(item["source"].startswith("https://") and item["checked"] for item in builtins)


def test_helplines_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "help.json"
    path.write_text(json.dumps([{"name": "Line", "contact": "123", "description": {"id": "a", "en": "b"}}]))
    helplines = load_settings({"LINGKAR_HELPLINES": str(path)}).helplines
    assert helplines == (Helpline(name="Line", contact="123", description=Localized(id="a", en="b")),)
    # A deployment's own file may omit source and checked; they are then left out of /client-config.
    assert helplines[0].source is None and helplines[0].checked is None
    assert set(msgspec.to_builtins(helplines[0])) == {"name", "contact", "description"}


def test_helplines_file_may_give_source_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "help.json"
    entry = {
        "name": "Line",
        "contact": "123",
        "description": {"id": "a", "en": "b"},
        "source": "https://example.org/help",
        "checked": "2026-01-02",
    }
    path.write_text(json.dumps([entry]))
    (helpline,) = load_settings({"LINGKAR_HELPLINES": str(path)}).helplines
    assert (helpline.source, helpline.checked) == ("https://example.org/help", "2026-01-02")


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"name": "x"}',
        '[{"name": "x", "contact": "1"}]',
        '[{"name": "x", "contact": "1", "description": {"id": "a"}}]',
        '[{"name": "x", "contact": "1", "description": {"id": "a", "en": "b"}, "extra": 1}]',
    ],
)
def test_bad_helplines_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "help.json"
    path.write_text(content)
    assert "LINGKAR_HELPLINES" in refused({"LINGKAR_HELPLINES": str(path)})


def test_missing_helplines_file_is_refused(tmp_path: Path) -> None:
    assert "LINGKAR_HELPLINES" in refused({"LINGKAR_HELPLINES": str(tmp_path / "absent.json")})


@pytest.mark.parametrize(
    "url", ["", "bye", "//evil.example", "javascript:alert(1)", "data:text/html,x", "/a b"]
)
def test_bad_exit_url_is_refused(url: str) -> None:
    assert "LINGKAR_EXIT_URL" in refused({"LINGKAR_EXIT_URL": url})


@pytest.mark.parametrize("level", ["", "VERBOSE", "trace", "5"])
def test_unknown_log_level_is_refused(level: str) -> None:
    assert "LINGKAR_LOG_LEVEL" in refused({"LINGKAR_LOG_LEVEL": level})


@pytest.mark.parametrize(
    ("name", "value"), [("LINGKAR_SLOTS", "0"), ("LINGKAR_SLOTS", "x"), ("LINGKAR_GRACE_SECONDS", "-1")]
)
def test_bad_slots_or_grace_are_refused(name: str, value: str) -> None:
    assert name in refused({name: value})


def test_long_bad_values_are_shortened_in_the_message() -> None:
    assert len(refused({"LINGKAR_LOG_LEVEL": "x" * 10_000})) < 300


# ---------------------------------------------------------------- Origin check


def with_public_url(url: str) -> Settings:
    return load_settings({"LINGKAR_PUBLIC_URL": url})


def test_no_origin_is_allowed() -> None:
    assert origin_allowed(with_public_url("https://lingkar.example.org"), None)


@pytest.mark.parametrize("origin", ["https://lingkar.example.org", "https://LINGKAR.example.org:443"])
def test_matching_origin_is_allowed(origin: str) -> None:
    assert origin_allowed(with_public_url("https://lingkar.example.org/base"), origin)


@pytest.mark.parametrize(
    "origin",
    [
        "http://lingkar.example.org",
        "https://lingkar.example.org:8443",
        "https://evil.example.org",
        "https://lingkar.example.org.evil.example",
        "null",
        "",
        "garbage",
        "https://h:notaport",
    ],
)
def test_other_origins_are_refused(origin: str) -> None:
    assert not origin_allowed(with_public_url("https://lingkar.example.org"), origin)


@pytest.mark.parametrize("origin", ["http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"])
def test_loopback_names_are_interchangeable_on_a_loopback_host(origin: str) -> None:
    assert origin_allowed(load_settings({}), origin)
    assert origin_allowed(with_public_url("http://localhost:8000"), origin)


def test_loopback_origin_is_refused_for_a_public_host() -> None:
    assert not origin_allowed(with_public_url("http://lingkar.example.org:8000"), "http://localhost:8000")
    assert not origin_allowed(load_settings({}), "http://localhost:8001")


def test_turn_settings_are_read_and_the_secret_never_echoed() -> None:
    settings = load_settings({"LINGKAR_TURN_URLS": "turn:turn.example.org:3478?transport=tcp, turns:turn.example.org:443",
                              "LINGKAR_TURN_SECRET": "coturn-static-secret-xyz", "LINGKAR_TURN_TTL": "600"})
    assert settings.turn_urls == ("turn:turn.example.org:3478?transport=tcp", "turns:turn.example.org:443")
    assert (settings.turn_secret, settings.turn_ttl) == ("coturn-static-secret-xyz", 600)
    assert load_settings({}).turn_urls == () and load_settings({}).turn_ttl == 4 * 3600


@pytest.mark.parametrize("env", [
    {"LINGKAR_TURN_URLS": "turn:t.example.org"},
    {"LINGKAR_TURN_URLS": "turn:t.example.org", "LINGKAR_TURN_SECRET": "short-secret"},
    {"LINGKAR_TURN_SECRET": "coturn-static-secret-xyz"},
    {"LINGKAR_TURN_URLS": "stun:t.example.org", "LINGKAR_TURN_SECRET": "coturn-static-secret-xyz"},
    {"LINGKAR_TURN_URLS": "turn:t.example.org", "LINGKAR_TURN_SECRET": "coturn-static-secret-xyz",
     "LINGKAR_TURN_TTL": "5"},
])
def test_bad_turn_settings_are_refused(env: dict[str, str]) -> None:
    message = refused(env)
    assert "LINGKAR_TURN" in message and "coturn-static-secret-xyz" not in message and "short-secret" not in message


def test_media_address_and_ports_are_read() -> None:
    settings = load_settings({"LINGKAR_MEDIA_ADDRESS": " 203.0.113.10 ", "LINGKAR_MEDIA_PORTS": "40000-40999"})
    assert (settings.media_address, settings.media_ports) == ("203.0.113.10", (40000, 40999))
    settings = load_settings({"LINGKAR_MEDIA_ADDRESS": "2001:DB8:0::1", "LINGKAR_MEDIA_PORTS": " 50000 - 50000 "})
    assert (settings.media_address, settings.media_ports) == ("2001:db8::1", (50000, 50000))
    for env in ({}, {"LINGKAR_MEDIA_ADDRESS": "", "LINGKAR_MEDIA_PORTS": " "}):
        assert (load_settings(env).media_address, load_settings(env).media_ports) == (None, None)


@pytest.mark.parametrize("address", ["circle.example.org", "203.0.113.300", "203.0.113.10/32", "0.0.0.0", "::",
                                     "224.0.0.1", "fe80::1", "2001:db8::1%eth0", "203.0.113.10:40000"])
def test_bad_media_address_is_refused(address: str) -> None:
    assert "LINGKAR_MEDIA_ADDRESS must be the IP address" in refused({"LINGKAR_MEDIA_ADDRESS": address})


@pytest.mark.parametrize("ports", ["40000", "40999-40000", "80-1000", "1023-2000", "40000-70000", "a-b",
                                   "40000:40999", "40000-", "-40999", "\u0664\u0660\u0660\u0660\u0660-40999"])
def test_bad_media_ports_are_refused(ports: str) -> None:
    message = refused({"LINGKAR_MEDIA_PORTS": ports})
    assert message.startswith("LINGKAR_MEDIA_PORTS must be a UDP port range low-high within 1024-65535")


def test_the_relays_collection_interval_is_read() -> None:
    assert load_settings({}).media_gc_interval == 10.0
    assert load_settings({"LINGKAR_MEDIA_GC_INTERVAL": "off"}).media_gc_interval is None
    assert load_settings({"LINGKAR_MEDIA_GC_INTERVAL": "2.5"}).media_gc_interval == 2.5


@pytest.mark.parametrize("value", ["soon", "-1", "3601", ""])
def test_a_bad_collection_interval_stops_the_start_with_one_line(value: str) -> None:
    assert "LINGKAR_MEDIA_GC_INTERVAL" in refused({"LINGKAR_MEDIA_GC_INTERVAL": value})


def test_the_compiled_fan_out_is_on_unless_turned_off() -> None:
    assert load_settings({}).media_native is True
    assert load_settings({"LINGKAR_MEDIA_NATIVE": "off"}).media_native is False


@pytest.mark.parametrize("value", ["0", "no", "", "On"])
def test_a_bad_fan_out_switch_stops_the_start_with_one_line(value: str) -> None:
    assert refused({"LINGKAR_MEDIA_NATIVE": value}).startswith("LINGKAR_MEDIA_NATIVE must be 'on' or 'off'")


def test_a_process_has_its_own_url_behind_a_proxy_and_the_deployment_one_public_url() -> None:
    settings = load_settings({"LINGKAR_PUBLIC_URL": "https://lingkar.example.org",
                              "LINGKAR_PROCESS_URL": "https://lingkar.example.org/p/2/"})
    assert (settings.public_url, settings.process_url) == ("https://lingkar.example.org",
                                                           "https://lingkar.example.org/p/2")
    assert load_settings({"LINGKAR_PUBLIC_URL": "https://a.example"}).process_url == "https://a.example"
    assert "LINGKAR_PROCESS_URL" in refused({"LINGKAR_PROCESS_URL": "ftp://x"})
