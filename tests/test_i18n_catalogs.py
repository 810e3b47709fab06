"""F15: the two catalogs of the web client have the same keys, and every key the pages and
scripts use exists in both.

The shared catalog is web/i18n/{id,en}.json. A page with many strings of its own keeps them in a
part, web/i18n/{part}.{id,en}.json, named by <html data-i18n-parts="…"> (web/js/i18n.js fetches
it beside the shared one): a member's phone never downloads the organizer page's strings. A page's
keys must be in the shared catalog or in its own parts; a script's keys in the shared catalog, or
in the parts of the one page that loads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
CATALOGS = ("id", "en")
PARTS = sorted({p.name.split(".")[0] for p in (WEB / "i18n").glob("*.*.json")})

DATA_I18N = re.compile(r'data-i18n(?:-placeholder|-aria-label|-title)?="([^"]+)"')
T_CALL = re.compile(r"""\bt\(\s*['"]([^'"]+)['"]""")
# Keys passed around as data before reaching t(): ERROR_KEYS maps, effects {announce: '…'}.
KEY_LITERAL = re.compile(
    r"""['"]((?:announce|notice|error|ended|prompt|floor|timer|roster|room|mod|org|join|note|help|conn|confirm|mode|lobby|common|nav)\.[a-z0-9_]+)['"]"""
)
HTML_PARTS = re.compile(r'<html\b[^>]*\bdata-i18n-parts="([^"]*)"')
PAGE_SCRIPT = re.compile(r'<script\b[^>]*\bsrc="/static/js/([^"]+)"')


def load(code: str, part: str | None = None) -> dict[str, str]:
    name = f"{part}.{code}.json" if part else f"{code}.json"
    data = json.loads((WEB / "i18n" / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def page_parts() -> dict[str, list[str]]:
    """Each page's own catalog parts, from <html data-i18n-parts>."""
    out = {}
    for p in WEB.glob("*.html"):
        found = HTML_PARTS.search(p.read_text(encoding="utf-8"))
        out[p.name] = found.group(1).split() if found else []
    return out


def script_parts() -> dict[str, list[str]]:
    """A page's entry script may use its page's parts (only if no other page loads it)."""
    pages: dict[str, list[str]] = {}
    parts = page_parts()
    for p in WEB.glob("*.html"):
        for script in PAGE_SCRIPT.findall(p.read_text(encoding="utf-8")):
            pages.setdefault(script, []).append(p.name)
    return {script: parts[names[0]] for script, names in pages.items() if len(names) == 1}


def catalog_for(code: str, parts: list[str]) -> set[str]:
    keys = set(load(code))
    for part in parts:
        keys |= set(load(code, part))
    return keys


def html_keys() -> dict[str, set[str]]:
    return {p.name: set(DATA_I18N.findall(p.read_text(encoding="utf-8"))) for p in WEB.glob("*.html")}


def js_keys() -> dict[str, set[str]]:
    found = {}
    for p in (WEB / "js").glob("*.js"):
        text = p.read_text(encoding="utf-8")
        found[p.name] = set(T_CALL.findall(text)) | set(KEY_LITERAL.findall(text))
    return found


@pytest.mark.parametrize("part", [None, *PARTS])
def test_catalogs_have_identical_keys(part: str | None) -> None:
    ids, ens = load("id", part), load("en", part)
    assert sorted(set(ids) - set(ens)) == [], "keys missing in en"
    assert sorted(set(ens) - set(ids)) == [], "keys missing in id"


def test_parts_are_declared_by_pages_and_repeat_no_shared_key() -> None:
    declared = {part for parts in page_parts().values() for part in parts}
    assert declared == set(PARTS)
    for part in PARTS:
        assert set(load("id", part)) & set(load("id")) == set(), part


@pytest.mark.parametrize("code", CATALOGS)
@pytest.mark.parametrize("part", [None, *PARTS])
def test_catalog_values_are_non_empty_strings(code: str, part: str | None) -> None:
    bad = [k for k, v in load(code, part).items() if not isinstance(v, str) or not v.strip()]
    assert bad == []


@pytest.mark.parametrize("code", CATALOGS)
@pytest.mark.parametrize("part", [None, *PARTS])
def test_placeholders_match_between_languages(code: str, part: str | None) -> None:
    other = load("en" if code == "id" else "id", part)
    mine = load(code, part)
    placeholder = re.compile(r"\{(\w+)\}")
    bad = [k for k in mine if set(placeholder.findall(mine[k])) != set(placeholder.findall(other.get(k, "")))]
    assert bad == []


@pytest.mark.parametrize("code", CATALOGS)
def test_every_data_i18n_key_in_the_pages_exists(code: str) -> None:
    parts = page_parts()
    missing = {}
    for page, keys in html_keys().items():
        absent = keys - catalog_for(code, parts[page])
        if absent:
            missing[page] = sorted(absent)
    assert missing == {}


@pytest.mark.parametrize("code", CATALOGS)
def test_every_key_the_scripts_use_exists(code: str) -> None:
    parts = script_parts()
    missing = {}
    for js, keys in js_keys().items():
        absent = keys - catalog_for(code, parts.get(js, []))
        if absent:
            missing[js] = sorted(absent)
    assert missing == {}


def test_the_pages_and_scripts_use_keys_at_all() -> None:
    # Guards the regexes above: a parser that finds nothing would pass every test vacuously.
    assert len(set().union(*html_keys().values())) > 50
    assert len(set().union(*js_keys().values())) > 50
    assert script_parts().get("organizer.js") == ["organizer"]
